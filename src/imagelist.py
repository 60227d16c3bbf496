"""The images of a --data_path in any layout, found in one walk.

Layouts:
- "ImageFolder": every image sits under a top-level sub-folder (its class, kept as a label);
- "flat folder": images directly in the folder, no sub-folder holds any;
- "folder tree": images at mixed depths (beside folders too); no labels;
- "list file": a text file with one image path a line (absolute, or relative to the list file's
  folder), optionally followed by a tab and a class name; blank lines and "#" lines are skipped.

Extensions are torchvision's, case-insensitive; hidden files and folders are skipped. Links are
followed, but each real folder is listed once, so a link back to the root neither hangs the walk
nor repeats the data. Within a class the order is torchvision ImageFolder's (folders sorted by
path, files by name), so an ImageFolder gives the samples torchvision would.
"""
import collections
import logging
import os
from dataclasses import dataclass

from torchvision.datasets.folder import IMG_EXTENSIONS

from .errors import DataError

logger = logging.getLogger()

LIST_HEADER = "# image list"
BAD_NAME = "(tab or newline in the name)"  # a list file could not hold it


@dataclass
class ImageList:
    root: str            # the folder or list file given (absolute)
    paths: list          # absolute paths, sorted within each folder
    labels: list = None  # class index per image, or None (no classes)
    classes: list = None  # class names, or None
    layout: str = "flat folder"

    def __len__(self):
        return len(self.paths)

    def describe(self):
        return f"found {len(self.paths)} images in {self.root} ({self.layout})"

    def save(self, file):
        """Write as a list file (paths relative to the list file's folder where possible), with
        the layout and root in its header and the class names as a second column."""
        base = os.path.dirname(os.path.abspath(file))
        tmp = file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{LIST_HEADER}\tlayout={self.layout}\troot={self.root}\n")
            for i, p in enumerate(self.paths):
                rel = os.path.relpath(p, base) if os.path.commonpath([p, base]) == base else p
                if rel.startswith("#"):  # not a comment line
                    rel = os.path.join(".", rel)
                f.write(rel if self.labels is None else f"{rel}\t{self.classes[self.labels[i]]}")
                f.write("\n")
        os.replace(tmp, file)  # a reader never sees half a list


def is_image(name):
    return (name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")
            and not any(c in name for c in "\t\n\r"))


def _walk(root):
    """One walk of `root`, following links, each real folder listed once.

    Returns (groups, others): groups maps each top-level sub-folder name to its images (absolute
    paths; [] for a folder without any) and "" to the images directly in `root`; others counts
    the non-image, non-hidden files by extension."""
    root = os.path.abspath(root)
    seen = {os.path.realpath(root)}
    found, others = [], collections.Counter()  # found: (top-level name, dirpath, files)
    unreadable = []  # os.walk would skip them silently
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable.append):
        keep = []
        # claim the sub-folders before descending: a link to a folder seen (or to be walked)
        # elsewhere is dropped here, so os.walk never lists one real folder twice
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if not d.startswith(".") and real not in seen:
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        rel = os.path.relpath(dirpath, root)
        top = "" if rel == "." else rel.split(os.sep, 1)[0]
        images = sorted(f for f in filenames if is_image(f))
        found.append((top, dirpath, images))
        for f in filenames:
            if not is_image(f) and not f.startswith("."):  # .DS_Store & co are not data
                bad = any(c in f for c in "\t\n\r")
                others[BAD_NAME if bad else os.path.splitext(f)[1].lower() or "(no extension)"] += 1
    if unreadable:
        logger.warning(f"{len(unreadable)} folder(s) under {root} could not be read and are left "
                       f"out: {[f'{e.filename}: {e.strerror}' for e in unreadable[:3]]}")
    groups = {}
    for top, dirpath, images in sorted(found, key=lambda t: (t[0], t[1])):  # torchvision's order
        groups.setdefault(top, []).extend(os.path.join(dirpath, f) for f in images)
    return groups, others


def _ignored_text(others):
    return (f"{sum(others.values())} file(s) with other extensions: "
            + ", ".join(f"{e} x{n}" for e, n in others.most_common(6)))


def _find_in_folder(path, what):
    """(ImageList, {class folder: number of images, 0 for empty ones}) of a folder."""
    root = os.path.abspath(path)
    groups, others = _walk(root)
    top = groups.pop("", [])
    per_class = {c: p for c, p in groups.items() if p}
    if not top and not per_class:
        raise DataError(f"{what} {path!r} contains no images with extensions "
                        f"{' '.join(IMG_EXTENSIONS)}"
                        + (f" (found {_ignored_text(others)})" if others else ""))
    if others:
        logger.warning(f"{what} {path!r}: ignored {_ignored_text(others)} (readable extensions: "
                       f"{' '.join(IMG_EXTENSIONS)})")
    counts = {c: len(p) for c, p in groups.items()}
    if not top:
        empty = [c for c, n in counts.items() if n == 0]
        if empty:
            logger.warning(f"{what} {path!r}: {len(empty)} class folder(s) without images are "
                           f"ignored: {empty[:5]}")
        classes = sorted(per_class)
        paths = [p for c in classes for p in per_class[c]]
        labels = [i for i, c in enumerate(classes) for _ in per_class[c]]
        return ImageList(root, paths, labels, classes, "ImageFolder"), counts
    if not per_class:
        return ImageList(root, top, layout="flat folder"), counts
    # images beside folders: one unlabelled set, the root's own images first
    paths = top + [p for c in sorted(per_class) for p in per_class[c]]
    return ImageList(root, paths, layout="folder tree"), counts


def read_list_header(file):
    """The key=value fields of a list file's header line ({} without one)."""
    with open(file) as f:
        line = f.readline().rstrip("\r\n")
    if not line.startswith(LIST_HEADER):
        return {}
    return dict(kv.split("=", 1) for kv in line.split("\t")[1:] if "=" in kv)


def read_list_file(file, what="--data_path", check_exists=True):
    """An ImageList from a list file (root and layout from its header when it has one). Listed
    files that do not exist are left out with one warning naming them; `check_exists=False`
    skips that check (one stat per image: the job's own list, already checked, is read so)."""
    base = os.path.dirname(os.path.abspath(file))
    layout, root, entries = "list file", os.path.abspath(file), []
    try:
        with open(file) as f:
            for n, line in enumerate(f):
                line = line.rstrip("\r\n")
                if n == 0 and line.startswith(LIST_HEADER):
                    fields = dict(kv.split("=", 1) for kv in line.split("\t")[1:] if "=" in kv)
                    layout, root = fields.get("layout", layout), fields.get("root", root)
                    continue
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                path, _, label = line.partition("\t")
                entries.append((os.path.normpath(os.path.join(base, path)), label.strip()))
    except UnicodeDecodeError:
        raise DataError(f"{what} {file!r} is not a text list of image paths (one a line)") from None
    if check_exists:
        missing = [p for p, _ in entries if not os.path.isfile(p)]
        if missing:
            logger.warning(f"{what} {file!r}: {len(missing)} listed file(s) do not exist and are "
                           f"left out: {missing[:5]}")
            entries = [e for e in entries if os.path.isfile(e[0])]
    if not entries:
        raise DataError(f"{what} {file!r} lists no existing image")
    labelled = all(label for _, label in entries)
    classes = sorted({label for _, label in entries}) if labelled else None
    index = {c: i for i, c in enumerate(classes or [])}
    return ImageList(root=root, paths=[p for p, _ in entries], layout=layout,
                     labels=[index[label] for _, label in entries] if labelled else None,
                     classes=classes)


def check_data_path(path, what="--data_path"):
    """The cheap check before any work: the path exists."""
    if not path or not os.path.exists(path):
        raise DataError(f"{what} {path!r} does not exist")


def find_images(path, what="--data_path"):
    """The ImageList of a folder (any layout) or a list file; one-line DataError when empty."""
    check_data_path(path, what)
    if os.path.isfile(path):
        images = read_list_file(path, what)
        # described as what was given, even a list this code wrote (it keeps the labels)
        images.root, images.layout = os.path.abspath(path), "list file"
        return images
    return _find_in_folder(path, what)[0]


def class_counts(path, what="--data_path"):
    """Images per class folder of an ImageFolder (0 for a class folder without images); one-line
    DataError when it is not one (see require_labels)."""
    check_data_path(path, what)
    if os.path.isfile(path):
        images = require_labels(read_list_file(path, what), what)
        return dict(collections.Counter(images.classes[i] for i in images.labels))
    images, counts = _find_in_folder(path, what)
    require_labels(images, what)
    return counts


def require_labels(images, what="--data_path", who="the evaluations"):
    """One-line DataError unless the images have classes."""
    if images.labels is not None:
        return images
    how = ("a tab and its class name after each path" if images.layout == "list file" else
           f"one sub-folder per class: {images.root}/<class>/<image>")
    raise DataError(f"{what} {images.root!r} is a {images.layout} without classes: {who} train "
                    f"and score a classifier on labels, so they need {how}")

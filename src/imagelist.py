"""The images of a --data_path in any layout, found once.

Layouts:
- "ImageFolder": every image sits under a top-level sub-folder (its class, kept as a label);
- "flat folder": images directly in the folder, no sub-folder holds any;
- "folder tree": images at mixed depths (beside folders too); no labels;
- "list file": a text file with one image path a line (absolute, or relative to the list file's
  folder), optionally followed by a tab and a class name; blank lines and "#" lines are skipped.

Extensions are torchvision's, case-insensitive; hidden files and folders are skipped. Links are
followed, but each real folder is visited once, so a link back to the root neither hangs the walk
nor repeats the data.
"""
import logging
import os
from dataclasses import dataclass

from torchvision.datasets.folder import IMG_EXTENSIONS

logger = logging.getLogger()

LIST_HEADER = "# image list"


class DataError(ValueError):
    """Unusable data: the message names the path and the problem."""

    def __str__(self):
        # raised in a DataLoader worker, it is re-raised in the main process with the message
        # "Caught DataError in DataLoader worker process N.\nOriginal Traceback ...": keep the
        # one-line message it ends with
        text = super().__str__()
        if "Original Traceback" in text:
            last = text.rstrip().splitlines()[-1]
            return last.split("DataError: ", 1)[-1]
        return text


@dataclass
class ImageList:
    root: str            # the folder or list file given
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
        the layout in its header and the class names as a second column."""
        base = os.path.dirname(os.path.abspath(file))
        tmp = file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{LIST_HEADER}\tlayout={self.layout}\troot={self.root}\n")
            for i, p in enumerate(self.paths):
                rel = os.path.relpath(p, base) if os.path.commonpath([p, base]) == base else p
                f.write(rel if self.labels is None else f"{rel}\t{self.classes[self.labels[i]]}")
                f.write("\n")
        os.replace(tmp, file)  # a reader never sees half a list


def is_image(name):
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def walk_images(folder, seen=None):
    """Sorted absolute paths of the images under `folder`, following links, each real folder
    once (a link cycle, or two links to one folder, would otherwise repeat the images). `seen`:
    real paths of folders visited (or to be visited) by other walks; `folder` itself is walked."""
    seen, found = (set() if seen is None else seen), []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen and dirpath != folder:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.abspath(os.path.join(dirpath, f)) for f in sorted(filenames)
                     if is_image(f))
    return found


def read_list_file(file, what="--data_path"):
    """An ImageList from a list file; missing files are left out with one warning naming them."""
    base = os.path.dirname(os.path.abspath(file))
    layout, root, entries = "list file", file, []
    with open(file) as f:
        for n, line in enumerate(f):
            line = line.rstrip("\n")
            if n == 0 and line.startswith(LIST_HEADER):
                fields = dict(kv.split("=", 1) for kv in line.split("\t")[1:] if "=" in kv)
                layout, root = fields.get("layout", layout), fields.get("root", root)
                continue
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            path, _, label = line.partition("\t")
            entries.append((os.path.normpath(os.path.join(base, path.strip())), label.strip()))
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


def find_images(path, what="--data_path"):
    """The ImageList of a folder (any layout) or a list file; one-line DataError when empty."""
    if not path or not os.path.exists(path):
        raise DataError(f"{what} {path!r} does not exist")
    if os.path.isfile(path):
        return read_list_file(path, what)
    root = os.path.abspath(path)
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    top = [os.path.join(root, e.name) for e in entries if e.is_file() and is_image(e.name)]
    dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    # a link inside one class folder to the root or to another class folder is not followed
    seen = {os.path.realpath(root)} | {os.path.realpath(e.path) for e in dirs}
    per_class = {e.name: walk_images(e.path, seen) for e in dirs}
    per_class = {c: p for c, p in per_class.items() if p}
    if not top and not per_class:
        raise DataError(f"{what} {path!r} contains no images with extensions "
                        f"{' '.join(IMG_EXTENSIONS)}")
    if not top:
        classes = sorted(per_class)
        paths = [p for c in classes for p in per_class[c]]
        labels = [i for i, c in enumerate(classes) for _ in per_class[c]]
        return ImageList(root, paths, labels, classes, "ImageFolder")
    if not per_class:
        return ImageList(root, top, layout="flat folder")
    # images at the top and in sub-folders; walk the whole tree once so links into the root
    # do not repeat anything
    return ImageList(root, walk_images(root), layout="folder tree")

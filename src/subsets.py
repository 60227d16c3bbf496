"""The labelled subset of eval_semisup.py: the images a subset file names, or a deterministic
stratified sample of --labels_perc % of each class."""
import os

import torch

from .errors import DataError, UsageError


def read_subset_file(path, train_root, class_to_idx):
    """Samples named by a subset file: one image per line, a path relative to train/
    (`class/img.jpg`), or, as SimCLR's ImageNet lists, a bare file name whose class folder is
    the prefix before the first `_` (`n01440764_10026.JPEG`)."""
    if not os.path.isfile(path):
        raise DataError(f"--subset_file {path}: no such file")
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise DataError(f"--subset_file {path} is empty")
    samples, missing = [], []
    for name in names:
        rel = name if "/" in name else os.path.join(name.split("_")[0], name)
        cls = rel.split("/")[0]
        full = os.path.join(train_root, rel)
        if cls not in class_to_idx or not os.path.isfile(full):
            missing.append(rel)
            continue
        samples.append((full, class_to_idx[cls]))
    if missing:
        raise DataError(f"--subset_file {path}: {len(missing)} of {len(names)} files are not in "
                        f"{train_root} (first: {missing[0]})")
    return samples


def stratified_subset(samples, labels_perc, seed, classes=None):
    """`labels_perc` % of each class's samples (rounded), drawn by a seeded RNG: deterministic,
    in the original sample order. A class left with no image is an error."""
    if not 0 < labels_perc <= 100:
        raise UsageError(f"--labels_perc must be in (0, 100], got {labels_perc}")
    by_class = {}
    for i, (_, target) in enumerate(samples):
        by_class.setdefault(target, []).append(i)
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for target in sorted(by_class):
        idx = by_class[target]
        n = int(len(idx) * labels_perc / 100 + 0.5)
        if n == 0:
            name = classes[target] if classes else target
            raise DataError(f"--labels_perc {labels_perc} leaves class {name!r} "
                            f"({len(idx)} images) without any labelled image")
        perm = torch.randperm(len(idx), generator=generator)[:n]
        keep.extend(idx[j] for j in perm.tolist())
    return [samples[i] for i in sorted(keep)]

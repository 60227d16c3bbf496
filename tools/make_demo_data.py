"""The demo's embedded data: a class-stratified Fashion-MNIST subset, and its ImageFolder export.

`build` reproduces data/fashion_mnist_subset.npz from the original IDX files (Debian package
`dataset-fashion-mnist`, which installs them under /usr/share/datasets/fashion-mnist):

    apt-get install dataset-fashion-mnist
    python tools/make_demo_data.py build            # 500 train + 100 test images per class, seed 0

`export` writes the .npz as an ImageFolder of 32x32 RGB PNGs (the 28x28 images padded by 2 pixels
of background), which is what main_swav.py and the evaluations read:

    python tools/make_demo_data.py export --out demo_data    # demo_data/train/<class>/*.png, val/

Fashion-MNIST is (c) 2017 Zalando SE, MIT licence (data/LICENSE-fashion-mnist.txt).
"""
import argparse
import gzip
import hashlib
import os
import struct
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_NPZ = os.path.join(ROOT, "data", "fashion_mnist_subset.npz")
DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle_boot"]
IDX_FILES = {"x_train": "train-images-idx3-ubyte.gz", "y_train": "train-labels-idx1-ubyte.gz",
             "x_test": "t10k-images-idx3-ubyte.gz", "y_test": "t10k-labels-idx1-ubyte.gz"}


def read_idx(path):
    """An IDX file (gzipped or not) as a uint8 numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def stratified_indices(labels, per_class, seed):
    """`per_class` indices of each class, drawn without replacement by a seeded RNG, sorted."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise ValueError(f"class {c} has {len(idx)} images, fewer than {per_class}")
        chosen.append(rng.choice(idx, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def build(source, out, train_per_class=500, test_per_class=100, seed=0):
    arrays = {}
    for key, name in IDX_FILES.items():
        path = os.path.join(source, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found (apt-get install dataset-fashion-mnist, "
                                    "or pass --source)")
        arrays[key] = read_idx(path)
    tr = stratified_indices(arrays["y_train"], train_per_class, seed)
    te = stratified_indices(arrays["y_test"], test_per_class, seed + 1)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez_compressed(out, x_train=arrays["x_train"][tr], y_train=arrays["y_train"][tr],
                        x_test=arrays["x_test"][te], y_test=arrays["y_test"][te],
                        train_index=tr.astype(np.int32), test_index=te.astype(np.int32),
                        classes=np.array(CLASSES))
    return out


def load_subset(npz=DEFAULT_NPZ):
    with np.load(npz) as d:
        return {k: d[k] for k in d.files}


def to_rgb32(img28, mode="pad"):
    """28x28 uint8 -> 32x32x3 uint8: padded with background (exact pixels) or resized."""
    if mode == "pad":
        img = np.pad(img28, 2)
    else:
        img = np.asarray(Image.fromarray(img28).resize((32, 32), Image.BICUBIC))
    return np.repeat(img[:, :, None], 3, axis=2)


def _digest(npz, mode, limit):
    h = hashlib.sha256()
    with open(npz, "rb") as f:
        h.update(f.read())
    h.update(f"{mode}:{limit}".encode())
    return h.hexdigest()


def export(npz, out, mode="pad", limit_per_class=0):
    """Write out/train/<k>_<class>/<i>.png and out/val/...; skipped when already written from
    the same file with the same options. Returns the number of images written (0 if skipped)."""
    marker = os.path.join(out, ".exported")
    digest = _digest(npz, mode, limit_per_class)
    if os.path.isfile(marker) and open(marker).read().strip() == digest:
        return 0
    d = load_subset(npz)
    classes = [str(c) for c in d["classes"]]
    n = 0
    for split, xs, ys in (("train", d["x_train"], d["y_train"]), ("val", d["x_test"], d["y_test"])):
        seen = {}
        for i, (x, y) in enumerate(zip(xs, ys)):
            y = int(y)
            if limit_per_class and seen.get(y, 0) >= limit_per_class:
                continue
            seen[y] = seen.get(y, 0) + 1
            # the label prefix keeps ImageFolder's alphabetical class order equal to the labels
            folder = os.path.join(out, split, f"{y}_{classes[y]}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(to_rgb32(x, mode)).save(os.path.join(folder, f"{i:05d}.png"))
            n += 1
    with open(marker, "w") as f:
        f.write(digest + "\n")
    return n


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="make the .npz subset from the Fashion-MNIST IDX files")
    b.add_argument("--source", default=DEFAULT_SOURCE, help="folder with the four IDX .gz files")
    b.add_argument("--out", default=DEFAULT_NPZ)
    b.add_argument("--train_per_class", type=int, default=500)
    b.add_argument("--test_per_class", type=int, default=100)
    b.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("export", help="write the .npz subset as an ImageFolder (train/, val/)")
    e.add_argument("--npz", default=DEFAULT_NPZ)
    e.add_argument("--out", required=True)
    e.add_argument("--mode", choices=["pad", "resize"], default="pad",
                   help="28 -> 32 pixels: pad with background (default) or bicubic resize")
    e.add_argument("--limit_per_class", type=int, default=0, help="at most this many per class")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "build":
            path = build(args.source, args.out, args.train_per_class, args.test_per_class, args.seed)
            print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
        else:
            if not os.path.isfile(args.npz):
                raise FileNotFoundError(f"{args.npz} not found")
            n = export(args.npz, args.out, args.mode, args.limit_per_class)
            print(f"wrote {n} images to {args.out}" if n else f"{args.out} is up to date")
    except (OSError, ValueError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()

"""Multi-crop augmentation speed: the original's torchvision/PIL pipeline vs ours, same JPEGs, same run.

Single process, one thread: what one DataLoader worker does per image (decode the JPEG with the
dataset's own loader, then every crop's transform). Both pipelines read the same files in the same
order; their rounds alternate and each figure is the median over rounds.
Before timing, the run checks that the two pipelines return equal tensors under the same seed.

    python benchmarks/bench_data.py                      # 2x224 + 6x96, 256 generated 500x375 JPEGs
    python benchmarks/bench_data.py --loader_workers 4 8 # also through a DataLoader with N workers
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (Timer, load_average, machine_description, make_jpeg_folder,  # noqa: E402
                    median, print_json, print_table)

from src.multicropdataset import MultiCropDataset, SafeImageFolder  # noqa: E402


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data_path", default="", help="an ImageFolder (default: generated JPEGs)")
    p.add_argument("--n_images", type=int, default=256, help="JPEGs to generate")
    p.add_argument("--image_size", type=int, nargs=2, default=[500, 375], help="width height")
    p.add_argument("--nmb_crops", type=int, nargs="+", default=[2, 6])
    p.add_argument("--size_crops", type=int, nargs="+", default=[224, 96])
    p.add_argument("--min_scale_crops", type=float, nargs="+", default=[0.14, 0.05])
    p.add_argument("--max_scale_crops", type=float, nargs="+", default=[1.0, 0.14])
    p.add_argument("--blur", default="pil", choices=["pil", "opencv"])
    p.add_argument("--images_per_round", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--loader_workers", type=int, nargs="*", default=[],
                   help="also measure MultiCropDataset through a DataLoader with these numbers of "
                        "worker processes (images/s of the whole loader)")
    p.add_argument("--loader_batches", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=64)
    return p.parse_args()


def build(args, augment):
    # the dataset's own transforms: exactly what training uses
    ds = MultiCropDataset(args.data_path, args.size_crops, args.nmb_crops, args.min_scale_crops,
                          args.max_scale_crops, blur=args.blur, augment=augment)
    return ds.trans


def stages(trans, augment):
    """[(stage name, callable)] of one crop transform, so that each stage can be timed."""
    if augment == "pil":
        rrc, flip, colour, blur, to_tensor, normalize = trans.transforms
        return [("crop+resize", rrc), ("flip", flip), ("jitter+gray", colour), ("blur", blur),
                ("to-tensor", to_tensor), ("normalize", normalize)]
    return [("crop+resize+flip", trans.crop), ("jitter+gray", lambda x: trans.colour(x) or x),
            ("blur", trans.blur_words), ("to-tensor+normalize", trans.to_tensor)]


def run_round(load, n, trans, seed=0):
    """Images/s of what a loader worker does per image: decode, then every crop's transform."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    for i in range(n):
        img = load(i)
        for t in trans:
            t(img)
    return n / (time.perf_counter() - t0)


def breakdown(n, loader, trans, augment):
    timer = Timer()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    for i in range(n):
        with timer("decode"):
            img = loader(i)
        for t in trans:
            x = img
            for name, fn in stages(t, augment):
                with timer(name):
                    x = fn(x)
    total = time.perf_counter() - t0
    return {k: 1000 * v / n for k, v in timer.totals.items()}, total


def loader_throughput(args, augment, workers):
    ds = MultiCropDataset(args.data_path, args.size_crops, args.nmb_crops, args.min_scale_crops,
                          args.max_scale_crops, blur=args.blur, augment=augment)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True,
                                             num_samples=args.batch_size * (args.loader_batches + 2))
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, sampler=sampler,
                                     num_workers=workers, drop_last=True,
                                     pin_memory=torch.cuda.is_available())
    it = iter(dl)
    next(it), next(it)  # workers started and warm
    t0 = time.perf_counter()
    n = 0
    for batch in it:
        n += batch[0].shape[0]
    return n / (time.perf_counter() - t0)


def main():
    args = get_args()
    torch.set_num_threads(1)
    if not args.data_path:
        w, h = args.image_size
        args.data_path = make_jpeg_folder(
            os.path.join(tempfile.gettempdir(), f"swav_bench_jpegs_{w}x{h}"), args.n_images,
            width=w, height=h, processes=os.cpu_count())
    folder = SafeImageFolder(args.data_path)
    n = min(args.images_per_round, len(folder.samples))
    load = lambda i: folder.load_image(i)[0]  # noqa: E731 (the dataset's decode)
    images = [load(i) for i in range(n)]
    pipelines = {"pil": build(args, "pil"), "fast": build(args, "fast")}
    if pipelines["fast"][0].__class__.__name__ == "Compose":
        sys.exit("error: numba is not installed, so the fast pipeline is the PIL one")

    # same seed, same tensors?
    equal = True
    for k, img in enumerate(images[:16]):
        outs = {}
        for name, trans in pipelines.items():
            torch.manual_seed(1000 + k)
            outs[name] = [t(img) for t in trans]
        equal &= all(torch.equal(a, b) for a, b in zip(outs["pil"], outs["fast"]))

    # throughput: alternate the pipelines, median over rounds; with the decode (what a worker
    # does) and without it (the augmentations alone, on the decoded images)
    speeds = {"pil": [], "fast": []}
    aug_only = {"pil": [], "fast": []}
    decoded = lambda i: images[i]  # noqa: E731
    for r in range(args.rounds):
        order = ["pil", "fast"] if r % 2 == 0 else ["fast", "pil"]
        for name in order:
            speeds[name].append(run_round(load, n, pipelines[name], seed=r))
            aug_only[name].append(run_round(decoded, n, pipelines[name], seed=r))
    ratios = [f / p for f, p in zip(speeds["fast"], speeds["pil"])]
    ratios_aug = [f / p for f, p in zip(aug_only["fast"], aug_only["pil"])]

    crops = "+".join(f"{n}x{s}" for n, s in zip(args.nmb_crops, args.size_crops))
    print(f"machine: {machine_description()}   load average at end: {load_average():.2f}")
    print(f"data: {len(images)} images from {args.data_path}, crops {crops}, blur {args.blur}, "
          f"1 thread, decode included; same seed -> identical tensors: "
          f"{'yes' if equal else 'NO'}\n")
    rows = [{"pipeline": "original (torchvision/PIL)", "ips": median(speeds["pil"]),
             "all": " ".join(f"{v:.1f}" for v in speeds["pil"]), "ratio": 1.0,
             "aug": median(aug_only["pil"]), "ratio_aug": 1.0},
            {"pipeline": "ours (src/fastaugment.py)", "ips": median(speeds["fast"]),
             "all": " ".join(f"{v:.1f}" for v in speeds["fast"]), "ratio": median(ratios),
             "aug": median(aug_only["fast"]), "ratio_aug": median(ratios_aug)}]
    print_table(rows, [("pipeline", "pipeline", "{}"),
                       ("ips", "images/s decode+augment", "{:.1f}"),
                       ("all", "per round", "{}"), ("ratio", "ratio", "{:.2f}"),
                       ("aug", "images/s augment only", "{:.1f}"),
                       ("ratio_aug", "ratio", "{:.2f}")])

    # where the time goes
    print("\nbreakdown, ms per image (all crops of one image):")
    result = {"machine": machine_description(), "crops": crops, "equal_outputs": equal,
              "images_per_s": {k: median(v) for k, v in speeds.items()}, "ratio": median(ratios),
              "augment_only_images_per_s": {k: median(v) for k, v in aug_only.items()},
              "augment_only_ratio": median(ratios_aug),
              "breakdown_ms": {}}
    for name, trans in pipelines.items():
        parts, total = breakdown(n, load, trans, name)
        result["breakdown_ms"][name] = parts
        print(f"  {name:5s} " + "  ".join(f"{k} {v:.2f}" for k, v in parts.items())
              + f"  | total {1000 * total / n:.2f}")

    if args.loader_workers:
        print(f"\nDataLoader, batch {args.batch_size}, images/s of the whole loader:")
        rows, result["loader_images_per_s"] = [], {}
        for w in args.loader_workers:
            row = {"workers": w}
            for name in ("pil", "fast"):
                row[name] = loader_throughput(args, name, w)
                result["loader_images_per_s"][f"{name}_{w}"] = row[name]
            row["ratio"] = row["fast"] / row["pil"]
            rows.append(row)
        print_table(rows, [("workers", "workers", "{}"), ("pil", "original", "{:.0f}"),
                           ("fast", "ours", "{:.0f}"), ("ratio", "ratio", "{:.2f}")])
    print()
    print_json("bench_data", result)


if __name__ == "__main__":
    main()

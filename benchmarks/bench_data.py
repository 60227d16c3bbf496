"""Multi-crop augmentation speed: the original's torchvision/PIL pipeline vs ours, same JPEGs, same run.

Single process, one thread: what one DataLoader worker does per image (decode the JPEG with the
dataset's own loader, then every crop's transform). Three pipelines read the same files in the
same order; their rounds alternate and each figure is the median over rounds:
  pil         the original: torchvision/PIL, ending with ToTensor + Normalize (float32, host)
  fast_float  src/fastaugment.py ending with the same float32 host normalisation
  fast        src/fastaugment.py ending with uint8 crops (the training feed: normalised on the
              device by src/data.py to_device)
Before timing, the run checks that pil and fast_float return identical tensors under the same
seed, and that fast's uint8 crops normalised (transforms.normalize_crops) equal them to
1e-6. It also prints the bytes of one collated batch that cross PCIe, float32 vs uint8.

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

from src.multicropdataset import (MultiCropDataset, SafeImageFolder,  # noqa: E402
                                  multicrop_transforms, normalize_crops)

PIPELINES = {"pil": ("pil", True), "fast_float": ("fast", True), "fast": ("fast", False)}
LABELS = {"pil": "original (torchvision/PIL, float32 out)",
          "fast_float": "ours, float32 out (normalised on the host)",
          "fast": "ours, uint8 out (normalised on the device)"}


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


def build(args, name):
    # the dataset's own transform builder: exactly what training uses ("fast") or used ("pil")
    augment, host_normalize = PIPELINES[name]
    return multicrop_transforms(args.size_crops, args.nmb_crops, args.min_scale_crops,
                                args.max_scale_crops, blur=args.blur, augment=augment,
                                host_normalize=host_normalize)


def stages(trans, name):
    """[(stage name, callable)] of one crop transform, so that each stage can be timed."""
    if name == "pil":
        rrc, flip, colour, blur, to_tensor, normalize = trans.transforms
        return [("crop+resize", rrc), ("flip", flip), ("jitter+gray", colour), ("blur", blur),
                ("to-tensor", to_tensor), ("normalize", normalize)]
    last = "to-tensor+normalize" if trans.lut is not None else "to-tensor (uint8)"
    return [("crop+resize+flip", trans.crop), ("jitter+gray", lambda x: trans.colour(x) or x),
            ("blur", trans.blur_words), (last, trans.to_tensor)]


def run_round(load, n, trans, seed=0, cpu_times=None):
    """Images/s of what a loader worker does per image: decode, then every crop's transform.
    Also appends to `cpu_times` the images per CPU-second of this process (what one core
    delivers when it is not shared: on a loaded machine the wall time counts the waits)."""
    torch.manual_seed(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        img = load(i)
        for t in trans:
            t(img)
    if cpu_times is not None:
        cpu_times.append(n / (time.process_time() - c0))
    return n / (time.perf_counter() - t0)


def breakdown(n, loader, trans, name):
    timer = Timer()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    for i in range(n):
        with timer("decode"):
            img = loader(i)
        for t in trans:
            x = img
            for stage, fn in stages(t, name):
                with timer(stage):
                    x = fn(x)
    total = time.perf_counter() - t0
    return {k: 1000 * v / n for k, v in timer.totals.items()}, total


def loader_throughput(args, name, workers):
    ds = MultiCropDataset(args.data_path, args.size_crops, args.nmb_crops, args.min_scale_crops,
                          args.max_scale_crops, blur=args.blur)
    ds.trans = build(args, name)
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


def batch_bytes(args, images, name):
    """Bytes of one collated batch of `args.batch_size` images (all crops): what the loader
    hands over and what crosses PCIe to the GPU."""
    trans = build(args, name)
    crops = [t(images[0]) for t in trans]
    return args.batch_size * sum(c.nbytes for c in crops)


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
    pipelines = {name: build(args, name) for name in PIPELINES}
    if pipelines["fast"][0].__class__.__name__ == "Compose":
        sys.exit("error: numba is not installed, so the fast pipeline is the PIL one")

    # same seed, same tensors? (uint8 crops: once normalised as on the device)
    equal, max_diff = True, 0.0
    for k, img in enumerate(images[:16]):
        outs = {}
        for name, trans in pipelines.items():
            torch.manual_seed(1000 + k)
            outs[name] = [t(img) for t in trans]
        equal &= all(torch.equal(a, b) for a, b in zip(outs["pil"], outs["fast_float"]))
        max_diff = max([max_diff] + [(normalize_crops(b) - a).abs().max().item()
                                     for a, b in zip(outs["pil"], outs["fast"])])
    equal &= max_diff <= 1e-6

    # throughput: alternate the pipelines, median over rounds; with the decode (what a worker
    # does) and without it (the augmentations alone, on the decoded images)
    speeds = {name: [] for name in PIPELINES}
    aug_only = {name: [] for name in PIPELINES}
    per_cpu_s = {name: [] for name in PIPELINES}
    decoded = lambda i: images[i]  # noqa: E731
    names = list(PIPELINES)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            speeds[name].append(run_round(load, n, pipelines[name], seed=r,
                                          cpu_times=per_cpu_s[name]))
            aug_only[name].append(run_round(decoded, n, pipelines[name], seed=r))

    def ratio(d, name):  # per round against the original, then the median
        return median([f / p for f, p in zip(d[name], d["pil"])])

    crops = "+".join(f"{n}x{s}" for n, s in zip(args.nmb_crops, args.size_crops))
    nbytes = {name: batch_bytes(args, images, name) for name in ("pil", "fast")}
    print(f"machine: {machine_description()}   load average at end: {load_average():.2f}")
    print(f"data: {len(images)} images from {args.data_path}, crops {crops}, blur {args.blur}, "
          f"1 thread, decode included; same seed -> identical tensors (uint8 normalised: max "
          f"|diff| {max_diff:.1e}): {'yes' if equal else 'NO'}\n")
    rows = [{"pipeline": LABELS[name], "ips": median(speeds[name]),
             "all": " ".join(f"{v:.1f}" for v in speeds[name]), "ratio": ratio(speeds, name),
             "aug": median(aug_only[name]), "ratio_aug": ratio(aug_only, name),
             "cpu": median(per_cpu_s[name]), "cpu_best": max(per_cpu_s[name])}
            for name in PIPELINES]
    print_table(rows, [("pipeline", "pipeline", "{}"),
                       ("ips", "images/s decode+augment", "{:.1f}"),
                       ("all", "per round", "{}"), ("ratio", "ratio", "{:.2f}"),
                       ("aug", "images/s augment only", "{:.1f}"),
                       ("ratio_aug", "ratio", "{:.2f}"),
                       ("cpu", "images per CPU-s decode+augment", "{:.1f}"),
                       ("cpu_best", "best round", "{:.1f}")])
    print(f"\nbytes per batch of {args.batch_size} (host -> device): float32 "
          f"{nbytes['pil'] / 2 ** 20:.1f} MiB, uint8 {nbytes['fast'] / 2 ** 20:.1f} MiB "
          f"({nbytes['pil'] / nbytes['fast']:.0f}x less)")

    # where the time goes
    print("\nbreakdown, ms per image (all crops of one image):")
    result = {"machine": machine_description(), "crops": crops, "equal_outputs": equal,
              "max_diff_uint8_normalised": max_diff,
              "images_per_s": {k: median(v) for k, v in speeds.items()},
              "images_per_cpu_s": {k: median(v) for k, v in per_cpu_s.items()},
              "images_per_cpu_s_best": {k: max(v) for k, v in per_cpu_s.items()},
              "ratio": {k: ratio(speeds, k) for k in PIPELINES},
              "augment_only_images_per_s": {k: median(v) for k, v in aug_only.items()},
              "augment_only_ratio": {k: ratio(aug_only, k) for k in PIPELINES},
              "batch_bytes": {"batch_size": args.batch_size, "float32": nbytes["pil"],
                              "uint8": nbytes["fast"]},
              "breakdown_ms": {}}
    for name, trans in pipelines.items():
        parts, total = breakdown(n, load, trans, name)
        result["breakdown_ms"][name] = parts
        print(f"  {name:10s} " + "  ".join(f"{k} {v:.2f}" for k, v in parts.items())
              + f"  | total {1000 * total / n:.2f}")

    if args.loader_workers:
        print(f"\nDataLoader, batch {args.batch_size}, images/s of the whole loader:")
        rows, result["loader_images_per_s"] = [], {}
        for w in args.loader_workers:
            row = {"workers": w}
            for name in PIPELINES:
                row[name] = loader_throughput(args, name, w)
                result["loader_images_per_s"][f"{name}_{w}"] = row[name]
            rows.append(row)
        print_table(rows, [("workers", "workers", "{}")]
                    + [(name, name, "{:.0f}") for name in PIPELINES])
    print()
    print_json("bench_data", result)


if __name__ == "__main__":
    main()

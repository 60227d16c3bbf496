"""Seconds per SwAV training iteration on synthetic crops, side by side with the plain fp32 step.

One iteration is what main_swav.train() runs (it is called here): set lr, copy the uint8 crops
to the device and normalise them there, normalise the prototypes,
forward of all crops, Sinkhorn, swapped-prediction loss, backward, LARC + SGD step, loss.item().
Each configuration runs in its own process (clean peak memory, no cache shared), rounds alternate
the configurations, and each figure is the median over every timed iteration of every round.

A configuration is a '+'-joined list of:
  fp32 | bf16 | fp16   precision (bf16/fp16: torch.autocast, fp16 with a GradScaler)
  cl                   channels_last (NHWC) model and inputs
  foreach              the multi-tensor LARC step (src/lars.py); without it, the reference loop
  compile              torch.compile(model)
'fp32' alone is the baseline: plain fp32, NCHW, eager, reference LARC (the original's step).
'default' is what `main_swav.py --use_fp16 true` uses on this device.

    python benchmarks/bench_train_step.py                     # RN50, 2x224+6x96, batch 8, CPU
    python benchmarks/bench_train_step.py --device cuda --batch_size 64
    python benchmarks/bench_train_step.py --device cuda --batch_size 64 --data_path DIR --workers 15
        (real JPEGs through MultiCropDataset + the training DataLoader instead of synthetic
        crops; "data wait" is the share of the iteration spent waiting for the next batch)
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_average, machine_description, median, print_json, print_table  # noqa

import main_swav  # noqa: E402
from src.amp import resolve_amp  # noqa: E402
from src.engine import build_larc_sgd, build_loader, setup_precision  # noqa: E402
from src.multicropdataset import MultiCropDataset  # noqa: E402
from src.resnet50 import ARCHS, build_backbone  # noqa: E402

# dense fp16/bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets (SXM parts)
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "V100": 125.0, "L4": 121.0}
CPU_CONFIGS = ["fp32", "fp32+cl+foreach", "bf16+foreach", "bf16+cl+foreach"]
CUDA_CONFIGS = ["fp32", "fp32+cl+foreach", "fp16+cl+foreach", "bf16+cl+foreach",
                "fp16+cl+foreach+compile", "bf16+cl+foreach+compile"]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="resnet50", choices=sorted(ARCHS))
    p.add_argument("--nmb_crops", type=int, nargs="+", default=[2, 6])
    p.add_argument("--size_crops", type=int, nargs="+", default=[224, 96])
    p.add_argument("--batch_size", type=int, default=8, help="images per iteration (per GPU)")
    p.add_argument("--min_scale_crops", type=float, nargs="+", default=[0.14, 0.05])
    p.add_argument("--max_scale_crops", type=float, nargs="+", default=[1.0, 0.14])
    p.add_argument("--data_path", default="", help="an ImageFolder: real data through the loader")
    p.add_argument("--workers", type=int, default=10, help="loader processes (with --data_path)")
    p.add_argument("--augment", default="fast", choices=["fast", "pil"])
    p.add_argument("--nmb_prototypes", type=int, default=3000)
    p.add_argument("--feat_dim", type=int, default=128)
    p.add_argument("--hidden_mlp", type=int, default=2048)
    p.add_argument("--width", type=int, default=0)
    p.add_argument("--cifar_stem", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--configs", nargs="+", default=None,
                   help=f"default: CPU {' '.join(CPU_CONFIGS)}; CUDA {' '.join(CUDA_CONFIGS)}")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per run")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per run")
    p.add_argument("--rounds", type=int, default=3, help="runs per configuration, alternated")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--peak_tflops", type=float, default=0,
                   help="peak for MFU (default: the GPU's dense fp16/bf16 data-sheet figure)")
    p.add_argument("--_child", default="", help=argparse.SUPPRESS)
    p.add_argument("--_out", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def parse_config(name, device):
    if name == "default":  # what main_swav.py --use_fp16 true does here
        dtype, _, _ = resolve_amp(True, "auto", device)
        prec = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        return {"precision": prec, "cl": True, "foreach": True, "compile": False}
    tokens = name.split("+")
    unknown = set(tokens) - {"fp32", "bf16", "fp16", "cl", "foreach", "compile"}
    if unknown:
        raise ValueError(f"unknown configuration tokens {sorted(unknown)} in {name!r}")
    prec = [t for t in tokens if t in ("fp32", "bf16", "fp16")]
    return {"precision": prec[0] if prec else "fp32", "cl": "cl" in tokens,
            "foreach": "foreach" in tokens, "compile": "compile" in tokens}


def swav_args(args, cfg, device, lr=1e-3):
    """main_swav's own argument defaults, with this benchmark's shapes and precision."""
    a = main_swav.get_args_parser().parse_args([])
    a.nmb_crops, a.size_crops = args.nmb_crops, args.size_crops
    a.crops_for_assign, a.batch_size = [0, 1], args.batch_size
    a.nmb_prototypes, a.feat_dim, a.hidden_mlp = args.nmb_prototypes, args.feat_dim, args.hidden_mlp
    a.freeze_prototypes_niters = 0  # the steady state: prototypes are trained too
    a.queue_length, a.rank, a.world_size, a.device = 0, 0, 1, device
    a.base_lr = lr
    a.log_freq = 1  # read the loss every iteration (one host sync), so each one is timed whole
    a.use_fp16 = cfg["precision"] != "fp32"
    a.amp_dtype = {"fp32": "auto", "bf16": "bfloat16", "fp16": "float16"}[cfg["precision"]]
    a.channels_last = cfg["cl"]
    return a


class TimedLoader:
    """`n` batches from `source` (an endless iterator); records the time each batch is handed
    out and the time spent waiting for it. With log_freq 1 train() reads the loss at the end of
    every iteration, so a hand-out is after the device work of the previous iteration."""
    dataset = None

    def __init__(self, source, n):
        self.source, self.n, self.stamps, self.waits = source, n, [], []

    def __len__(self):
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            t0 = time.perf_counter()
            batch = next(self.source)
            self.stamps.append(time.perf_counter())
            self.waits.append(self.stamps[-1] - t0)
            yield batch


def endless(loader):
    while True:
        yield from loader


def count_flops(args, ncrops_shapes):
    """FLOPs of one forward + backward of the model (convolutions and matmuls, which is what
    FlopCounterMode counts), on the meta device: nothing is computed."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = build_backbone(args.arch, normalize=True, hidden_mlp=args.hidden_mlp,
                               output_dim=args.feat_dim, nmb_prototypes=args.nmb_prototypes,
                               cifar_stem=args.cifar_stem, width=args.width or None)
        crops = [torch.randn(args.batch_size, 3, s, s) for s in ncrops_shapes]
    with FlopCounterMode(display=False) as counter:
        _, out = model(crops)
        out.float().sum().backward()
    return counter.get_total_flops()


def peak_memory_bytes(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:  # process peak resident set
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def run_child(args):
    """One configuration in this process: warm-up, then timed iterations. Writes JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    cfg = parse_config(args._child, device)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # as main_swav.py on CUDA
    torch.manual_seed(0)
    sargs = swav_args(args, cfg, device)
    model = build_backbone(args.arch, normalize=True, hidden_mlp=args.hidden_mlp,
                           output_dim=args.feat_dim, nmb_prototypes=args.nmb_prototypes,
                           cifar_stem=args.cifar_stem, width=args.width or None).to(device)
    if cfg["cl"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_larc_sgd(model, sargs)
    optimizer.foreach = cfg["foreach"]
    scaler = setup_precision(sargs)
    net = torch.compile(model) if cfg["compile"] else model
    sizes = [s for n, s in zip(args.nmb_crops, args.size_crops) for _ in range(n)]
    if args.data_path:  # the real input pipeline: JPEGs -> MultiCropDataset -> DataLoader
        sargs.workers = args.workers
        dataset = MultiCropDataset(args.data_path, args.size_crops, args.nmb_crops,
                                   args.min_scale_crops, args.max_scale_crops,
                                   augment=args.augment)
        source = endless(build_loader(dataset, sargs))
    else:  # the same synthetic crops every iteration, uint8 on the CPU (pinned) like a loader's:
        # train() copies and normalises them on the device (src/data.py to_device)
        crops = [torch.randint(0, 256, (args.batch_size, 3, s, s), dtype=torch.uint8)
                 for s in sizes]
        crops = [c.pin_memory() if device.startswith("cuda") else c for c in crops]
        source = itertools.repeat(crops)
    total = args.warmup + args.iters
    schedule = np.full(total, sargs.base_lr)
    t0 = time.perf_counter()
    main_swav.train(TimedLoader(source, args.warmup), net, optimizer, 0, schedule, None, sargs,
                    scaler=scaler)
    warmup_s = time.perf_counter() - t0
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    loader = TimedLoader(source, args.iters)
    scale0 = scaler.get_scale() if scaler.is_enabled() else None
    (_, loss), _ = main_swav.train(loader, net, optimizer, 0, schedule, None, sargs, scaler=scaler)
    stamps = loader.stamps + [time.perf_counter()]
    result = {"config": args._child, "times": list(np.diff(stamps)), "warmup_s": warmup_s,
              "waits": loader.waits[1:],  # the wait for batch k+1 is inside times[k]
              "loss": loss, "peak_bytes": peak_memory_bytes(device),
              "scale_changed": scale0 is not None and scaler.get_scale() != scale0}
    with open(args._out, "w") as f:
        json.dump(result, f)


def main():
    args = get_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args._child:
        return run_child(args)
    if args.threads:
        torch.set_num_threads(args.threads)  # as the children: the machine line says so
    cuda = args.device.startswith("cuda")
    configs = args.configs or (CUDA_CONFIGS if cuda else CPU_CONFIGS)
    for c in configs:
        try:
            parse_config(c, args.device)  # fail early on a typo, in one line
        except ValueError as e:
            sys.exit(f"error: --configs: {e}")
    if "fp32" not in configs:
        configs = ["fp32"] + configs  # the baseline is always measured in the same run
    sizes = [s for n, s in zip(args.nmb_crops, args.size_crops) for _ in range(n)]
    flops = count_flops(args, sizes)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items()
                                     if cuda and k in torch.cuda.get_device_name()), 0)

    times = {c: [] for c in configs}
    waits = {c: [] for c in configs}
    extra = {c: {} for c in configs}
    passthrough = [a for a in sys.argv[1:]]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = configs if r % 2 == 0 else configs[::-1]
            for c in order:
                out = os.path.join(tmp, "result.json")
                cmd = [sys.executable, os.path.abspath(__file__), *passthrough,
                       "--device", args.device, "--_child", c, "--_out", out]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{c}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
                    extra[c]["error"] = proc.stderr.strip().splitlines()[-1][:200]
                    continue
                with open(out) as f:
                    res = json.load(f)
                times[c].extend(res["times"])
                waits[c].extend(res["waits"])
                extra[c]["peak_bytes"] = max(extra[c].get("peak_bytes") or 0, res["peak_bytes"] or 0)
                extra[c]["warmup_s"] = res["warmup_s"]
                extra[c]["loss"] = res["loss"]
                print(f"round {r}: {c:28s} {median(res['times']):.4f} s/iter  "
                      f"(load {load_average():.1f})", flush=True)

    base = median(times["fp32"])
    rows = []
    for c in configs:
        t = median(times[c])
        row = {"config": c, "s_iter": t, "ips": args.batch_size / t,
               "cps": args.batch_size * len(sizes) / t, "tflops": flops / t / 1e12,
               "mem": (extra[c].get("peak_bytes") or 0) / 2 ** 30, "ratio": base / t,
               "n": len(times[c]), "wait": 100 * sum(waits[c]) / max(sum(times[c]), 1e-9)}
        row["mfu"] = 100 * row["tflops"] / peak if peak else None
        rows.append(row)
    crops = "+".join(f"{n}x{s}" for n, s in zip(args.nmb_crops, args.size_crops))
    print(f"\nmachine: {machine_description(args.device)}")
    data = (f"JPEGs from {args.data_path} through the loader ({args.workers} workers, "
            f"augment {args.augment})" if args.data_path else "synthetic crops")
    print(f"{args.arch}, crops {crops}, batch {args.batch_size}, {data}, {args.nmb_prototypes} "
          f"prototypes; {flops / 1e9:.1f} GFLOP per iteration (forward+backward, counted); "
          f"median of {args.rounds} rounds x {args.iters} iterations; load average now "
          f"{load_average():.2f}" + (f"; MFU vs {peak:.0f} TFLOP/s dense fp16/bf16" if peak else ""))
    print()
    cols = [("config", "config", "{}"), ("s_iter", "s/iter", "{:.4f}"),
            ("ips", "images/s", "{:.1f}"), ("cps", "crops/s", "{:.0f}"),
            ("tflops", "TFLOP/s", "{:.3f}"), ("mfu", "MFU %", "{:.1f}"),
            ("mem", "peak GiB" + ("" if cuda else " (RSS)"), "{:.2f}"),
            ("ratio", "x fp32", "{:.2f}")]
    if args.data_path:
        cols.append(("wait", "data wait %", "{:.0f}"))
    print_table(rows, cols if peak else [c for c in cols if c[0] != "mfu"])
    print()
    print_json("bench_train_step", {
        "machine": machine_description(args.device), "arch": args.arch, "crops": crops,
        "batch_size": args.batch_size, "flops_per_iter": flops, "peak_tflops": peak,
        "data": data,
        "results": rows, "errors": {c: e["error"] for c, e in extra.items() if "error" in e}})


if __name__ == "__main__":
    main()

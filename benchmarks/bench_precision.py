"""fp16 (autocast + GradScaler) against fp32: the loss curves of the same SwAV run.

The same weights, the same synthetic crops (a fixed pool of batches, cycled), the same schedule;
main_swav.train one iteration at a time, so every loss is recorded. A wrong loss scale under LARC
(the double unscale of an earlier version) shows as curves that part within a few iterations.

    python benchmarks/bench_precision.py --device cuda --iters 200 --batch_size 16
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import parse_config, swav_args  # noqa: E402
from common import machine_description, print_json  # noqa: E402

import main_swav  # noqa: E402
from src.engine import build_larc_sgd, setup_precision  # noqa: E402
from src.resnet50 import ARCHS, build_backbone  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="resnet50", choices=sorted(ARCHS))
    p.add_argument("--nmb_crops", type=int, nargs="+", default=[2, 6])
    p.add_argument("--size_crops", type=int, nargs="+", default=[224, 96])
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--nmb_prototypes", type=int, default=3000)
    p.add_argument("--feat_dim", type=int, default=128)
    p.add_argument("--hidden_mlp", type=int, default=2048)
    p.add_argument("--width", type=int, default=0)
    p.add_argument("--cifar_stem", action="store_true")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--pool", type=int, default=8, help="distinct synthetic batches, cycled")
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--configs", nargs="+", default=["fp32", "fp16+cl+foreach"])
    p.add_argument("--out", default="", help="write the curves as JSON here")
    return p.parse_args(argv)


def curve(args, config):
    cfg = parse_config(config, args.device)
    sargs = swav_args(args, cfg, args.device, lr=args.lr)
    torch.manual_seed(0)
    model = build_backbone(args.arch, normalize=True, hidden_mlp=args.hidden_mlp,
                           output_dim=args.feat_dim, nmb_prototypes=args.nmb_prototypes,
                           cifar_stem=args.cifar_stem, width=args.width or None).to(args.device)
    if cfg["cl"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_larc_sgd(model, sargs)
    optimizer.foreach = cfg["foreach"]
    scaler = setup_precision(sargs)
    g = torch.Generator().manual_seed(1)
    sizes = [s for n, s in zip(args.nmb_crops, args.size_crops) for _ in range(n)]
    pool = [[torch.randn(args.batch_size, 3, s, s, generator=g) for s in sizes]
            for _ in range(args.pool)]
    schedule = np.full(args.iters, args.lr)
    losses, state = [], {}
    for it in range(args.iters):
        # one-batch "epochs": the global iteration is `it`, every loss is seen
        (_, loss), _ = main_swav.train([pool[it % args.pool]], model, optimizer, it, schedule,
                                       None, sargs, scaler=scaler, state=state)
        losses.append(loss)
    return losses, (scaler.get_scale() if scaler.is_enabled() else None)


def main():
    args = get_args()
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    curves, scales = {}, {}
    for c in args.configs:
        curves[c], scales[c] = curve(args, c)
        print(f"{c}: loss {curves[c][0]:.4f} -> {curves[c][-1]:.4f}", flush=True)
    base = np.array(curves[args.configs[0]])
    print(f"\nmachine: {machine_description(args.device)}; {args.arch}, batch {args.batch_size}, "
          f"{args.iters} iterations, lr {args.lr}, {args.pool} synthetic batches cycled")
    summary = {}
    for c in args.configs[1:]:
        d = np.abs(np.array(curves[c]) - base)
        summary[c] = {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
                      "last10_base": float(base[-10:].mean()),
                      "last10": float(np.mean(curves[c][-10:])), "final_loss_scale": scales[c]}
        print(f"{c} vs {args.configs[0]}: |loss difference| max {d.max():.4f}, mean "
              f"{d.mean():.4f}; mean of the last 10: {summary[c]['last10']:.4f} vs "
              f"{summary[c]['last10_base']:.4f}; loss scale at the end {scales[c]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"curves": curves, "summary": summary}, f)
    print_json("bench_precision", {"machine": machine_description(args.device),
                                   "summary": summary})


if __name__ == "__main__":
    main()

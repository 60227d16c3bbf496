"""Plot a run's training curves to a PNG: loss and learning rate of the pre-training (from
stats0.pkl and the iteration lines of train.log) and, when the dump_path also holds evaluations,
their per-epoch accuracy (stats_eval_linear0.pkl, stats_eval_semisup0.pkl).

    python tools/plot_stats.py DUMP_PATH [--out DUMP_PATH/plot.png]
"""
import argparse
import os
import re
import sys

import matplotlib
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# "Epoch: [e][it] ... Loss v (avg) Lr: x" (main_swav / main_deepclusterv2 log line)
ITER_LINE = re.compile(r"Epoch: \[(\d+)\]\[(\d+)\].*?Loss ([-\d.naif]+) \(([-\d.naif]+)\)"
                       r".*?Lr: ([-\d.e]+)")


def read_log(path):
    """Per logged iteration: epoch, iteration, loss, lr (empty frame without a log)."""
    rows = []
    if os.path.isfile(path):
        with open(path, errors="replace") as f:
            for line in f:
                m = ITER_LINE.search(line)
                if m:
                    rows.append((int(m.group(1)), int(m.group(2)), float(m.group(3)),
                                 float(m.group(5))))
    return pd.DataFrame(rows, columns=["epoch", "it", "loss", "lr"])


def read_stats(path):
    return pd.read_pickle(path) if os.path.isfile(path) else None


def plot(dump_path, out=None):
    """Write the PNG; returns its path. Raises FileNotFoundError when there is nothing to plot."""
    out = out or os.path.join(dump_path, "plot.png")
    stats = read_stats(os.path.join(dump_path, "stats0.pkl"))
    log = read_log(os.path.join(dump_path, "train.log"))
    evals = {name: read_stats(os.path.join(dump_path, f"stats_{name}0.pkl"))
             for name in ("eval_linear", "eval_semisup")}
    evals = {k: v for k, v in evals.items() if v is not None and len(v)}
    if (stats is None or not len(stats)) and log.empty and not evals:
        raise FileNotFoundError(f"{dump_path}: no stats0.pkl, train.log iterations or eval stats")

    panels = ["loss", "lr"] + (["acc"] if evals else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    ax = dict(zip(panels, axes))
    if not log.empty:
        # x in epochs: iterations per epoch estimated as the last logged one + the log interval
        steps = log["it"].diff()[log["epoch"].diff() == 0]
        interval = int(steps[steps > 0].min()) if (steps > 0).any() else 1
        per_epoch = log["it"].max() + interval
        x = log["epoch"] + log["it"] / per_epoch
        ax["loss"].plot(x, log["loss"], lw=0.8, alpha=0.6, label="iteration")
        ax["lr"].plot(x, log["lr"])
    if stats is not None and len(stats):
        ax["loss"].plot(stats["epoch"] + 1, stats["loss"], "o-", label="epoch average")
    ax["loss"].set(title="pre-training loss", xlabel="epoch")
    ax["loss"].legend()
    ax["lr"].set(title="learning rate", xlabel="epoch")
    for name, frame in evals.items():
        ax["acc"].plot(frame["epoch"] + 1, frame["prec1_val"], "o-", label=f"{name} val top-1")
    if evals:
        ax["acc"].set(title="accuracy (%)", xlabel="epoch")
        ax["acc"].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plot a run's loss, lr and accuracy to a PNG")
    parser.add_argument("dump_path", help="the run's --dump_path")
    parser.add_argument("--out", default=None, help="PNG path (default: DUMP_PATH/plot.png)")
    args = parser.parse_args(argv)
    try:
        print(plot(args.dump_path, args.out))
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()

"""The end-to-end demo (`make demo`): SwAV (or DeepCluster-v2, SimSiam) pre-training on the
embedded Fashion-MNIST subset, then linear and k-NN evaluation of the trained backbone, of the same
backbone untrained, and of the raw pixels, printed as a table; then the val images clustered by
the trained network (assign_clusters.py) beside k-means on the raw pixels with the same K. No
network: the data ships in data/fashion_mnist_subset.npz.

    python tools/demo.py [--method swav|deepclusterv2|simsiam] [--out demo_run] [--epochs N]

Each step runs the repository's own entry points: the pre-training (main_*.py) as a subprocess,
the evaluations (eval_linear.py, eval_knn.py, assign_clusters.py) through their main() in this
process, to save their start-up time. Their full logs stay in the run folders, the console shows
progress and the table, and demo_run/<method>/summary.json holds the numbers.
"""
import argparse
import contextlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from typing import NamedTuple

import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import make_demo_data  # noqa: E402
import plot_stats  # noqa: E402
sys.path.insert(0, ROOT)
from src.cli import check_shared_args  # noqa: E402
from src.clusters import cluster_metrics  # noqa: E402
from src import distributed as du  # noqa: E402

# the small backbone, shared by pre-training and evaluation
BACKBONE = ["--arch", "resnet18", "--cifar_stem", "true", "--width", "8"]
# 32x32 images (tuned on this data, see README "Demo"): two crops of scale 0.2-1 resized to 20x20
# (about 0.4x the step time of 32x32 on an AVX2 CPU; the evaluations see the whole 32x32 image,
# where an object is about as many pixels as in an average crop) and no Gaussian blur (a sigma-2
# blur wipes out a small crop; 16x16 multi-crops made the features worse in this budget);
# prototypes well above the feature dimension (with fewer prototypes than dimensions the head
# can map every crop orthogonally to all of them: uniform scores, loss stuck at ln K)
CROPS = ["--nmb_crops", "2", "--size_crops", "20", "--min_scale_crops", "0.2",
         "--max_scale_crops", "1", "--crops_for_assign", "0", "1", "--blur", "none"]
COMMON = ["--batch_size", "64", "--use_fp16", "true", "--log_freq", "10",
          "--checkpoint_freq", "1000"]


class Method(NamedTuple):
    label: str
    script: str
    args: list
    epochs: int
    summary: str
    prototypes: bool = True


# SwAV's epsilon 0.02 (the original's 0.05): sharper codes; over two seeds k-NN +0.5 and +0.8,
# linear -0.8 and +1.1 on this data (README "Demo", the tries of 2026-12-07)
METHODS = {
    "swav": Method("SwAV", "main_swav.py", [
        *CROPS, "--nmb_prototypes", "100", "--feat_dim", "32", "--hidden_mlp", "512",
        "--epsilon", "0.02", "--temperature", "0.1", "--base_lr", "2.4", "--final_lr", "0.0024",
        "--warmup_epochs", "1", "--freeze_prototypes_niters", "78", "--queue_length", "0",
        "--wd", "1e-6"], 80, "2 x 20x20 crops, 100 prototypes"),
    "deepclusterv2": Method("DeepCluster-v2", "main_deepclusterv2.py", [
        *CROPS, "--nmb_prototypes", "100", "100", "100", "--feat_dim", "32",
        "--hidden_mlp", "512", "--temperature", "0.1", "--base_lr", "0.6", "--final_lr", "0.0006",
        "--warmup_epochs", "1", "--wd", "1e-6"], 80, "2 x 20x20 crops, 3 x 100 k-means clusters"),
    "simsiam": Method("SimSiam", "main_simsiam.py", [
        "--size_crop", "20", "--min_scale_crop", "0.2", "--blur", "none", "--dim", "512",
        "--pred_dim", "128", "--base_lr", "0.2", "--fix_pred_lr", "true", "--wd", "5e-4"],
        80, "2 x 20x20 views, 512-d projector", prototypes=False),
}
# evaluation on 32x32 images, no resizing; the linear head trains on features computed once
SIZES = ["--resize", "32", "--center_crop", "32"]
LINEAR = ["--cache_features", "true", "--train_crop", "32", "--epochs", "100",
          "--batch_size", "256", "--lr", "0.3", "--wd", "1e-6", "--log_freq", "1000"]
KNN = ["--nb_knn", "20", "--temperature", "0.07", "--batch_size", "256"]
# two clusterings of the val images by the trained network, each beside scikit-learn k-means on
# the raw pixels with the same K = 10 (the number of classes): (1) the learned prototypes, each
# image to its nearest one (argmax), the 100 prototypes grouped into 10 by k-means on their
# vectors (measured on the 2026-12-05 demo's checkpoint: NMI 0.627 grouped, 0.529 for the 100
# prototypes themselves, whose pixel k-means K = 100 gives 0.508: NMI over many small clusters
# rewards purity, which pixels have too); SwAV and DeepCluster-v2 only, SimSiam has no
# prototypes; (2) k-means with K = 10 on the backbone's features
CLUSTERINGS = {"prototypes": ["--mode", "argmax", "--prototype_groups", "10"],
               "kmeans10": ["--mode", "kmeans", "--nmb_clusters", "10"]}
CLUSTER_VIEW = ["--thumb_size", "32", "--overview_clusters", "20", "--batch_size", "256"]
WORKERS = 2
# one torch thread: the width-8 step is faster on one thread than on two on an idle 2-core AVX2
# CPU (0.078 against 0.137 s per iteration, 2 x 20x20 crops: the small convolutions do not pay for
# the OpenMP hand-offs, and the second core is left to the two loader workers); on cores shared
# with other jobs one thread is the better setting anyway (README "Demo"); 0: torch's default
THREADS = 1

ETA_AFTER = 50  # iterations
PROGRESS = re.compile(r"Epoch: \[(\d+)\]\[(\d+)\].*?Loss -?[\d.]+ \((-?[\d.]+)\)")


def run(cmd, log_path, on_line=None):
    """Run `cmd` (python args) from the repository root, output to `log_path`; fail loudly."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-u", *cmd], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            if on_line:
                on_line(line)
        proc.wait()
    if proc.returncode != 0:
        fail(cmd[0], f"exit {proc.returncode}", log_path)


def fail(script, why, log_path):
    """End the demo: one line naming the step, then the end of its log."""
    tail = open(log_path).read().strip().splitlines()[-15:]
    sys.exit(f"error: {script} failed ({why}); end of {log_path}:\n" + "\n".join(tail))


def run_in_process(script, argv, log_path):
    """Run entry point `script`'s main(args) in this process, console output to `log_path`.

    The evaluations run here, not as subprocesses: each python + torch + torchvision start-up
    costs about 5 s of CPU on a 2-core AVX2 machine (more on a busy one), six of them a tenth of
    the demo's budget. The log files in the run folder are the entry point's own, as from the
    command line; `error: ...` ends the demo as run() does."""
    module = importlib.import_module(os.path.splitext(script)[0])
    parser = argparse.ArgumentParser(script, parents=[module.get_args_parser()])
    args = parser.parse_args(argv)
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        try:
            check_shared_args(args)
            module.main(args)
            failed = None
        except Exception as e:  # noqa: BLE001 -- reported with the log's end, as run() does
            traceback.print_exc()
            failed = e
        finally:
            du.destroy()
    if failed is not None:
        fail(script, repr(failed), log_path)


def progress_line(line, niter, epochs, elapsed):
    """The console's progress text for a train.log line with an `Epoch: [e][i]` entry, else
    None. No ETA over the first ETA_AFTER iterations: they carry the start-up (iteration 1 of
    the demo predicted 34,732 s)."""
    m = PROGRESS.search(line)
    if not m:
        return None
    done, total = int(m.group(1)) * niter + int(m.group(2)) + 1, niter * epochs
    eta = f"{elapsed / done * (total - done):.0f}s" if done > ETA_AFTER else "-"
    return (f"pre-training: epoch {int(m.group(1)) + 1}/{epochs}, iteration {done}/{total}, "
            f"loss {float(m.group(3)):.3f}, {elapsed:.0f}s elapsed, ETA {eta}")


def pretrain(method, data, dump, epochs, workers, tensorboard):
    batch = int(COMMON[COMMON.index("--batch_size") + 1])
    niter = image_count(os.path.join(data, "train")) // batch
    start = time.time()

    def on_line(line):
        text = progress_line(line, niter, epochs, time.time() - start)
        if text:
            print(f"\r  {text}   ", end="", flush=True)

    run([method.script, "--data_path", os.path.join(data, "train"), "--dump_path", dump,
         "--epochs", str(epochs), "--workers", str(workers), "--tensorboard", tensorboard,
         *BACKBONE, *COMMON, *method.args], os.path.join(dump, "console.log"), on_line)
    print()
    return time.time() - start


def image_count(folder):
    return sum(f.endswith(".png") for _, _, files in os.walk(folder) for f in files)


def evaluate(data, dump, model_args, workers, tensorboard):
    """(linear top-1, k-NN top-1, seconds) for one feature extractor."""
    start = time.time()
    os.makedirs(dump, exist_ok=True)
    common = ["--data_path", data, "--dump_path", dump, "--workers", str(workers),
              "--use_fp16", "true", "--tensorboard", tensorboard, *SIZES, *model_args]
    run_in_process("eval_linear.py", [*common, *LINEAR],
                   os.path.join(dump, "console_eval_linear.log"))
    run_in_process("eval_knn.py", [*common, *KNN], os.path.join(dump, "console_eval_knn.log"))
    linear = pd.read_pickle(os.path.join(dump, "stats_eval_linear0.pkl"))["prec1_val"].iloc[-1]
    knn = pd.read_pickle(os.path.join(dump, "stats_eval_knn0.pkl"))["top1"].iloc[-1]
    return float(linear), float(knn), time.time() - start


def cluster(data, dump, checkpoint, model_args, workers, tensorboard, flags):
    """The val images clustered by the trained network (assign_clusters.py with `flags`, one of
    CLUSTERINGS): its metrics.json, with the overview's path."""
    os.makedirs(dump, exist_ok=True)
    run_in_process("assign_clusters.py", [
        "--data_path", os.path.join(data, "val"), "--dump_path", dump, "--pretrained", checkpoint,
        "--workers", str(workers), "--tensorboard", tensorboard, *SIZES, *model_args,
        *CLUSTER_VIEW, *flags], os.path.join(dump, "console_assign_clusters.log"))
    with open(os.path.join(dump, "metrics.json")) as f:
        return {**json.load(f), "overview": os.path.join(dump, "overview.png")}


def pixel_kmeans(images, labels, k, seed=0):
    """NMI / ARI / purity against `labels` of scikit-learn k-means (k clusters, best of 10
    k-means++ starts) on the raw pixels (N x H x W uint8, scaled to [0, 1])."""
    from sklearn.cluster import KMeans
    x = images.reshape(len(images), -1).astype("float32") / 255
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    return cluster_metrics(labels, clusters)


SUMMARY_KEYS = ("total_s", "trained_linear", "trained_knn", "untrained_linear", "untrained_knn",
                "pixels_linear", "pixels_knn", "cluster_nmi", "pixels_kmeans_nmi")


def write_summary(path, **values):
    """summary.json: accuracies in %, NMI in [0, 1], times in seconds; SUMMARY_KEYS first."""
    missing = [k for k in SUMMARY_KEYS if k not in values]
    if missing:
        raise ValueError(f"summary without {missing}")
    ordered = {k: values.pop(k) for k in SUMMARY_KEYS}
    with open(path, "w") as f:
        json.dump({**ordered, **values}, f, indent=1)
        f.write("\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="self-supervised demo on embedded Fashion-MNIST")
    parser.add_argument("--method", default="swav", choices=sorted(METHODS),
                        help="pre-training method (make demo METHOD=...)")
    parser.add_argument("--out", default=os.path.join(ROOT, "demo_run"), help="run folder")
    parser.add_argument("--data", default=os.path.join(ROOT, "demo_data"),
                        help="where the ImageFolder is written")
    parser.add_argument("--epochs", type=int, default=0,
                        help="pre-training epochs (0: the method's demo setting)")
    parser.add_argument("--workers", type=int, default=WORKERS, help="data loading workers")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="torch threads of each step (OMP_NUM_THREADS; 0: torch's default)")
    parser.add_argument("--tensorboard", default="true", help="TensorBoard scalars (true/false)")
    args = parser.parse_args(argv)
    method = METHODS[args.method]
    epochs = args.epochs or method.epochs
    if args.threads > 0:  # the pre-training subprocess inherits it; the evaluations run here
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        import torch
        torch.set_num_threads(args.threads)
    t0 = time.time()

    # 1. the embedded subset as an ImageFolder (train/, val/; 32x32 RGB PNGs)
    n = make_demo_data.export(make_demo_data.DEFAULT_NPZ, args.data)
    print(f"[1/5] data: {args.data} ({'written, ' + str(n) + ' images' if n else 'up to date'};"
          " Fashion-MNIST subset, 5000 train / 1000 val, 10 classes)")

    # 2. pre-training; a fresh run each time (old checkpoints would be resumed)
    run_dir = os.path.join(args.out, args.method)
    for sub in (args.method, "untrained", "pixels"):
        shutil.rmtree(os.path.join(args.out, sub), ignore_errors=True)
    os.makedirs(run_dir)
    width = BACKBONE[BACKBONE.index("--width") + 1]
    print(f"[2/5] {method.label} pre-training: resnet18 (width {width}, CIFAR stem), {epochs} "
          f"epochs, {method.summary}")
    t_pre = pretrain(method, args.data, run_dir, epochs, args.workers, args.tensorboard)
    checkpoint = os.path.join(run_dir, "checkpoint.pth.tar")

    # 3. the same evaluations of three feature extractors
    print(f"[3/5] linear ({LINEAR[LINEAR.index('--epochs') + 1]} epochs on frozen features) and "
          f"{KNN[KNN.index('--nb_knn') + 1]}-NN evaluation")
    rows = []
    for name, dump, model_args in (
            (f"{method.label} (trained)", run_dir, [*BACKBONE, "--pretrained", checkpoint]),
            ("same net, untrained", os.path.join(args.out, "untrained"), BACKBONE),
            ("raw pixels", os.path.join(args.out, "pixels"), ["--arch", "pixels"])):
        linear, knn, seconds = evaluate(args.data, dump, model_args, args.workers,
                                        args.tensorboard)
        if dump == run_dir:
            seconds += t_pre
        rows.append((name, linear, knn, seconds))
        print(f"  {name}: linear {linear:.1f}, k-NN {knn:.1f} ({seconds:.0f}s)")

    # 4. the trained network as a clusterer, beside k-means on the raw pixels with the same K
    subset = make_demo_data.load_subset()
    clusterings, pixels_by_k = [], {}
    for name, flags in CLUSTERINGS.items():
        if name == "prototypes" and not method.prototypes:
            continue
        start = time.time()
        found = cluster(args.data, os.path.join(run_dir, f"clusters_{name}"), checkpoint,
                        BACKBONE, args.workers, args.tensorboard, flags)
        if found["clusters"] not in pixels_by_k:  # the same K, the same pixel k-means
            pixels_by_k[found["clusters"]] = pixel_kmeans(subset["x_test"], subset["y_test"],
                                                          found["clusters"])
        pixels = pixels_by_k[found["clusters"]]
        clusterings.append({"name": name, "mode": found["mode"], "K": found["clusters"],
                            "non_empty": found["non_empty"], "nmi": found["nmi"],
                            "ari": found["ari"], "pixels_kmeans_nmi": pixels["nmi"],
                            "pixels_kmeans_ari": pixels["ari"], "overview": found["overview"]})
        what = (f"its {found['prototypes']['clusters']} learned prototypes grouped into "
                f"{found['clusters']}" if name == "prototypes" else "k-means on its features")
        print(f"[4/5] clusters of the 1000 val images ({what}, K = {found['clusters']}, "
              f"{found['non_empty']} non-empty; {time.time() - start:.0f}s): {method.label} NMI "
              f"{found['nmi']:.3f} ARI {found['ari']:.3f}, raw-pixel k-means NMI "
              f"{pixels['nmi']:.3f} ARI {pixels['ari']:.3f}")
    first = clusterings[0]  # the prototypes where the method has them

    # 5. plot, table and summary
    plot = plot_stats.plot(run_dir)
    print("[5/5] results (val top-1 %, 1000 images)\n")
    print(f"  {'method':<26}{'linear top-1':>13}{'k-NN top-1':>12}{'time':>9}")
    for name, linear, knn, seconds in rows:
        print(f"  {name:<26}{linear:>13.1f}{knn:>12.1f}{seconds:>8.0f}s")
    (_, lin_s, knn_s, _), (_, lin_u, knn_u, _), (_, lin_p, knn_p, _) = rows
    print(f"\n  {method.label} - untrained: linear {lin_s - lin_u:+.1f}, k-NN {knn_s - knn_u:+.1f} "
          "(target: >= +3 / >= +3)")
    print(f"  {method.label} - raw pixels: linear {lin_s - lin_p:+.1f}, k-NN {knn_s - knn_p:+.1f} "
          "(target: >= +3 / >= +3)")
    for c in clusterings:
        print(f"  {method.label} clusters ({c['name']}, K = {c['K']}) - raw-pixel k-means: NMI "
              f"{c['nmi'] - c['pixels_kmeans_nmi']:+.3f} (target: >= +0.05)")
    total = time.time() - t0
    summary = write_summary(
        os.path.join(run_dir, "summary.json"), total_s=round(total, 1),
        **{k: round(v, 2) for k, v in (("trained_linear", lin_s), ("trained_knn", knn_s),
                                         ("untrained_linear", lin_u), ("untrained_knn", knn_u),
                                         ("pixels_linear", lin_p), ("pixels_knn", knn_p))},
        **{k: round(first[v], 4) for k, v in (("cluster_nmi", "nmi"),
                                                ("pixels_kmeans_nmi", "pixels_kmeans_nmi"),
                                                ("cluster_ari", "ari"),
                                                ("pixels_kmeans_ari", "pixels_kmeans_ari"))},
        cluster_mode=first["mode"], clusters=first["K"],
        clusterings=[{k: round(v, 4) if isinstance(v, float) else v for k, v in c.items()}
                     for c in clusterings], pretrain_s=round(t_pre, 1), epochs=epochs)
    print(f"\n  total time {total:.0f}s")
    print(f"  checkpoint: {checkpoint}")
    print(f"  logs:       {os.path.join(run_dir, 'train.log')}, eval_linear.log, eval_knn.log")
    print(f"  plot:       {plot}")
    for c in clusterings:
        print(f"  clusters:   {c['overview']} (contact sheets in "
              f"{os.path.join(os.path.dirname(c['overview']), 'sheets')})")
    print(f"  summary:    {summary}")
    if args.tensorboard.lower() in ("true", "1", "on"):
        print(f"  tensorboard --logdir {args.out}")


if __name__ == "__main__":
    main()

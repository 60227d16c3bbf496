"""Spherical k-means of a DeepCluster-v2 memory bank: our vectorised src/kmeans.py against a
loop-over-clusters baseline written the original's way (scipy sparse row lookups, one sum per
cluster), on the same memory bank and the same initial centroids, in the same run.

    python benchmarks/bench_kmeans.py                       # 200k x 128, K=3000, and 20k x 128
    python benchmarks/bench_kmeans.py --configs 20000x128x3000 --iters 10 --device cpu

Prints a table (total seconds, M-step seconds, ratios, agreement) and one JSON line.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import csr_matrix

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_average, machine_description, print_json, print_table  # noqa: E402

from src.kmeans import assign, spherical_kmeans, update_centroids  # noqa: E402


# ----------------------------------------------------------------------------- the baseline
def get_indices_sparse(data):
    """The original's lookup: for each cluster, the positions assigned to it (a CSR row each)."""
    cols = np.arange(data.size)
    M = csr_matrix((cols, (data.ravel(), cols)), shape=(int(data.max()) + 1, data.size))
    return [np.unravel_index(row.data, data.shape) for row in M]


def loop_m_step(embeddings, local_assignments, centroids):
    """The original's M-step in one process: a Python loop over clusters."""
    K, D = centroids.shape
    where_helper = get_indices_sparse(local_assignments.cpu().numpy())
    counts = torch.zeros(K, device=embeddings.device).int()
    emb_sums = torch.zeros(K, D, device=embeddings.device)
    for k in range(len(where_helper)):
        if len(where_helper[k][0]) > 0:
            emb_sums[k] = torch.sum(embeddings[where_helper[k][0]], dim=0)
            counts[k] = len(where_helper[k][0])
    mask = counts > 0
    centroids[mask] = emb_sums[mask] / counts[mask].unsqueeze(1)
    return F.normalize(centroids, dim=1, p=2)


@torch.no_grad()
def loop_kmeans(embeddings, K, nmb_kmeans_iters=10, centroids=None):
    """The original's cluster_memory k-means for one head in one process (full N x K scores).
    Returns (centroids, assignments)."""
    if centroids is None:
        centroids = embeddings[torch.randperm(len(embeddings))[:K]]
    centroids = centroids.clone()
    for n_iter in range(nmb_kmeans_iters + 1):
        # E step
        dot_products = torch.mm(embeddings, centroids.t())
        _, local_assignments = dot_products.max(dim=1)
        if n_iter == nmb_kmeans_iters:
            break
        # M step
        centroids = loop_m_step(embeddings, local_assignments, centroids)
    return centroids, local_assignments


# ----------------------------------------------------------------------------- the data
def memory_bank(n, d, k, seed, device, spread=0.6):
    """Unit-norm embeddings around k random directions (a trained network's memory bank
    clusters; `spread` is the noise norm relative to the centre)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, d, generator=g), dim=1)
    labels = torch.randint(k, (n,), generator=g)
    noise = torch.randn(n, d, generator=g) * (spread / d ** 0.5)
    return F.normalize(centres[labels] + noise, dim=1).to(device)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def run_config(n, d, k, iters, device, seed, mstep_reps):
    x = memory_bank(n, d, k, seed, device)
    torch.manual_seed(seed)
    init = x[torch.randperm(n)[:k]]
    (c_ours, a_ours, _), t_ours = timed(lambda: spherical_kmeans(x, k, iters, centroids=init),
                                        device)
    (c_loop, a_loop), t_loop = timed(lambda: loop_kmeans(x, k, iters, centroids=init), device)

    # the M-step alone, on the same assignments (the part the two really differ in)
    a = assign(x, init)
    t_m_ours = min(timed(lambda: update_centroids(x, a, init), device)[1] for _ in range(mstep_reps))
    t_m_loop = min(timed(lambda: loop_m_step(x, a, init.clone()), device)[1]
                   for _ in range(mstep_reps))
    return {
        "config": f"{n}x{d} K={k}", "n": n, "d": d, "k": k, "iters": iters,
        "ours_s": t_ours, "loop_s": t_loop, "ratio": t_loop / t_ours,
        "mstep_ours_ms": 1e3 * t_m_ours, "mstep_loop_ms": 1e3 * t_m_loop,
        "mstep_ratio": t_m_loop / t_m_ours,
        "agree": float((a_ours == a_loop).float().mean()),
        "centroid_maxdiff": float((c_ours - c_loop).abs().max()),
    }


def parse_config(s):
    try:
        n, d, k = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"config {s!r}: expected NxDxK, e.g. 200000x128x3000")
    if k > n:
        raise argparse.ArgumentTypeError(f"config {s!r}: K must not exceed N")
    return n, d, k


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=parse_config, nargs="+",
                        default=[(200000, 128, 3000), (20000, 128, 3000)],
                        help="memory banks NxDxK (rows x feature dim x clusters)")
    parser.add_argument("--iters", type=int, default=10, help="k-means iterations")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--mstep_reps", type=int, default=5, help="repeats of the M-step timing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    machine = machine_description(args.device)
    print(f"machine: {machine}; load average before: {load_average():.2f}")
    rows = [run_config(n, d, k, args.iters, args.device, args.seed, args.mstep_reps)
            for n, d, k in args.configs]
    print_table(rows, [
        ("config", "memory bank", "{}"), ("iters", "iters", "{}"),
        ("loop_s", "loop (s)", "{:.2f}"), ("ours_s", "ours (s)", "{:.2f}"),
        ("ratio", "ratio", "{:.1f}x"),
        ("mstep_loop_ms", "M-step loop (ms)", "{:.1f}"), ("mstep_ours_ms", "M-step ours (ms)", "{:.2f}"),
        ("mstep_ratio", "M-step ratio", "{:.0f}x"),
        ("agree", "same assignments", "{:.4%}"), ("centroid_maxdiff", "max |dc|", "{:.1e}"),
    ])
    print(f"load average after: {load_average():.2f}")
    print_json("kmeans", {"machine": machine, "device": args.device, "rows": rows})


if __name__ == "__main__":
    main()

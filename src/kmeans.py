"""Distributed spherical k-means over a memory bank (DeepCluster-v2).

Same semantics as the original's `cluster_memory`: rank 0 draws the initial centroids with
`torch.randperm` from the global torch RNG and broadcasts them; each iteration assigns every row
to the centroid of largest dot product (E-step), then sets each centroid to the L2-normalised mean
of its rows over all ranks (M-step; an empty cluster keeps its previous centroid); a final E-step
gives the assignments. Each rank holds only its own rows; the per-cluster sums and counts are
all-reduced.

The original loops over the K clusters in Python (scipy sparse row lookups, one small sum per
cluster); here the M-step is one `index_add_` and one `bincount`, and the E-step works on row
chunks so that the N x K score matrix never exists at once (1.2M x 3000 fits).
"""
import torch
import torch.nn.functional as F

from . import distributed as du
from .errors import UsageError

# scores computed per E-step chunk: on a CPU 1M floats (4 MB, stays in cache: ~1.5x faster than
# 16 MB chunks and 3-5x faster than the full matrix); on a GPU 64M floats (256 MB, few launches)
CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 26}


@torch.no_grad()
def init_centroids(embeddings, K):
    """K rows of rank 0's embeddings drawn with the global torch RNG (only rank 0 consumes it),
    broadcast to every rank."""
    if len(embeddings) < K:
        raise UsageError(f"k-means with {K} clusters needs at least {K} samples per process, this "
                         f"one holds {len(embeddings)} (lower --nmb_prototypes or use more data)")
    if du.get_rank() == 0:
        centroids = embeddings[torch.randperm(len(embeddings))[:K]]
    else:
        centroids = torch.empty(K, embeddings.shape[1], dtype=embeddings.dtype,
                                device=embeddings.device)
    return du.broadcast(centroids, 0)


@torch.no_grad()
def assign(embeddings, centroids, chunk_rows=None):
    """E-step: for each row, the index of the centroid of largest dot product (first one on a
    tie, like `max(dim=1)`), computed chunk by chunk into one reused score buffer."""
    n, K = len(embeddings), len(centroids)
    budget = CHUNK_ELEMENTS.get(embeddings.device.type, CHUNK_ELEMENTS["cuda"])
    chunk_rows = chunk_rows or max(1, budget // max(K, 1))
    chunk_rows = min(chunk_rows, max(n, 1))
    ct = centroids.t()
    scores = torch.empty(chunk_rows, K, dtype=embeddings.dtype, device=embeddings.device)
    out = torch.empty(n, dtype=torch.long, device=embeddings.device)
    for start in range(0, n, chunk_rows):
        end = min(start + chunk_rows, n)
        buf = scores[: end - start]
        torch.mm(embeddings[start:end], ct, out=buf)
        out[start:end] = buf.max(dim=1)[1]
    return out


@torch.no_grad()
def update_centroids(embeddings, assignments, centroids):
    """M-step: global per-cluster means, L2-normalised; an empty cluster keeps its centroid.
    Returns (new centroids, global counts)."""
    K = len(centroids)
    counts = torch.bincount(assignments, minlength=K)
    emb_sums = torch.zeros_like(centroids).index_add_(0, assignments, embeddings)
    du.all_reduce(counts)
    du.all_reduce(emb_sums)
    mask = counts > 0
    centroids = centroids.clone()
    centroids[mask] = emb_sums[mask] / counts[mask].unsqueeze(1)
    return F.normalize(centroids, dim=1, p=2), counts


@torch.no_grad()
def spherical_kmeans(embeddings, K, nmb_kmeans_iters=10, centroids=None, chunk_rows=None):
    """Cluster this rank's rows (all ranks call, with the same K).

    `centroids`: initial centroids (the same on every rank); by default drawn by
    `init_centroids`. Returns (centroids K x D, local assignments N, global cluster sizes K)."""
    if centroids is None:
        centroids = init_centroids(embeddings, K)
    for _ in range(nmb_kmeans_iters):
        local_assignments = assign(embeddings, centroids, chunk_rows)
        centroids, _ = update_centroids(embeddings, local_assignments, centroids)
    local_assignments = assign(embeddings, centroids, chunk_rows)
    counts = du.all_reduce(torch.bincount(local_assignments, minlength=K))
    return centroids, local_assignments, counts


def all_gather_cat(tensor):
    """Every rank's tensor (same shape on each rank) concatenated in rank order, on every rank."""
    return torch.cat(du.all_gather(tensor))


def scatter_assignments(size_dataset, local_assignments, local_index):
    """Dataset-sized vector of every rank's assignments at its dataset indices; -100 (the
    cross-entropy's ignore_index) where no rank holds the sample."""
    assignments = torch.full((size_dataset,), -100, dtype=torch.long)
    indexes_all = all_gather_cat(local_index).cpu()
    assignments[indexes_all] = all_gather_cat(local_assignments).cpu()
    return assignments


def cluster_size_stats(counts, nmb_samples=None):
    """Empty clusters and the largest cluster's share, from global cluster sizes."""
    total = int(counts.sum()) if nmb_samples is None else nmb_samples
    return {
        "empty": int((counts == 0).sum()),
        "largest_share": float(counts.max()) / max(total, 1),
        "samples": total,
    }

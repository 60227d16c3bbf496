"""Spherical k-means (src/kmeans.py): the original's loop-over-clusters k-means as reference,
recovery of separated clusters, empty clusters, 2 gloo processes = 1 process on the union,
-100 for unseen samples, cluster-size statistics."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import free_port

from benchmarks.bench_kmeans import loop_kmeans, loop_m_step
from src import kmeans


@pytest.fixture(autouse=True)
def _one_thread():
    # small matrices: threads only add OpenMP waits on a shared CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _clusters(n_per, k, d, spread, seed=0):
    """Unit vectors around k orthogonal directions; returns (x, labels, centres)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(d)[:k]
    labels = torch.arange(k).repeat_interleave(n_per)
    x = F.normalize(centres[labels] + spread * torch.randn(len(labels), d, generator=g), dim=1)
    perm = torch.randperm(len(labels), generator=g)
    return x[perm], labels[perm], centres


def test_chunked_e_step_equals_full_matrix():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(300, 32, generator=g), dim=1)
    c = F.normalize(torch.randn(57, 32, generator=g), dim=1)
    full = torch.mm(x, c.t()).max(dim=1)[1]
    for rows in (1, 7, 256, 5000):
        assert torch.equal(kmeans.assign(x, c, chunk_rows=rows), full)
    # ties go to the first centroid, like max(dim=1)
    assert kmeans.assign(x[:3], torch.cat([c[:1], c[:1]])).tolist() == [0, 0, 0]


def test_same_as_the_originals_loop_over_clusters():
    g = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(3000, 24, generator=g), dim=1)
    init = x[torch.randperm(3000, generator=g)[:40]]
    c_ours, a_ours, counts = kmeans.spherical_kmeans(x, 40, 10, centroids=init.clone())
    c_ref, a_ref = loop_kmeans(x, 40, 10, centroids=init)
    assert torch.equal(a_ours, a_ref)
    torch.testing.assert_close(c_ours, c_ref, rtol=0, atol=1e-6)
    assert torch.equal(counts, torch.bincount(a_ref, minlength=40))


def test_m_step_equals_loop_and_keeps_empty_cluster():
    x, labels, centres = _clusters(20, 3, 8, 0.1)
    # centroid 3 points away from cluster 0 and across the others: it gets no sample (a unit
    # vector that renormalises to itself exactly)
    first = [int(torch.nonzero(labels == k)[0]) for k in range(3)]
    init = torch.cat([x[first], -centres[:1]])
    a = kmeans.assign(x, init)
    assert (a == 3).sum() == 0
    new, counts = kmeans.update_centroids(x, a, init)
    assert counts[3] == 0 and torch.equal(new[3], init[3])
    torch.testing.assert_close(new, loop_m_step(x, a, init.clone()), rtol=0, atol=1e-6)
    torch.testing.assert_close(new.norm(dim=1), torch.ones(4))
    # through the whole k-means too
    c, a, counts = kmeans.spherical_kmeans(x, 4, 10, centroids=init)
    assert counts[3] == 0 and torch.equal(c[3], init[3])
    assert kmeans.cluster_size_stats(counts)["empty"] == 1


def test_recovers_well_separated_clusters():
    x, labels, centres = _clusters(50, 5, 16, 0.15, seed=3)
    # start each centroid at a sample of a different cluster, its noisiest one
    noisiest = [int(torch.nonzero(labels == k)[(x[labels == k] @ centres[k]).argmin()])
                for k in range(5)]
    c, a, counts = kmeans.spherical_kmeans(x, 5, 10, centroids=x[noisiest])
    assert torch.equal(a, labels)
    assert counts.tolist() == [50] * 5
    assert (c * centres).sum(dim=1).min() > 0.99  # the centroids sit on the true directions
    # from the original's random initial centroids, with more centroids than clusters, a
    # cluster may be split but no two are merged
    torch.manual_seed(0)
    _, a, _ = kmeans.spherical_kmeans(x, 15, 10)
    for k in range(15):
        assert len(torch.unique(labels[a == k])) <= 1


def test_init_draws_randperm_from_global_rng_and_checks_size():
    x = F.normalize(torch.randn(30, 4), dim=1)
    torch.manual_seed(5)
    c = kmeans.init_centroids(x, 7)
    torch.manual_seed(5)
    assert torch.equal(c, x[torch.randperm(30)[:7]])
    with pytest.raises(ValueError, match="at least 31 samples"):
        kmeans.init_centroids(x, 31)


def test_unseen_indices_get_minus_100_and_stats():
    a = kmeans.scatter_assignments(10, torch.tensor([2, 0, 1]), torch.tensor([7, 3, 0]))
    assert a.tolist() == [1, -100, -100, 0, -100, -100, -100, 2, -100, -100]
    stats = kmeans.cluster_size_stats(torch.tensor([0, 3, 1, 0]))
    assert stats == {"empty": 2, "largest_share": 0.75, "samples": 4}


# ----------------------------------------------------------------------------- 2 processes
def _worker(rank, port, parts, index_parts, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        torch.manual_seed(11)  # every rank seeds alike; only rank 0 draws
        rng_before = torch.get_rng_state()
        c, a, counts = kmeans.spherical_kmeans(parts[rank], 6, 10, chunk_rows=13)
        full = kmeans.scatter_assignments(500, a, index_parts[rank])
        torch.save({"c": c, "a": a, "counts": counts, "full": full,
                    "rng_untouched": torch.equal(rng_before, torch.get_rng_state())},
                   os.path.join(out_dir, f"r{rank}.pth"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process_on_the_union(tmp_path):
    g = torch.Generator().manual_seed(4)
    x = F.normalize(torch.randn(400, 12, generator=g), dim=1)
    index = torch.randperm(500, generator=g)[:400]  # 100 dataset images in no memory bank
    parts, index_parts = [x[:200], x[200:]], [index[:200], index[200:]]
    # fork: the children start with torch imported (spawn's fresh interpreters cost ~10 s here)
    mp.start_processes(_worker, args=(free_port(), parts, index_parts, str(tmp_path)), nprocs=2,
                       start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"r{r}.pth", weights_only=True) for r in (0, 1))

    torch.manual_seed(11)
    init = parts[0][torch.randperm(200)[:6]]  # rank 0's draw
    c, a, counts = kmeans.spherical_kmeans(x, 6, 10, centroids=init)
    assert torch.equal(torch.cat([r0["a"], r1["a"]]), a)
    torch.testing.assert_close(r0["c"], c, rtol=0, atol=1e-6)
    assert torch.equal(r0["c"], r1["c"]) and torch.equal(r0["counts"], counts)
    assert torch.equal(r1["counts"], counts)
    expected = torch.full((500,), -100, dtype=torch.long)
    expected[index] = a
    assert torch.equal(r0["full"], expected) and torch.equal(r1["full"], expected)
    assert not r0["rng_untouched"] and r1["rng_untouched"]

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port

from src.sinkhorn import distributed_sinkhorn


def original_sinkhorn(out, epsilon, iters):
    """The original's algorithm, one process, no max subtraction (float64 for reference)."""
    Q = torch.exp(out.double() / epsilon).t()
    B, K = Q.shape[1], Q.shape[0]
    Q /= Q.sum()
    for _ in range(iters):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def scores(B=32, K=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(B, 16, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(K, 16, generator=g), dim=1)
    return z @ c.t()


def test_rows_are_assignments_and_prototypes_balanced():
    out = scores(B=64, K=8)
    Q = distributed_sinkhorn(out, 0.05, 3)
    assert Q.shape == (64, 8)
    # each sample's codes sum to 1
    torch.testing.assert_close(Q.sum(dim=1), torch.ones(64), rtol=0, atol=1e-5)
    # each prototype gets about B/K samples (approximately after 3 iterations): far more
    # balanced than the plain softmax of the same scores
    col = Q.sum(dim=0)
    assert torch.allclose(col, torch.full((8,), 64 / 8), rtol=0.35), col
    softmax_col = torch.softmax(out / 0.05, dim=1).sum(dim=0)
    assert col.std() < 0.75 * softmax_col.std()
    # and more iterations make it exact
    col = distributed_sinkhorn(out, 0.05, 50).sum(dim=0)
    torch.testing.assert_close(col, torch.full((8,), 8.0), rtol=1e-3, atol=1e-3)


def test_matches_original_algorithm():
    out = scores(B=40, K=12, seed=1)
    ours = distributed_sinkhorn(out, 0.05, 3)
    ref = original_sinkhorn(out, 0.05, 3)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-7)


def test_invariant_to_constant_shift():
    out = scores(seed=2)
    torch.testing.assert_close(distributed_sinkhorn(out, 0.05, 3),
                               distributed_sinkhorn(out + 0.37, 0.05, 3), rtol=1e-5, atol=1e-6)


def test_no_overflow_small_epsilon_and_fp16_input():
    out = 0.9 + 0.1 * scores(seed=3)  # scores near 1: exp(1 / 0.01) = e^100 overflows fp32
    assert not torch.isfinite(torch.exp(out / 0.01)).all()
    Q = distributed_sinkhorn(out, 0.01, 3)
    assert torch.isfinite(Q).all()
    torch.testing.assert_close(Q.sum(dim=1), torch.ones(out.shape[0]), rtol=0, atol=1e-5)
    Qh = distributed_sinkhorn(out.half(), 0.05, 3)
    assert Qh.dtype == torch.float32 and torch.isfinite(Qh).all()


def _worker(rank, world, port, out, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        B = out.shape[0] // world
        q = distributed_sinkhorn(out[rank * B:(rank + 1) * B], 0.05, 3)
        result[rank * B:(rank + 1) * B] = q
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_rank_on_concatenated_batch():
    out = scores(B=48, K=6, seed=4)
    result = torch.zeros_like(out).share_memory_()
    mp.spawn(_worker, args=(2, free_port(), out, result), nprocs=2, join=True)
    torch.testing.assert_close(result, distributed_sinkhorn(out, 0.05, 3), rtol=1e-5, atol=1e-6)

"""Distributed Sinkhorn-Knopp: soft, equipartitioned assignments of samples to prototypes."""
import torch
import torch.distributed as dist

from . import distributed as du


@torch.no_grad()
def distributed_sinkhorn(out, epsilon=0.05, sinkhorn_iterations=3):
    """Return Q (B x K): for each local sample, its assignment over the K prototypes.

    `out` holds the local B x K scores (z . c). The batch is the union over all ranks: the total
    and the per-prototype sums are all-reduced, the per-sample sums are local, as in the original.
    Computed in fp32; the global max is subtracted before exp, which cancels in the first
    normalisation, so the result equals the original's while not overflowing for small epsilon.
    """
    out = out.float()
    world_size = du.get_world_size()
    max_score = du.all_reduce(out.max().clone(), dist.ReduceOp.MAX)
    Q = torch.exp((out - max_score) / epsilon).t()  # K x B
    B = Q.shape[1] * world_size  # number of samples to assign
    K = Q.shape[0]  # number of prototypes

    # make the matrix sum to 1
    Q /= du.all_reduce(torch.sum(Q))
    for _ in range(sinkhorn_iterations):
        # rows: each prototype gets total weight 1/K
        Q /= du.all_reduce(torch.sum(Q, dim=1, keepdim=True))
        Q /= K
        # columns: each sample gets total weight 1/B
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B  # the columns must sum to 1 so that Q is an assignment
    return Q.t()

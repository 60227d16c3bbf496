"""Every torch.distributed collective gets its tensors on the backend's device (NCCL takes CUDA
tensors only), wherever the caller holds them, and the caller gets its result back where it was.

No GPU here: the process group is faked as rank 0 of 2 under nccl, and `src.distributed._move`
(the one place that moves a tensor between devices) is swapped for one that "moves" a tensor to
the emulated GPU by copying it into an `OnGPU` tensor. The faked collectives refuse any tensor
that is not an `OnGPU` one, i.e. one that never went to the GPU, as NCCL would. Both ranks are
emulated as holding the same tensors: a sum doubles, a gather repeats.
"""
import pytest
import torch
import torch.distributed as dist

from conftest import entry_args, make_split_folder

import eval_knn
from src import distributed as du
from src import kmeans, preemption
from src.engine import EpochProgress, gather_to_rank0
from src.evaluation import ClassificationMeter, knn_classify
from src.monitor import CollapseMonitor
from src.runstate import EpochState
from src.sinkhorn import distributed_sinkhorn


class OnGPU(torch.Tensor):
    """A tensor on the emulated CUDA device (its data stays in host memory)."""


def _fake_move(tensor, device):
    # a copy, as a real host <-> device transfer: a caller's tensor is never the one reduced
    if device.type == "cuda":
        return tensor if isinstance(tensor, OnGPU) else tensor.clone().as_subclass(OnGPU)
    if isinstance(tensor, OnGPU):
        return tensor.as_subclass(torch.Tensor).clone().to(device)
    return tensor.to(device)


@pytest.fixture
def nccl(monkeypatch):
    """Rank 0 of 2 under a faked nccl group; returns the names of the collectives called."""
    calls = []

    def check(name, *tensors):
        for t in tensors:
            if not isinstance(t, OnGPU):
                raise AssertionError(f"{name} got a {t.device.type} tensor {tuple(t.shape)} "
                                     f"under nccl (NCCL takes CUDA tensors only)")
        calls.append(name)

    def all_reduce(t, op=dist.ReduceOp.SUM, group=None, async_op=False):
        check("all_reduce", t)
        if op == dist.ReduceOp.SUM:
            t.mul_(2)  # MAX/MIN of two equal tensors leave them as they are

    def broadcast(t, src=0, group=None, async_op=False):
        check("broadcast", t)

    def all_gather(parts, t, group=None, async_op=False):
        check("all_gather", t, *parts)
        for p in parts:
            p.copy_(t)

    def gather(t, gather_list=None, dst=0, group=None, async_op=False):
        check("gather", t, *(gather_list or []))
        for p in gather_list or []:
            p.copy_(t)

    fakes = {"is_available": lambda: True, "is_initialized": lambda: True,
             "get_backend": lambda group=None: "nccl", "get_world_size": lambda group=None: 2,
             "get_rank": lambda group=None: 0, "all_reduce": all_reduce, "broadcast": broadcast,
             "all_gather": all_gather, "gather": gather, "barrier": lambda *a, **kw: None,
             # pickled objects (the dump-path lock's verdict): torch moves them itself
             "broadcast_object_list": lambda objs, *a, **kw: calls.append("broadcast_object"),
             "destroy_process_group": lambda *a, **kw: None}
    for name, fake in fakes.items():
        monkeypatch.setattr(dist, name, fake)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(du, "_move", _fake_move, raising=False)  # raising=False: old code lacks it
    monkeypatch.setattr(du, "_make", lambda values, dtype, device: _fake_move(
        torch.tensor(values, dtype=dtype), device), raising=False)
    return calls


def _on_host(t):
    """The caller gets a plain (host) tensor back, not the emulated GPU's copy."""
    return torch.is_tensor(t) and not isinstance(t, OnGPU) and t.device.type == "cpu"


def test_fake_collectives_refuse_host_tensors(nccl):
    # the check can fail: a host tensor handed to the faked NCCL directly is refused
    with pytest.raises(AssertionError, match="cpu tensor"):
        dist.all_reduce(torch.ones(3))


def test_helpers_move_reduce_and_give_back_in_place(nccl):
    t = torch.arange(4.0)
    out = du.all_reduce(t)
    assert out is t and _on_host(t) and t.tolist() == [0.0, 2.0, 4.0, 6.0]  # in place
    b = torch.arange(3)
    assert du.broadcast(b, 0) is b and _on_host(b)
    parts = du.all_gather(torch.ones(2))
    assert len(parts) == 2 and all(_on_host(p) for p in parts)
    gathered = du.gather(torch.ones(2), dst=0)
    assert len(gathered) == 2 and all(_on_host(p) for p in gathered)
    assert du.backend_device() == torch.device("cuda", 0)
    assert nccl == ["all_reduce", "broadcast", "all_gather", "gather"]


def test_sinkhorn_under_nccl(nccl):
    out = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    q = distributed_sinkhorn(out)
    assert _on_host(q) and "all_reduce" in nccl
    nccl.clear()
    # two ranks holding the same scores: the assignment of one process over both copies
    reference = _one_process(lambda: distributed_sinkhorn(torch.cat([out, out])))
    torch.testing.assert_close(q, reference[:6])


def _one_process(fn):
    """Run `fn` with no process group (the fixture's fakes are undone for the call)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dist, "is_initialized", lambda: False)
        return fn()


def test_kmeans_under_nccl(nccl):
    g = torch.Generator().manual_seed(1)
    emb = torch.nn.functional.normalize(torch.randn(20, 4, generator=g), dim=1)
    centroids, local, counts = kmeans.spherical_kmeans(emb, 3, 2)  # rank 0 draws, broadcasts
    assert "broadcast" in nccl and "all_reduce" in nccl
    assert all(_on_host(t) for t in (centroids, local, counts))
    c0 = emb[:3].clone()
    ref_c, ref_local, ref_counts = _one_process(lambda: kmeans.spherical_kmeans(emb, 3, 2, c0))
    c, local, counts = kmeans.spherical_kmeans(emb, 3, 2, c0)
    # the in-place all-reduced sums and counts came back: same means, counts of both ranks
    torch.testing.assert_close(c, ref_c)
    assert torch.equal(local, ref_local) and torch.equal(counts, 2 * ref_counts)
    index = torch.arange(20)
    assignments = kmeans.scatter_assignments(20, local, index)
    assert torch.equal(assignments, local) and "all_gather" in nccl


def test_collapse_monitor_with_deepclusterv2s_host_tensors(nccl):
    # main_deepclusterv2: the loss on the model's device, the assignments (cluster_memory's
    # [heads, N] tensor indexed by the batch's dataset indexes) on the host
    assignments = torch.tensor([[0, 1, 2, 2, -100, 1], [3, 3, 0, 1, 2, -100]])
    idx = torch.tensor([0, 2, 3, 4])
    mon = CollapseMonitor([3, 4], patience=2, stop=True)
    for it in range(3):
        mon.update(torch.tensor(2.0), assignments=[a[idx] for a in assignments], iteration=it)
    summary = mon.epoch_summary(0)
    assert nccl.count("all_reduce") == 4  # the stop flag each iteration, the epoch's statistics
    assert summary["prototypes_used"] == [2, 4]
    assert summary["loss_over_ln_k"] == pytest.approx(2.0 / mon.ln_k)


def test_meters_gathers_and_preemption_under_nccl(nccl, monkeypatch, tmp_path):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    meter = ClassificationMeter()
    meter.update(torch.tensor(0.5), torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 0]))
    loss, top1, top5 = meter.summary()
    assert (loss, top1, top5) == pytest.approx((0.5, 50.0, 100.0))

    bank = torch.arange(6.0).view(2, 3)
    nccl.clear()
    stacked = gather_to_rank0(bank)  # a checkpoint's queues / memory banks: to rank 0 only
    assert nccl == ["gather"]
    assert _on_host(stacked) and stacked.shape == (2, 2, 3) and torch.equal(stacked[1], bank)

    # a stop request: the ranks agree (all_reduce), every rank's loss meter is gathered for
    # the mid-epoch checkpoint, then rank 0's exit status is broadcast
    preemption.reset()
    try:
        preemption._state.installed, preemption._state.received = True, "SIGUSR1"
        args = entry_args("main_swav", ["--dump_path", str(tmp_path)], rank=0, world_size=2)
        state = EpochState()
        progress = EpochProgress([0, 1, 2], 0, args, state=state)
        uploads = []  # host -> GPU copies: a blocking one waits for every queued kernel

        def recording_move(tensor, device):
            if device.type == "cuda" and not isinstance(tensor, OnGPU):
                uploads.append(tensor.dtype)
            return _fake_move(tensor, device)
        monkeypatch.setattr(du, "_move", recording_move)
        for it, _, _ in progress:
            progress.update(it, 1.5, 4, 0.1)
        assert state["stopped_at"] == 1 and state["loss_meter"] == [[6.0, 4], [6.0, 4]]
        assert torch.int32 not in uploads  # the stop flag is made on the GPU, not copied there
        with pytest.raises(SystemExit) as exit_:
            preemption.exit_after_checkpoint(args)
        assert exit_.value.code == preemption.REQUEUE_EXIT_CODE
    finally:
        preemption.reset()
    assert {"all_reduce", "all_gather", "broadcast"} <= set(nccl)


def test_knn_under_nccl(nccl, tmp_path):
    g = torch.Generator().manual_seed(3)
    train_x, train_y = torch.randn(12, 4, generator=g), torch.arange(12) % 3
    scores = knn_classify(train_x, train_y, torch.randn(5, 4, generator=g), 3, k=4)
    assert _on_host(scores) and scores.shape == (5, 3)
    # the whole evaluation, as rank 0 of 2 (the other rank emulated as extracting the same)
    data = make_split_folder(tmp_path / "data", 3, 2)
    res = eval_knn.main(eval_knn.get_args_parser().parse_args(
        ["--data_path", data, "--arch", "pixels", "--resize", "8", "--center_crop", "8",
         "--batch_size", "4", "--workers", "0", "--nb_knn", "3", "--dump_path",
         str(tmp_path / "knn")]))
    assert set(res) == {3} and "all_gather" in nccl and "all_reduce" in nccl

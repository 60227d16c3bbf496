"""Host syncs on the training hot path, counted on the CPU.

A host sync is a point where Python reads a value the device computes: `.item()`, `.tolist()`,
`bool()`/`float()`/`int()` of a tensor (on CUDA each waits for every queued kernel), or reading a
collective's result. Each such call is counted while `train()` runs: the default path reads the
losses and the non-finite checks once per log interval (src/progress.py EpochProgress.flush); with
a GradScaler its own inf check adds one per step. (A CUDA -> CPU copy is a sync too, invisible
on a CPU: `torch.cuda.set_sync_debug_mode("warn")` shows those on a GPU.)"""
import numpy as np
import pytest
import torch

import main_simsiam
import main_swav
from conftest import entry_args
from src import distributed as du
from src import preemption
from src.engine import NonFiniteLossError, build_larc_sgd
from src.monitor import CollapseMonitor
from src.resnet50 import resnet18
from src.simsiam import SimSiam
from test_fastpath import ListLoader, crops, tiny_args, tiny_model

READS = ["item", "tolist", "__bool__", "__float__", "__int__"]


@pytest.fixture(autouse=True)
def _clean():
    preemption.reset()
    yield
    preemption.reset()


class SyncCounter:
    """Counts the host reads of tensors while active (monkeypatched Tensor methods)."""

    def __init__(self, monkeypatch):
        self.count, self.active = 0, False
        for name in READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(original))
        summary = CollapseMonitor.epoch_summary

        def once_per_epoch(monitor, *a, **kw):  # after the loop: not the hot path
            active, self.active = self.active, False
            try:
                return summary(monitor, *a, **kw)
            finally:
                self.active = active
        monkeypatch.setattr(CollapseMonitor, "epoch_summary", once_per_epoch)

    def _wrap(self, original):
        counter = self

        def read(tensor, *a, **kw):
            if counter.active:
                counter.count += 1
            return original(tensor, *a, **kw)
        return read

    def __enter__(self):
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False


ITERS, LOG_FREQ = 6, 3
READS_ALLOWED = ITERS // LOG_FREQ + 1  # the log iterations 0 and 3, and the end of the epoch


def swav_run(monkeypatch, scaler=None, monitor=False):
    args = tiny_args(log_freq=LOG_FREQ)
    model = tiny_model()
    optimizer = build_larc_sgd(model, args)
    mon = CollapseMonitor.from_args(args, args.nmb_prototypes) if monitor else None
    loader = ListLoader([crops(seed) for seed in range(ITERS)])
    counter = SyncCounter(monkeypatch)
    with counter:
        (_, loss), _ = main_swav.train(loader, model, optimizer, 0, np.full(ITERS, 0.5), None,
                                       args, scaler=scaler, monitor=mon)
    return counter.count, loss


def test_swav_fp32_reads_once_per_log_interval(monkeypatch):
    count, loss = swav_run(monkeypatch, monitor=True)
    # before: bool(isfinite(loss)), the gradient check, loss.item() and the monitor's float(loss)
    # in every step (4 x 6 = 24)
    assert count <= READS_ALLOWED, count
    assert np.isfinite(loss)


def test_swav_with_grad_scaler_only_the_scalers_own_check_per_step(monkeypatch):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    count, loss = swav_run(monkeypatch, scaler=scaler)
    # the scaler's step reads its found-inf flag once per step; nothing else but the flushes
    # (before: 5 more per step: bool(isfinite(loss)), get_scale() twice, loss.item() twice)
    assert count <= ITERS + READS_ALLOWED, count
    assert np.isfinite(loss)


def test_simsiam_reads_once_per_log_interval(monkeypatch):
    args = main_simsiam.get_args_parser().parse_args(["--log_freq", str(LOG_FREQ)])
    args.rank, args.world_size, args.device, args.use_fp16 = 0, 1, "cpu", False
    torch.manual_seed(0)
    model = SimSiam(resnet18(cifar_stem=True, width=8), dim=16, pred_dim=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = ListLoader([crops(seed, sizes=(16, 16)) for seed in range(ITERS)])
    counter = SyncCounter(monkeypatch)
    with counter:
        _, loss, z_std = main_simsiam.train(loader, model, optimizer, 0, [0.05] * ITERS, args)
    # + 1: the collapse metric's epoch average, read once at the end
    assert counter.count <= READS_ALLOWED + 1, counter.count
    assert np.isfinite(loss) and z_std > 0


def test_distributed_stop_check_once_per_log_interval_in_the_same_read(monkeypatch):
    """With several ranks the stop request is an all-reduce: made at the log iterations only,
    its result read together with the losses."""
    reduces = []

    def all_reduce(t, op=None):  # a fake 2-rank group: this rank's flag is the maximum
        if t.dtype == torch.int32 and t.numel() == 2:  # the stop flag, the steps to the next
            reduces.append(t.clone())
        return t
    monkeypatch.setattr(du, "get_world_size", lambda: 2)
    monkeypatch.setattr(du, "all_reduce", all_reduce)  # every collective goes through du
    preemption.install()
    count, _ = swav_run(monkeypatch)
    assert len(reduces) == ITERS // LOG_FREQ  # iterations 0 and 3 (before: every step)
    assert count <= READS_ALLOWED, count


def test_deferred_check_stops_at_the_read_naming_the_first_bad_iteration(monkeypatch):
    """The guarantee of backward_and_step's immediate check, kept at the log interval: a NaN
    loss at iteration 1 stops the epoch when it is read (at the log iteration 3), before train()
    returns, so before any checkpoint."""
    real, calls = main_swav.swav_loss, []

    def nan_at_1(*a, **kw):
        calls.append(1)
        loss = real(*a, **kw)
        return loss * float("nan") if len(calls) == 2 else loss
    monkeypatch.setattr(main_swav, "swav_loss", nan_at_1)
    with pytest.raises(NonFiniteLossError, match="loss is nan at iteration 1.*not overwritten"):
        swav_run(monkeypatch)
    assert len(calls) == LOG_FREQ + 1  # iterations 0 .. 3: stopped at the read of iteration 3


def test_deepclusterv2_reads_once_per_log_interval(monkeypatch):
    """The loop only: the k-means at the start of the epoch (cluster_memory) and the monitor's
    epoch summary read their results once per epoch."""
    import main_deepclusterv2 as dc
    args = dc.get_args_parser().parse_args(["--nmb_prototypes", "5", "4", "--feat_dim", "16",
                                            "--hidden_mlp", "32", "--batch_size", "8",
                                            "--log_freq", str(LOG_FREQ)])
    args.nmb_crops, args.size_crops, args.crops_for_assign = [2, 2], [16, 8], [0, 1]
    args.rank, args.world_size, args.device, args.use_fp16 = 0, 1, "cpu", False
    torch.manual_seed(0)
    model = resnet18(normalize=True, output_dim=16, hidden_mlp=32, nmb_prototypes=[5, 4],
                     cifar_stem=True, width=8)
    loader = ListLoader([(torch.arange(8) + 8 * k, crops(k)) for k in range(ITERS)])
    loader.dataset = list(range(8 * ITERS))  # len() for the assignments
    memory = dc.init_memory(loader, model, args)
    optimizer = build_larc_sgd(model, args)
    monitor = CollapseMonitor.from_args(args, args.nmb_prototypes)
    counter = SyncCounter(monkeypatch)
    kmeans = dc.cluster_memory

    def per_epoch(*a, **kw):
        counter.active = False
        try:
            return kmeans(*a, **kw)
        finally:
            counter.active = True
    monkeypatch.setattr(dc, "cluster_memory", per_epoch)
    with counter:
        (_, loss), _, _ = dc.train(loader, model, optimizer, 0, np.full(ITERS, 0.1), *memory,
                                   args, monitor=monitor)
    # before: bool(isfinite(loss)), the gradient check, loss.item() and the monitor's float(loss)
    assert counter.count <= READS_ALLOWED, counter.count
    assert np.isfinite(loss)


class FakeClock:
    """time.time() for src/progress.py: each step lasts what the test says."""

    def __init__(self):
        self.now = 0.0

    def time(self):
        return self.now


def _distributed_checks(monkeypatch, step_s, iters, log_freq, signal_at=None, start_iter=0):
    """(iterations where the ranks agreed on a stop check, EpochProgress) of a fake 2-rank epoch
    with preemption installed, steps of `step_s` seconds, SIGTERM received during `signal_at`."""
    from src import progress as progress_module
    from src.runstate import EpochState
    checks, clock = [], FakeClock()

    def all_reduce(t, op=None):
        checks.append(it)
        return t
    monkeypatch.setattr(du, "get_world_size", lambda: 2)
    monkeypatch.setattr(du, "all_gather", lambda t: [t, t])
    monkeypatch.setattr(du, "all_reduce", all_reduce)
    monkeypatch.setattr(progress_module, "time", clock)
    preemption.install()
    args = entry_args("main_swav", ["--log_freq", str(log_freq)], rank=0, world_size=2)
    progress = progress_module.EpochProgress(list(range(iters - start_iter)), 0, args,
                                             start_iter=start_iter, state=EpochState())
    for it, _, _ in progress:
        clock.now += step_s
        progress.update(it, 1.0, 4, 0.1)
        if it == signal_at:
            preemption._state.received = "SIGTERM"  # as the handler does
    return checks, progress


def test_distributed_stop_check_once_per_log_interval_when_steps_are_fast(monkeypatch):
    """The default --log_freq 50 at 0.1 s a step (5 s a log interval): the stop check is the
    log iterations' read, no other (before: every 10 steps, 5 host syncs a log interval)."""
    checks, _ = _distributed_checks(monkeypatch, 0.1, 160, 50)
    assert checks == [0, 50, 100, 150]


def test_distributed_stop_checked_every_few_steps_however_rarely_the_run_logs(monkeypatch):
    """A SIGTERM gives 30 s before SIGKILL: with --log_freq 100 and 3 s steps the ranks agree
    on a stop within STOP_CHECK_SECONDS (3 steps), not at the next log iteration (300 s)."""
    from src.progress import STOP_CHECK_SECONDS
    checks, progress = _distributed_checks(monkeypatch, 3.0, 40, 100, signal_at=13)
    assert STOP_CHECK_SECONDS <= 10 and checks == [0, 3, 6, 9, 12, 15]
    assert progress.stopped_at == 16  # agreed at iteration 15, not at the log iteration 100


def test_a_resumed_epoch_checks_after_its_first_step(monkeypatch):
    """Resumed mid-epoch (iteration 37, no log iteration near), the first check comes after
    the first step, which times the steps for the next."""
    checks, _ = _distributed_checks(monkeypatch, 1.0, 70, 50, start_iter=37)
    assert checks == [37, 47, 50, 60]


def test_stop_on_collapse_agrees_once_per_read_not_per_loss(monkeypatch):
    """--stop_on_collapse with several ranks: the monitor's agreement (an all-reduce read at
    once) comes once per read of the losses, at its last loss, not for every step's loss."""
    from src.progress import EpochProgress
    agreements = []

    def all_reduce(t, op=None):
        agreements.append(t.numel())
        return t
    monkeypatch.setattr(du, "get_world_size", lambda: 2)
    monkeypatch.setattr(du, "all_reduce", all_reduce)
    monitor = CollapseMonitor(10, patience=100, stop=True)
    args = entry_args("main_swav", ["--log_freq", "5"], rank=0, world_size=2)
    progress = EpochProgress(list(range(20)), 0, args, monitor=monitor)
    for it, _, _ in progress:
        progress.update(it, torch.tensor(1.0), 4, 0.1)
    # reads at the log iterations 0, 5, 10, 15 and at the end (16-19): before, one per step (20)
    assert agreements == [1] * 5 and monitor.loss_n == 20


def test_evaluation_training_reads_once_per_log_interval(monkeypatch):
    """eval_linear / eval_semisup's loop (evaluation.train_epoch): the meters stay on the
    device; the log line's values are read once per log interval, the epoch's sums once."""
    from src import evaluation
    args = entry_args("eval_linear", ["--log_freq", "5"], device="cpu", rank=0, world_size=1)
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(8, 12, generator=g), torch.randint(0, 4, (8,), generator=g))
              for _ in range(10)]
    model = torch.nn.Linear(12, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    counter = SyncCounter(monkeypatch)
    with counter:
        epoch, loss, top1, top5 = evaluation.train_epoch(model, [model], loader, optimizer, 0,
                                                         args)
    # iterations 0 and 5, then the summary (before: 6 per step, 60)
    assert counter.count <= 3, counter.count
    assert np.isfinite(loss) and 0 <= top1 <= top5 <= 100

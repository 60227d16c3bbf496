"""EpochProgress: one epoch's iterations with their timers, the original's progress line, the
losses and non-finite checks read once per log interval, and the stop requests."""
import logging
import math
import time

import torch

from . import distributed as du
from . import preemption
from .amp import NonFiniteLossError
from .utils import AverageMeter

logger = logging.getLogger()


# distributed, a stop request is agreed at the log iterations and, when a log interval lasts
# longer, about this often (Slurm's SIGTERM leaves 30 s for the step and the checkpoint)
STOP_CHECK_SECONDS = 10.0


class EpochProgress:
    """Iterates a loader with data/batch timers and the original's 50-iteration log line.

    Host syncs: `update` and `backward_and_step(..., progress=self)` keep each step's loss and
    non-finite checks on the device; `flush` reads them all in one host sync once per log
    interval (the logged iterations), at a stop and at the end of the epoch, and only then
    updates the loss average, the collapse monitor (`monitor`, fed the losses in order) and the
    non-finite checks (which may raise NonFiniteLossError).

    Preemption (src/preemption.py, once installed): every rank asks whether a stop was requested
    at the same steps: after every step in one process, where it is a flag; distributed, where
    it is an all-reduce read in the same sync as the losses, at each log iteration and, if a log
    interval lasts longer than STOP_CHECK_SECONDS, about that often: each check also agrees on
    the steps to the next one (the slowest rank's steps per STOP_CHECK_SECONDS; the first check
    is after the epoch's first step, before any step was timed). If so, and steps remain, the
    epoch ends early with `stopped_at` = the next iteration. `state` (the entry point's
    EpochState, saved in a mid-epoch checkpoint) then gets `stopped_at` and `loss_meter` (every
    rank's [sum, count]), and a resumed epoch given that state continues each rank's loss
    average, so the epoch's stats rows equal an uninterrupted run's."""

    def __init__(self, loader, epoch, args, start_iter=0, log_freq=None, state=None,
                 monitor=None):
        self.loader, self.epoch, self.args = loader, epoch, args
        # the original logs every 50 iterations; --log_freq changes it (e.g. a short demo)
        self.start_iter, self.log_freq = start_iter, log_freq or args.log_freq
        self.batch_time, self.data_time, self.losses = AverageMeter(), AverageMeter(), AverageMeter()
        self.niter_per_ep = start_iter + len(loader)
        self.state, self.stopped_at, self.monitor = state, None, monitor
        self._losses, self._checks = [], []  # per step, not read yet (see flush)
        meters = state.loss_meter if state is not None else None
        if start_iter > 0 and meters:
            if len(meters) == du.get_world_size():
                self.losses.sum, self.losses.count = meters[du.get_rank()]
            else:  # resumed on another number of processes: an equal share of every rank's
                world = du.get_world_size()
                self.losses.sum = sum(m[0] for m in meters) / world
                self.losses.count = sum(m[1] for m in meters) / world
            self.losses.avg = self.losses.sum / max(self.losses.count, 1)

    def __iter__(self):
        self.end = time.time()
        distributed = du.get_world_size() > 1
        next_check = self.start_iter  # distributed stop checks: see the class's docstring
        for it, batch in enumerate(self.loader, start=self.start_iter):
            self.data_time.update(time.time() - self.end)
            yield it, self.epoch * self.niter_per_ep + it, batch
            stop = False
            log = it % self.log_freq == 0
            agree = distributed and preemption.needs_agreement()
            if agree and (log or it >= next_check):
                code, steps = self.flush(preemption.stop_flag(-self._steps_per_check()))
                next_check = it - steps  # the smallest proposal: steps came negated (MAX)
                stop = preemption.should_stop(code)
            elif log:
                self.flush()
            if log:
                self.log(it)
            if not agree:  # one process, or nothing to agree on: a flag, no collective
                stop = preemption.should_stop()
            # a stop after the last step is an ordinary end of epoch
            if stop and it + 1 < self.niter_per_ep:
                self.stopped_at = it + 1
                self.flush()
                if self.state is not None:  # rank 0 saves it: gather every rank's meter
                    meter = torch.tensor([self.losses.sum, self.losses.count], dtype=torch.float64)
                    meters = du.all_gather(meter)
                    self.state.stopped_at = self.stopped_at
                    self.state.loss_meter = [[m[0].item(), int(m[1].item())] for m in meters]
                logger.info(f"epoch {self.epoch} stopped after iteration {it} of "
                            f"{self.niter_per_ep}")
                break
        self.flush()  # before train() returns, so before any checkpoint of this epoch
        # unreadable images were skipped (in the loader workers): say how many this epoch
        nbad = getattr(getattr(self.loader, "dataset", None), "pop_bad_images", lambda: 0)()
        if nbad:
            on_rank = f" on rank {self.args.rank}" if self.args.world_size > 1 else ""
            logger.warning(f"epoch {self.epoch}: {nbad} unreadable image(s) skipped{on_rank}, "
                           "each replaced by the next readable one (the warnings above name "
                           "them; --strict_data stops on the first instead)")

    def _steps_per_check(self):
        """This rank's steps per STOP_CHECK_SECONDS (its mean step time so far), 1 to log_freq."""
        steps = int(STOP_CHECK_SECONDS / max(self.batch_time.avg, 1e-6))
        return max(1, min(self.log_freq, steps))

    def update(self, it, loss, n, lr):
        """Record this iteration's loss (a tensor: read later, by flush; or a number)."""
        self.batch_time.update(time.time() - self.end)
        self.end = time.time()
        self.lr = lr
        self._losses.append((it, loss.detach() if torch.is_tensor(loss) else float(loss), n))

    def defer_check(self, iteration, bad, first_bad, scale, names_or_scaler):
        """backward_and_step's non-finite check of one step, on the device (see flush)."""
        self._checks.append((iteration, bad, first_bad, scale, names_or_scaler))

    def flush(self, extra=None):
        """Read every recorded loss and check, and `extra` (a 1-d tensor), in one host sync;
        apply the checks (may raise NonFiniteLossError), then feed the loss meter and the
        monitor in order. Returns extra's values (None without it)."""
        tensors = [loss for _, loss, _ in self._losses if torch.is_tensor(loss)]
        for _, bad, first, scale, _ in self._checks:
            tensors += [t for t in (bad, first, scale) if t is not None]
        if extra is not None:
            tensors.append(extra)
        if not tensors and not self._losses:
            return None
        device = tensors[0].device if tensors else None
        values = iter(torch.cat([t.detach().reshape(-1).to(device, torch.float64)
                                 for t in tensors]).tolist() if tensors else [])  # the one sync
        losses = [(it, next(values) if torch.is_tensor(v) else v, n) for it, v, n in self._losses]
        checks = [(i, next(values), None if f is None else int(next(values)),
                   None if sc is None else next(values), names)
                  for i, bad, f, sc, names in self._checks]
        reduced = None if extra is None else [int(next(values)) for _ in range(extra.numel())]
        self._losses, self._checks = [], []
        loss_at = {self.epoch * self.niter_per_ep + it: v for it, v, _ in losses}
        for iteration, bad, first, scale, names in checks:
            loss = loss_at.get(iteration, float("nan"))
            if scale is not None:  # a GradScaler skipped the step: counted by its guard
                names.nonfinite_guard.record(bool(bad), iteration, loss, scale)
            elif bad:
                self._losses = []
                if not math.isfinite(loss):
                    raise NonFiniteLossError(f"loss is {loss} at iteration {iteration}: stopping "
                                             "(the last checkpoint was not overwritten)")
                raise NonFiniteLossError(
                    f"non-finite gradient of {names[first]} at iteration {iteration} (loss "
                    f"{loss:.4f}): stopping before any checkpoint (the last checkpoint was not "
                    "overwritten)")
        for k, (it, value, n) in enumerate(losses):
            self.losses.update(value, n)
            if self.monitor is not None:  # collapse: the loss at ln(K) (warns, or stops: agreed
                # by the ranks once per read, at its last loss)
                self.monitor.update(value, iteration=self.epoch * self.niter_per_ep + it,
                                    agree=k == len(losses) - 1)
        return reduced

    def log(self, it):
        """The original's progress line, on rank 0."""
        if self.args.rank != 0:
            return
        eta = self.batch_time.avg * (self.niter_per_ep - it - 1)
        logger.info(
            "Epoch: [{0}][{1}]\t"
            "Time {batch_time.val:.3f} ({batch_time.avg:.3f})\t"
            "Data {data_time.val:.3f} ({data_time.avg:.3f})\t"
            "Loss {loss.val:.4f} ({loss.avg:.4f})\t"
            "Lr: {lr:.4f}\tETA epoch {eta:.0f}s".format(
                self.epoch, it, batch_time=self.batch_time, data_time=self.data_time,
                loss=self.losses, lr=getattr(self, "lr", 0.0), eta=eta))

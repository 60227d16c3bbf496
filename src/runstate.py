"""The run's state between epochs and across a stop: what a training checkpoint holds of the
epoch in progress (EpochState), and the training-state checkpoint itself (save, resume).

A checkpoint written at the end of an epoch holds the next epoch to run; one written when a
stop request cut an epoch (src/preemption.py) holds that epoch, "start_iter" (the iteration to
resume at) and "epoch_state" (EpochState.to_checkpoint: every rank's loss meter and the
method's own state of that epoch), so the resumed epoch ends as the uninterrupted one would.
"""
import logging
import os
from dataclasses import dataclass, fields
from typing import Optional

import torch

from . import distributed as du
from . import preemption
from .amp import scaler_entry, scaler_to_restore
from .checkpoint import (CheckpointError, atomic_copy, atomic_save, check_resume_flags,
                         checkpoint_candidates, get_rng_state, map_start_iter, model_state_dict,
                         recorded_flags, remove_stale_tmp_files, reshard, restart_from_checkpoint,
                         set_rng_state, truncate_stats)

logger = logging.getLogger()


@dataclass
class EpochState:
    """The epoch in progress, as a mid-epoch checkpoint saves it. The loops fill it:
    EpochProgress `stopped_at` (the next iteration, when a stop request cut the epoch) and
    `loss_meter` (every rank's [sum, count] then); the methods their own field (None: not
    theirs)."""
    start_iter: int = 0                         # the iteration the epoch (re)starts at
    stopped_at: Optional[int] = None            # set when a stop request cut the epoch
    loss_meter: Optional[list] = None           # every rank's [loss sum, count] at the stop
    use_the_queue: Optional[bool] = None        # SwAV: the queue was in use
    assignments: Optional[torch.Tensor] = None  # DeepCluster-v2: the epoch's clusters
    z_std_meter: Optional[list] = None          # SimSiam: [collapse metric average, count]

    # what a checkpoint's "epoch_state" holds (start_iter is its own entry; stopped_at is it)
    SAVED = ("loss_meter", "use_the_queue", "assignments", "z_std_meter")

    @property
    def cut(self):
        """Whether a stop request ended the epoch before its last iteration."""
        return self.stopped_at is not None

    def __getitem__(self, name):  # read as the dict it replaces (tests, old callers)
        return getattr(self, name)

    def to_checkpoint(self):
        """The checkpoint entries of a cut epoch ({} for a whole one)."""
        if not self.cut:
            return {}
        saved = {k: getattr(self, k) for k in self.SAVED if getattr(self, k) is not None}
        return {"start_iter": int(self.stopped_at), "epoch_state": saved}

    @classmethod
    def from_checkpoint(cls, start_iter, epoch_state):
        """The state a resumed epoch starts with (`start_iter` already mapped to this run)."""
        known = {f.name for f in fields(cls)}
        return cls(start_iter=start_iter,
                   **{k: v for k, v in (epoch_state or {}).items() if k in known})


def this_ranks_share(shards, old_batch, args, rows, dims, pad="zeros", what="rows"):
    """This rank's part of per-rank state every rank of the checkpoint's run saved (SwAV's
    queue, DeepCluster-v2's memory bank: gathered by gather_to_rank0), re-sharded for this
    run's processes and batch size (src/checkpoint.py reshard: the global rows keep their
    order). `shards`: {name: [old world size, ...]} with the rows along `dims[name]`; `rows`:
    the new global row count; `pad`: what fills rows beyond the saved ones. Returns {name:
    tensor}."""
    return {name: reshard(list(t), old_batch, args.world_size, args.batch_size, dim=dims[name],
                          rows=rows, pad=pad, what=what)[args.rank]
            for name, t in shards.items()}


def gather_to_rank0(tensor):
    """Every rank's tensor (same shape) stacked on rank 0's CPU: [world_size, ...]; None on
    the other ranks, which save nothing (all ranks call; only rank 0 receives the data)."""
    parts = du.gather(tensor.detach(), dst=0)
    return None if parts is None else torch.stack(parts).cpu()


def save_training_state(args, epoch, model, optimizer, scaler, extra=None, start_iter=0):
    """Rank 0 writes dump_path/checkpoint.pth.tar atomically (original keys, `module.` prefix)
    and copies it to checkpoints/ckp-{epoch}.pth every checkpoint_freq epochs and at the end.

    start_iter > 0: a mid-epoch checkpoint (preemption): "epoch" is this epoch (not the next)
    and "start_iter" the iteration to resume at; it is not copied to checkpoints/."""
    if args.rank != 0:
        return
    save_dict = {
        "epoch": epoch + 1 if not start_iter else epoch,
        "state_dict": model_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "rng": get_rng_state(),
        "args": recorded_flags(args),
    }
    save_dict.update(scaler_entry(scaler))
    if start_iter:
        save_dict["start_iter"] = int(start_iter)
    save_dict.update(extra or {})
    path = os.path.join(args.dump_path, "checkpoint.pth.tar")
    atomic_save(save_dict, path)
    if start_iter:
        logger.info(f"mid-epoch checkpoint: epoch {epoch} resumes at iteration {start_iter}")
    elif epoch % args.checkpoint_freq == 0 or epoch == args.epochs - 1:
        atomic_copy(path, os.path.join(args.dump_path, "checkpoints", f"ckp-{epoch}.pth"))


def resume_training_state(args, model, optimizer, scaler, training_stats=None, extra_keys=()):
    """Resume from `--resume PATH` (must load), else from dump_path/checkpoint.pth.tar or, when
    that one is corrupt, the newest loadable checkpoints/ckp-N.pth (with a warning). Returns the
    run variables: epoch, rng, start_iter (0 unless the checkpoint was written mid-epoch),
    epoch_state (the EpochState the first epoch starts with), args (the checkpoint's flags) and
    the entries named in `extra_keys` (None when absent). `training_stats` keeps the rows of the
    epochs before the one resumed (truncate_stats).

    On any number of processes (check_resume_flags: flag changes logged, a change of the global
    batch refused unless --allow_batch_change): the lr schedule of this run continues at
    epoch x (its iterations per epoch) + start_iter, start_iter mapped by samples seen when the
    global batch changed (map_start_iter); the entry points re-shard their per-rank state."""
    to_restore = {"epoch": 0, "rng": None, "start_iter": 0, "epoch_state": None, "args": None,
                  **{k: None for k in extra_keys}}
    explicit = args.resume
    if explicit and not os.path.isfile(explicit):
        raise CheckpointError(f"--resume {explicit}: no such file")
    if args.rank == 0:
        remove_stale_tmp_files(args.dump_path, os.path.join(args.dump_path, "checkpoints"))
    loaded = restart_from_checkpoint(
        [explicit] if explicit else checkpoint_candidates(args.dump_path), fallback=not explicit,
        run_variables=to_restore, state_dict=model, optimizer=optimizer,
        scaler=scaler_to_restore(scaler))
    if loaded:
        old_global = check_resume_flags(to_restore["args"], args, loaded)
        to_restore["start_iter"] = map_start_iter(to_restore["start_iter"], old_global,
                                                  args.batch_size * args.world_size,
                                                  to_restore["epoch"])
        if to_restore["rng"] is not None:
            set_rng_state(to_restore["rng"])
        if to_restore["start_iter"]:
            logger.info(f"resuming epoch {to_restore['epoch']} at iteration "
                        f"{to_restore['start_iter']} (mid-epoch checkpoint)")
    to_restore["epoch_state"] = EpochState.from_checkpoint(to_restore["start_iter"],
                                                           to_restore["epoch_state"])
    if training_stats is not None:
        truncate_stats(training_stats, to_restore["epoch"])
    return to_restore


def end_epoch(args, epoch, model, optimizer, scaler, training_stats, scores, state, extra=None,
              tb=None, scalars=None):
    """After an entry point's train() (every rank calls): the epoch's stats row and its
    TensorBoard `scalars` ((prefix, {name: value}) on `tb`), unless a stop request cut the epoch
    (`state.cut`, an EpochState: see EpochProgress); the checkpoint with `extra`, mid-epoch with
    the cut epoch's state when cut; then, once a stop was requested, the requeue and exit
    (src/preemption.py)."""
    if not state.cut:
        training_stats.update(scores)
        if tb is not None and scalars is not None:
            tb.scalars(epoch, scalars[0], **scalars[1])
    save_training_state(args, epoch, model, optimizer, scaler,
                        {**(extra or {}), **state.to_checkpoint()}, start_iter=state.stopped_at)
    if preemption.should_stop() and (state.cut or epoch + 1 < args.epochs):
        preemption.exit_after_checkpoint(args)  # requeues under Slurm; raises SystemExit

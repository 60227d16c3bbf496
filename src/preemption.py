"""Stop cleanly when Slurm warns that a job is about to end (time limit, preemption, or by hand),
write a mid-epoch checkpoint, requeue the job and exit.

Slurm sends SIGUSR1 `<seconds>` before the time limit with `#SBATCH --signal=USR1@<seconds>`, or
on demand with `scancel --signal=USR1 <jobid>`; both reach every task of the job's steps. The
handler only sets a flag. `EpochProgress` (src/engine.py) calls `should_stop()` after every step
in one process and at each log iteration when distributed (the all-reduce's read is a host sync);
it all-reduces the flag, so every rank stops after the same step even when the signal reached the
ranks at different moments. The entry point then writes a checkpoint at that iteration and calls
`exit_after_checkpoint()`: under Slurm rank 0 runs `scontrol requeue $SLURM_JOB_ID` and every rank
exits 0 (the requeued job resumes from the checkpoint); without Slurm, or when the requeue fails,
every rank exits with REQUEUE_EXIT_CODE so a wrapper can tell "stopped, run me again" from success
(0) and from an error (1).

Use in an entry point (every rank runs the same calls):
    preemption.install()                      # before the loaders fork their workers
    ... EpochProgress(..., state=state) stops the epoch; state["stopped_at"] is the next iteration
    if preemption.should_stop():              # after the (mid-epoch or end-of-epoch) checkpoint
        preemption.exit_after_checkpoint(args)
"""
import logging
import os
import signal
import subprocess

import torch
import torch.distributed as dist

from . import distributed as du

logger = logging.getLogger()

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry"
REQUEUE_EXIT_CODE = 75


class _State:
    installed = False
    previous = {}     # signal -> the handler it had before install() / exit_after_checkpoint()
    received = None   # name of the signal this process received, set by the handler
    agreed = False    # every rank agreed to stop: sticky once True


_state = _State()


def _handler(signum, frame):
    # only set a flag: the step in progress finishes and the ranks agree before stopping
    _state.received = signal.Signals(signum).name


def install(signals=(signal.SIGUSR1,)):
    """Catch `signals` in this process (call from the main thread, before DataLoader workers are
    forked: they inherit the handler, so the signal Slurm also sends them does not kill them)."""
    for sig in signals:
        _state.previous.setdefault(sig, signal.signal(sig, _handler))
    _state.installed = True


def reset():
    """Forget a received signal, give the signals their previous handlers back (tests, or a
    second run in the same process)."""
    for sig, handler in _state.previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    _state.previous = {}
    _state.installed, _state.received, _state.agreed = False, None, False


def requested():
    """This process received the signal (no collective)."""
    return _state.received is not None


def stop_flag():
    """The stop flags all-reduced (MAX) across ranks, as a 1-element tensor not read yet (under
    nccl neither the fill nor the all-reduce waits for the GPU): a collective, every rank calls
    it at the same points; pass its value to should_stop(). None when there is nothing to
    reduce (not installed, already agreed, or one process)."""
    if not _state.installed or _state.agreed or du.get_world_size() == 1:
        return None
    t = torch.full((1,), 1 if _state.received else 0, dtype=torch.int32,
                   device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def should_stop(reduced=None):
    """True once any rank received the signal. A collective when distributed: every rank must
    call it at the same points (EpochProgress does at each log iteration, reading the flag in
    the same host sync as the losses: `reduced`, the value of stop_flag()'s tensor). False, and
    no collective, unless `install()` was called, so evaluation loops with uneven shards are
    unaffected. In one process it is a flag: no collective, no sync."""
    if not _state.installed:
        return False
    if _state.agreed:
        return True
    if reduced is not None:
        flag = int(reduced)
    elif du.get_world_size() > 1:
        flag = int(stop_flag().item())
    else:
        flag = 1 if _state.received else 0
    if flag:
        _state.agreed = True
        how = f"received {_state.received}" if _state.received else "another rank received it"
        logger.warning(f"stop requested ({how}): finishing this step, then checkpointing")
    return _state.agreed


def collective_device():
    """Where a small tensor for a collective must live: the GPU under nccl, else the CPU."""
    if du.is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def exit_after_checkpoint(args):
    """After rank 0 wrote the checkpoint (all ranks call this): requeue the Slurm job and exit 0,
    or exit REQUEUE_EXIT_CODE without Slurm. Raises SystemExit."""
    # scontrol requeue makes Slurm send SIGTERM to this job's processes: ignore it for the few
    # moments we need to leave cleanly (SIGKILL still comes after Slurm's KillWait)
    _state.previous.setdefault(signal.SIGTERM, signal.signal(signal.SIGTERM, signal.SIG_IGN))
    du.barrier()  # rank 0's checkpoint is on disk before anyone requeues or leaves
    job = os.environ.get("SLURM_JOB_ID")
    code = REQUEUE_EXIT_CODE
    if args.rank == 0:
        where = os.path.join(args.dump_path, "checkpoint.pth.tar")
        if job:
            code = _requeue(job, where)
        else:
            logger.warning(f"stopped by a signal; checkpoint at {where}: run the same command "
                           f"again to resume (exit status {code})")
    if du.get_world_size() > 1:  # every rank leaves with rank 0's status
        t = torch.tensor([code], dtype=torch.int32, device=collective_device())
        dist.broadcast(t, 0)
        code = int(t.item())
    du.destroy()
    logger.info(f"exiting with status {code}")
    raise SystemExit(code)


def _requeue(job, where):
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True,
                       timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        logger.error(f"could not requeue Slurm job {job} ({str(detail).strip()[:200]}): "
                     f"resubmit the same script to resume from {where} (exit status "
                     f"{REQUEUE_EXIT_CODE})")
        return REQUEUE_EXIT_CODE
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    logger.warning(f"requeued Slurm job {job} (restart {restarts + 1}): it resumes from {where}")
    return 0

"""Stop cleanly on a signal: finish the step, write a mid-epoch checkpoint, then requeue the
Slurm job (SIGUSR1) or exit (SIGTERM, SIGINT).

- SIGUSR1: Slurm's warning that the job is about to end (`#SBATCH --signal=USR1@<seconds>`, or
  `scancel --signal=USR1 <jobid>`). After the checkpoint, under Slurm rank 0 runs
  `scontrol requeue $SLURM_JOB_ID` and every rank exits 0 (the requeued job resumes from the
  checkpoint); without Slurm, or when the requeue fails, every rank exits REQUEUE_EXIT_CODE (75)
  so a wrapper can tell "stopped, run me again" from success (0) and from an error (1).
- SIGTERM: `scancel`, torchrun stopping its workers, a container platform. The same checkpoint,
  NO requeue (someone asked the job to end), exit TERM_EXIT_CODE (143 = 128 + 15, what a shell,
  Slurm and Kubernetes report for a job ended by SIGTERM; 75 would make a retry-on-75 wrapper
  restart a cancelled run). One step and one checkpoint write fit in Slurm's default 30 s
  between SIGTERM and SIGKILL (KillWait).
- SIGINT (Ctrl-C): the same checkpoint, then one line saying where it is, exit INT_EXIT_CODE
  (130 = 128 + 2). A second Ctrl-C kills the process at once (the previous checkpoint stays
  loadable: every save is atomic).

The handler only sets a flag. `EpochProgress` (src/progress.py) calls `should_stop()` after every
step in one process and, when distributed, at the checks every rank agreed on: at each log
iteration, and more often when a log interval lasts longer than about STOP_CHECK_SECONDS (the
all-reduced flag is read on the device in the same host sync as the losses);
it all-reduces the flag (the strongest signal wins: INT > TERM > USR1), so every rank stops
after the same step and leaves the same way, even when the signal reached the ranks at different
moments or only some of them. The entry point then writes a checkpoint at that iteration and
calls `exit_after_checkpoint()`.

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
import sys

import torch
import torch.distributed as dist

from . import distributed as du

logger = logging.getLogger()

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry"
REQUEUE_EXIT_CODE = 75
TERM_EXIT_CODE = 128 + signal.SIGTERM  # 143
INT_EXIT_CODE = 128 + signal.SIGINT  # 130
# the signals install() catches, weakest first: the all-reduced code picks how every rank leaves
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
_CODE = {sig.name: i + 1 for i, sig in enumerate(STOP_SIGNALS)}


class _State:
    installed = False
    previous = {}     # signal -> the handler it had before install() / exit_after_checkpoint()
    received = None   # name of the strongest signal this process received, set by the handler
    agreed = False    # every rank agreed to stop: sticky once True
    kind = None       # the signal every rank agreed on (the strongest any rank received)
    pid = None        # the process that installed (its forked DataLoader workers inherit all)


_state = _State()


def _handler(signum, frame):
    # only set a flag: the step in progress finishes and the ranks agree before stopping
    name = signal.Signals(signum).name
    if name == "SIGINT" and _state.received == "SIGINT":  # a second Ctrl-C: quit now
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        return
    if name == "SIGINT" and os.getpid() == _state.pid:  # not from the workers that got it too
        try:  # os.write: safe in a handler, unlike logging or print
            os.write(2, b"\nCtrl-C: finishing this step, then writing a checkpoint "
                        b"(Ctrl-C again quits at once)\n")
        except OSError:
            pass
    if _CODE.get(name, 1) > _CODE.get(_state.received, 0):
        _state.received = name


def install(signals=STOP_SIGNALS):
    """Catch `signals` in this process (call from the main thread, before DataLoader workers are
    forked: they inherit the handler, so the signal Slurm or a Ctrl-C also sends them does not
    kill them with a traceback; their own flag is never read)."""
    for sig in signals:
        _state.previous.setdefault(sig, signal.signal(sig, _handler))
    _state.installed, _state.pid = True, os.getpid()


def reset():
    """Forget a received signal, give the signals their previous handlers back (tests, or a
    second run in the same process)."""
    for sig, handler in _state.previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    _state.previous = {}
    _state.installed, _state.received, _state.agreed, _state.kind = False, None, False, None


def requested():
    """This process received the signal (no collective)."""
    return _state.received is not None


def needs_agreement():
    """Whether a stop check must be agreed by a collective: installed, not agreed yet, and more
    than one process (the same answer on every rank)."""
    return _state.installed and not _state.agreed and du.get_world_size() > 1


def stop_flag(*also):
    """The strongest stop signal's code (0: none; INT > TERM > USR1), then the integers `also`
    (EpochProgress: the steps to its next check, negated), all-reduced (MAX) across ranks in one
    collective, as a tensor not read yet: every rank calls it at the same points; pass its first
    value to should_stop(). None when there is nothing to agree on (needs_agreement)."""
    if not needs_agreement():
        return None
    t = du.backend_tensor([_CODE.get(_state.received, 0), *also], torch.int32)  # no host sync
    return du.all_reduce(t, dist.ReduceOp.MAX)


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
        flag = int(stop_flag()[0].item())
    else:
        flag = _CODE.get(_state.received, 0)
    if flag:
        _state.agreed, _state.kind = True, STOP_SIGNALS[flag - 1].name
        how = (f"received {_state.received}" if _state.received == _state.kind
               else f"another rank received {_state.kind}")
        logger.warning(f"stop requested ({how}): finishing this step, then checkpointing")
    return _state.agreed


def exit_after_checkpoint(args):
    """After rank 0 wrote the checkpoint (all ranks call this). SIGUSR1: requeue the Slurm job
    and exit 0, or exit REQUEUE_EXIT_CODE without Slurm. SIGTERM / SIGINT: no requeue, exit
    TERM_EXIT_CODE / INT_EXIT_CODE, rank 0's last line naming the checkpoint. Raises SystemExit."""
    # scontrol requeue makes Slurm send SIGTERM to this job's processes, and Slurm or torchrun
    # may repeat theirs: ignore it for the few moments we need to leave cleanly (SIGKILL still
    # comes after Slurm's KillWait)
    _state.previous.setdefault(signal.SIGTERM, signal.signal(signal.SIGTERM, signal.SIG_IGN))
    du.barrier()  # rank 0's checkpoint is on disk before anyone requeues or leaves
    job = os.environ.get("SLURM_JOB_ID")
    kind = _state.kind or "SIGUSR1"
    code, last_line = REQUEUE_EXIT_CODE, None
    if args.rank == 0:
        where = os.path.join(args.dump_path, "checkpoint.pth.tar")
        if kind == "SIGINT":
            code = INT_EXIT_CODE
            last_line = (f"interrupted (Ctrl-C): checkpoint at {where} (this step): run the same "
                         f"command again to resume")
        elif kind == "SIGTERM":
            code = TERM_EXIT_CODE
            last_line = (f"stopped by SIGTERM (not requeued): checkpoint at {where}: run the "
                         f"same command again to resume (exit status {code})")
        elif job:
            code = _requeue(job, where)
        else:
            logger.warning(f"stopped by a signal; checkpoint at {where}: run the same command "
                           f"again to resume (exit status {code})")
    if du.get_world_size() > 1:  # every rank leaves with rank 0's status
        code = int(du.broadcast(torch.tensor([code], dtype=torch.int32), 0))
    du.destroy()
    logger.info(f"exiting with status {code}")
    if last_line:  # the last line on the console
        logger.warning(last_line)
        sys.stderr.flush()
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

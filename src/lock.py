"""One run per --dump_path: an exclusive OS lock on a file in the dump path.

Two runs on one folder (a double submission, a requeued job whose predecessor still runs) would
both write the checkpoint, the stats and the log. The first run to set up the folder holds
`dump_path/<name>` locked with flock(2) for the rest of its life and writes who it is into it;
another run refuses at once with one line naming that holder (host, pid, start time).

The kernel releases the lock when the holder's process ends, however it ends (SIGKILL, OOM, a
node reboot for a lock on a network filesystem), so a killed run never blocks its own resume and
the file left behind means nothing. On a filesystem without flock (some NFS mounts) the run goes
on after one warning.

Across ranks (`lock_dump_path`): rank 0 alone takes the lock (the dump path is shared by every
node); the other ranks wait for its verdict, so every rank exits with the same line, none hangs.
"""
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys

from .errors import UsageError

logger = logging.getLogger()

PRETRAINING_LOCK = ".lock"  # SwAV, DeepCluster-v2 and SimSiam share checkpoint.pth.tar

# errno of flock on a filesystem that does not support it (NFS without lockd, FUSE, Lustre
# mounted without flock): not a conflict
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}

_held = {}  # real path of a lock file -> the fd this process keeps open (held until it exits)


class DumpPathError(UsageError):
    """The dump path cannot be used: another run holds it, or it is not a folder (one line)."""


def _drop_in_child():
    # a forked child (a DataLoader worker) must not keep the lock alive after its parent died
    for fd in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_drop_in_child)


def make_dump_path(dump_path):
    """Create `dump_path` (and parents); a file in the way or no permission is a one-line error."""
    if os.path.exists(dump_path) and not os.path.isdir(dump_path):
        raise DumpPathError(f"--dump_path {dump_path} is a file, not a folder: choose a folder "
                            "(it is created if missing)")
    try:
        os.makedirs(dump_path, exist_ok=True)
    except OSError as e:
        raise DumpPathError(f"--dump_path {dump_path}: cannot create the folder "
                            f"({e.strerror or e})") from None


def holder_info(path):
    """What the holder of lock file `path` wrote about itself ({} when unreadable or empty)."""
    try:
        with open(path) as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


def describe(info):
    if not info:
        return "another process (it has not written its name yet)"
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started "
            f"{info.get('started', '?')}")


def acquire(dump_path, name=PRETRAINING_LOCK):
    """Take the lock `dump_path/name` for the life of this process. Returns True when held (or
    already held by this process), False when the filesystem cannot lock (warned). Raises
    DumpPathError naming the holder when another process holds it."""
    make_dump_path(dump_path)
    path = os.path.realpath(os.path.join(dump_path, name))
    if path in _held:
        return True  # this process set up the same dump path before (tests, a second main())
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:  # a read-only folder, say
        raise DumpPathError(f"--dump_path {dump_path}: cannot create {path} "
                            f"({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise DumpPathError(
                f"--dump_path {dump_path} is in use by another run ({describe(holder_info(path))}):"
                f" wait for it to end or stop it, or choose another --dump_path") from None
        if e.errno in _UNSUPPORTED:
            logger.warning(f"cannot lock {path} ({e.strerror}: this filesystem has no flock): "
                           "a second run started on this --dump_path would not be refused")
            return False
        raise DumpPathError(f"--dump_path {dump_path}: cannot lock {path} ({e.strerror})") from None
    info = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv)[:500]}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError as e:  # a full disk: the lock holds all the same, only unnamed
        logger.warning(f"could not write this run's name into {path} ({e.strerror})")
    _held[path] = fd
    return True


def release(dump_path, name=PRETRAINING_LOCK):
    """Let the lock go before this process ends (tests; a run hands its folder to another)."""
    fd = _held.pop(os.path.realpath(os.path.join(dump_path, name)), None)
    if fd is not None:
        os.close(fd)


def lock_dump_path(args, name=PRETRAINING_LOCK):
    """Every rank calls this before anything in args.dump_path is read or written: rank 0 takes
    the lock, the others wait for its verdict; a refusal raises the same DumpPathError on every
    rank."""
    from . import distributed as du  # torch: only needed here, acquire() stays import-light
    error = None
    if args.rank == 0:
        try:
            acquire(args.dump_path, name)
        except DumpPathError as e:
            error = str(e)
    error = du.broadcast_object(error)
    if error is not None:
        raise DumpPathError(error)
    if args.rank != 0:
        make_dump_path(args.dump_path)

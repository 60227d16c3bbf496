"""One run per --dump_path (src/lock.py, issue 20 item 2): a second run on a live run's dump path
refuses at once with one line naming the holder; a run killed with SIGKILL leaves nothing that
blocks its rerun; under two ranks a refusal reaches every rank."""
import os
import runpy
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch.distributed as dist

import main_swav
from conftest import ROOT, fork_ranks, tiny_swav_argv
from src import lock
from src.cli import run_main
from src.utils import initialize_exp

PY = sys.executable
# holds the lock of argv[1] until stdin closes: a live run without the cost of importing torch
HOLDER = ("import sys; sys.path.insert(0, %r); from src import lock; lock.acquire(sys.argv[1]); "
          "print('held', flush=True); sys.stdin.read()" % ROOT)
# takes the lock of argv[1] as a second run would: its error is its one-line exit message
SECOND = ("import sys; sys.path.insert(0, %r); from src import lock\n"
          "try:\n    lock.acquire(sys.argv[1])\n"
          "except lock.DumpPathError as e:\n    sys.exit(f'error: {e}')" % ROOT)


def _start_holder(dump):
    proc = subprocess.Popen([PY, "-c", HOLDER, dump], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _wait_for_holder(dump, pid, proc, deadline=180):
    """Until process `pid` has written itself into the lock file (a hang guard, no timing)."""
    end = time.monotonic() + deadline
    while lock.holder_info(os.path.join(dump, lock.PRETRAINING_LOCK)).get("pid") != pid:
        assert proc.poll() is None, "the first run ended before it took the lock"
        assert time.monotonic() < end, "the first run never took the lock"
        time.sleep(0.05)


def test_second_process_refused_naming_holder_and_sigkill_frees_the_lock(tmp_path):
    dump = str(tmp_path / "run")
    holder = _start_holder(dump)
    try:
        second = subprocess.run([PY, "-c", SECOND, dump], capture_output=True, text=True,
                                timeout=60)
        assert second.returncode != 0
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert lines[0].startswith(f"error: --dump_path {dump} is in use by another run")
        assert f"pid {holder.pid} on host {socket.gethostname()}" in lines[0]
        assert "started 20" in lines[0]
        # a holder killed with SIGKILL cannot clean up: the kernel releases its lock
        holder.kill()
        holder.wait(timeout=30)
    finally:
        holder.kill()
    assert lock.acquire(dump)  # the rerun takes it (the stale file's content does not matter)
    assert lock.holder_info(os.path.join(dump, ".lock"))["pid"] == os.getpid()
    assert lock.acquire(dump)  # this process again (a second main() in a test): still its own
    lock.release(dump)


def test_filesystem_without_flock_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    def no_flock(fd, op):
        raise OSError(37, "No locks available")  # ENOLCK: NFS mounted without lockd

    monkeypatch.setattr(lock.fcntl, "flock", no_flock)
    assert lock.acquire(str(tmp_path / "nfs")) is False
    assert "a second run started on this --dump_path would not be refused" in caplog.text


def test_main_swav_started_twice_on_one_dump_path(image_folder, tmp_path, monkeypatch):
    """The issue's demonstration. The first run is paused (SIGSTOP) once it holds the lock, so
    the second starts while it is live whatever the machine's speed."""
    dump = str(tmp_path / "run")
    argv = tiny_swav_argv(image_folder, dump)
    with open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen([PY, "main_swav.py", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=err)
    try:
        _wait_for_holder(dump, first.pid, first)
        first.send_signal(signal.SIGSTOP)
        # the second: the script's own __main__ block, here (a subprocess costs an import of torch)
        monkeypatch.setattr(sys, "argv", ["main_swav.py", *argv])
        with pytest.raises(SystemExit) as second:
            runpy.run_path(os.path.join(ROOT, "main_swav.py"), run_name="__main__")
        first.send_signal(signal.SIGCONT)
        line = str(second.value.code)  # printed as is, exit status 1
        assert line.startswith(f"error: --dump_path {dump} is in use by another run"), line
        assert f"pid {first.pid} on host {socket.gethostname()}" in line and "\n" not in line
        assert first.wait(timeout=300) == 0, open(tmp_path / "first.err").read()[-3000:]
    finally:
        first.kill()
    stats = pd.read_pickle(os.path.join(dump, "stats0.pkl"))
    assert list(stats["epoch"]) == [0, 1]  # every epoch once, in order
    log = open(os.path.join(dump, "train.log")).read()
    assert log.count("Initialized logger") == 1  # the second run wrote nothing


def _rank(rank, port, dump, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    sys.argv = ["main", "--dump_path", dump]
    parser = main_swav.get_args_parser()  # a real entry point's flags (run_main checks some)

    def main(args):
        args.rank, args.world_size = rank, 2
        initialize_exp(args, "epoch")
        out.put((rank, "ran"))

    try:
        run_main(main, parser)
    except SystemExit as e:  # what the entry point would print, exit status 1
        out.put((rank, str(e.code)))
        raise


def test_two_ranks_both_exit_when_rank0_cannot_take_the_lock(tmp_path):
    dump = str(tmp_path / "run")
    assert lock.acquire(dump)  # this process is the live run
    try:
        results, codes = fork_ranks(_rank, dump)
        assert codes == [1, 1]
    finally:
        lock.release(dump)
    assert results[0] == results[1], results  # the same line on every rank
    assert results[0].startswith(f"error: --dump_path {dump} is in use by another run")
    assert f"pid {os.getpid()} on host" in results[0]
    assert not os.path.exists(os.path.join(dump, "params.pkl"))  # nothing written

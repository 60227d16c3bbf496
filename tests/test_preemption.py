"""Preemption (src/preemption.py + EpochProgress + main_swav): a SIGUSR1 mid-epoch stops after
the current step, writes a mid-epoch checkpoint, exits REQUEUE_EXIT_CODE without Slurm, and the
resumed run ends with the same weights and stats as an uninterrupted one. The real Slurm path
(sbatch, scancel --signal, scontrol requeue) is exercised by `make test-slurm`."""
import os
import shutil
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torch.distributed as dist

import main_swav
from conftest import ROOT, fork_ranks, make_image_folder, tiny_swav_argv
from src import preemption
from src.checkpoint import safe_load


pytestmark = pytest.mark.usefixtures("no_launcher")  # conftest.py


def _main(argv):
    parser = main_swav.get_args_parser()
    return main_swav.main(parser.parse_args(argv))


def _signal_at_step(monkeypatch, step, sig=signal.SIGUSR1):
    """Send this process `sig` during the `step`-th loss computation (0-based, whole run)."""
    calls = {"n": 0}
    loss_fn = main_swav.swav_loss

    def wrapped(*a, **kw):
        if calls["n"] == step:
            os.kill(os.getpid(), sig)
        calls["n"] += 1
        return loss_fn(*a, **kw)

    monkeypatch.setattr(main_swav, "swav_loss", wrapped)


def _fake_scontrol(tmp_path, monkeypatch, status=0):
    """A Slurm job whose `scontrol` records its arguments in tmp_path/called."""
    fake = tmp_path / "scontrol"
    fake.write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/called\nexit {status}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    return tmp_path / "called"


def _load(dump):
    return safe_load(os.path.join(dump, "checkpoint.pth.tar"))


# 24 images, batch 8, one process: 3 iterations per epoch; the queue (2 batches) fills in
# epoch 0 and is used from its iteration 2 on
EXTRA = ["--epochs", "2", "--queue_length", "16", "--epoch_queue_starts", "0",
         "--freeze_prototypes_niters", "2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(data folder, dump path) of one uninterrupted run, the reference of the resumed runs."""
    root = tmp_path_factory.mktemp("uninterrupted")
    data = make_image_folder(str(root / "data"))
    ref = str(root / "ref")
    preemption.reset()
    _main(tiny_swav_argv(data, ref, EXTRA))
    preemption.reset()
    return data, ref


def _assert_same_weights(dump, ref):
    final, expected = _load(dump), _load(ref)
    assert final["epoch"] == 2 and "start_iter" not in final
    for key in expected["state_dict"]:
        assert torch.equal(final["state_dict"][key], expected["state_dict"][key]), key
    assert torch.equal(final["queue"], expected["queue"])
    return final, expected


def test_mid_epoch_stop_then_resume_equals_uninterrupted(uninterrupted, tmp_path, monkeypatch):
    image_folder, ref = uninterrupted
    dump = str(tmp_path / "stopped")
    _signal_at_step(monkeypatch, 4)  # epoch 1, iteration 1
    with pytest.raises(SystemExit) as stop:
        _main(tiny_swav_argv(image_folder, dump, EXTRA))
    assert stop.value.code == preemption.REQUEUE_EXIT_CODE
    ckp = _load(dump)
    # mid-epoch: "epoch" is the epoch to resume (not the next one), at iteration 2
    assert ckp["epoch"] == 1 and ckp["start_iter"] == 2
    assert ckp["epoch_state"]["use_the_queue"] is True
    assert ckp["queue"].shape == (1, 2, 16, 16)
    assert not os.path.exists(os.path.join(dump, "checkpoints", "ckp-1.pth"))
    assert list(pd.read_pickle(os.path.join(dump, "stats0.pkl"))["epoch"]) == [0]  # no partial row
    log = open(os.path.join(dump, "train.log")).read()
    assert "stop requested (received SIGUSR1)" in log and "resumes at iteration 2" in log

    # a requeue whose mid-epoch checkpoint got corrupted falls back to the last good one
    corrupt = str(tmp_path / "corrupt")
    shutil.copytree(dump, corrupt)
    with open(os.path.join(corrupt, "checkpoint.pth.tar"), "r+b") as f:
        f.truncate(1000)

    preemption.reset()
    monkeypatch.undo()
    _main(tiny_swav_argv(image_folder, dump, EXTRA))
    final, expected = _assert_same_weights(dump, ref)
    stats = pd.read_pickle(os.path.join(dump, "stats0.pkl"))
    ref_stats = pd.read_pickle(os.path.join(ref, "stats0.pkl"))
    assert list(stats["epoch"]) == [0, 1]
    assert list(stats["loss"]) == list(ref_stats["loss"])  # epoch 1's average spans both parts

    preemption.reset()
    _main(tiny_swav_argv(image_folder, corrupt, EXTRA))
    log = open(os.path.join(corrupt, "train.log")).read()
    assert "ckp-0.pth" in log  # the warning names the checkpoint it fell back to
    recovered = _load(corrupt)
    for key in expected["state_dict"]:  # resuming at the end of epoch 0 is exact too
        assert torch.equal(recovered["state_dict"][key], expected["state_dict"][key]), key


def test_a_queue_grown_at_a_mid_epoch_resume_waits_until_full(uninterrupted, tmp_path,
                                                              monkeypatch):
    """Stopped while the queue was in use, resumed with a longer --queue_length: the grown queue
    has empty rows (zeros at its end), which must not go into Sinkhorn as scores of 0: it is used
    again only once full, as a new queue (the original's rule)."""
    image_folder, _ = uninterrupted
    dump = str(tmp_path / "grown")
    _signal_at_step(monkeypatch, 4)  # epoch 1, iteration 1: the queue is in use
    with pytest.raises(SystemExit):
        _main(tiny_swav_argv(image_folder, dump, EXTRA))
    assert _load(dump)["epoch_state"]["use_the_queue"] is True
    preemption.reset()
    monkeypatch.undo()

    rows, sinkhorn = [], main_swav.distributed_sinkhorn

    def recording(out, *a, **kw):
        rows.append(out.shape[0])
        return sinkhorn(out, *a, **kw)

    monkeypatch.setattr(main_swav, "distributed_sinkhorn", recording)
    _main(tiny_swav_argv(image_folder, dump, [*EXTRA, "--queue_length", "32"]))
    # the one iteration left of epoch 1, two assigned crops: the batch's 8 scores, no queue rows
    assert rows == [8, 8]
    assert "the resumed queue has empty rows: it is used again once full" in open(
        os.path.join(dump, "train.log")).read()
    assert _load(dump)["queue"][0, :, :24].abs().sum(-1).gt(0).all()  # 16 kept + 8 new rows


def test_sigterm_checkpoints_mid_epoch_without_requeue(uninterrupted, tmp_path, monkeypatch):
    """scancel / torchrun / a container platform: SIGTERM stops like USR1 but never requeues."""
    image_folder, ref = uninterrupted
    called = _fake_scontrol(tmp_path, monkeypatch)  # a Slurm job: USR1 would requeue it here

    def unhandled(signum, frame):  # instead of dying with the test process
        raise AssertionError("SIGTERM was not handled")

    previous = signal.signal(signal.SIGTERM, unhandled)
    dump = str(tmp_path / "stopped")
    try:
        _signal_at_step(monkeypatch, 4, signal.SIGTERM)  # epoch 1, iteration 1
        with pytest.raises(SystemExit) as stop:
            _main(tiny_swav_argv(image_folder, dump, EXTRA))
    finally:
        preemption.reset()
        signal.signal(signal.SIGTERM, previous)
    assert stop.value.code == preemption.TERM_EXIT_CODE == 143
    assert not called.exists()  # no scontrol requeue
    ckp = _load(dump)
    assert ckp["epoch"] == 1 and ckp["start_iter"] == 2
    log = open(os.path.join(dump, "train.log")).read()
    assert "stop requested (received SIGTERM)" in log and "not requeued" in log

    monkeypatch.undo()  # the rerun, no signal: resumes at that iteration, ends as uninterrupted
    _main(tiny_swav_argv(image_folder, dump, EXTRA))
    assert "resuming epoch 1 at iteration 2" in open(os.path.join(dump, "train.log")).read()
    _assert_same_weights(dump, ref)
    assert not called.exists()


def test_ctrl_c_ends_with_one_line_naming_the_checkpoint(image_folder, tmp_path):
    """Ctrl-C in a terminal: SIGINT to the process group (the run and its loader workers)."""
    dump = str(tmp_path / "run")
    argv = tiny_swav_argv(image_folder, dump, ["--epochs", "50", "--workers", "2"])
    proc = subprocess.Popen([sys.executable, "main_swav.py", *argv], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        err = []
        for line in proc.stderr:  # the first step is under way: the workers are forked
            err.append(line)
            if "Epoch: [0][0]" in line:
                break
        os.killpg(proc.pid, signal.SIGINT)
        err.append(proc.communicate(timeout=120)[1])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = "".join(err)
    assert "Traceback" not in err and "Error" not in err, err[-3000:]  # nor from the workers
    where = os.path.join(dump, "checkpoint.pth.tar")
    last = err.strip().splitlines()[-1]
    assert f"interrupted (Ctrl-C): checkpoint at {where}" in last, err[-3000:]
    assert proc.returncode == 130, err[-3000:]  # 128 + SIGINT, as a shell reports Ctrl-C
    assert _load(dump)["epoch"] < 50  # a checkpoint of this step, loadable


def test_signal_on_last_step_ends_epoch_normally(image_folder, tmp_path, monkeypatch):
    dump = str(tmp_path / "run")
    _signal_at_step(monkeypatch, 2)  # the last iteration of epoch 0
    with pytest.raises(SystemExit) as stop:
        _main(tiny_swav_argv(image_folder, dump, EXTRA))
    assert stop.value.code == preemption.REQUEUE_EXIT_CODE
    ckp = _load(dump)
    assert ckp["epoch"] == 1 and "start_iter" not in ckp and "epoch_state" not in ckp
    assert os.path.isfile(os.path.join(dump, "checkpoints", "ckp-0.pth"))


def test_not_installed_never_stops():
    preemption._state.received = "SIGUSR1"
    assert preemption.requested() and not preemption.should_stop()


@pytest.mark.parametrize("scontrol_status,expected", [(0, 0), (1, preemption.REQUEUE_EXIT_CODE)])
def test_requeue_under_slurm(tmp_path, monkeypatch, scontrol_status, expected):
    """Rank 0 runs `scontrol requeue $SLURM_JOB_ID`: exit 0 when it worked, 75 when it did not."""
    _fake_scontrol(tmp_path, monkeypatch, scontrol_status)
    args = main_swav.get_args_parser().parse_args(["--dump_path", str(tmp_path)])
    args.rank, args.world_size = 0, 1
    with pytest.raises(SystemExit) as stop:
        preemption.exit_after_checkpoint(args)
    assert stop.value.code == expected
    assert (tmp_path / "called").read_text().split() == ["requeue", "4242"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # Slurm's SIGTERM during the exit
    preemption.reset()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def _agree(rank, port, signalled, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    preemption.install()
    answers = [preemption.should_stop()]
    if rank in signalled:
        os.kill(os.getpid(), signal.SIGUSR1)
    answers.append(preemption.should_stop())
    answers.append(preemption.should_stop())  # sticky, and still a matched collective
    out.put((rank, answers))
    dist.destroy_process_group()


def test_ranks_agree_when_only_one_is_signalled():
    results, codes = fork_ranks(_agree, {1})
    assert codes == [0, 0]
    assert results == {0: [False, True, True], 1: [False, True, True]}


def _tensorboard_steps(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(logdir)
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_a_cut_epoch_writes_no_tensorboard_scalars(uninterrupted, tmp_path, monkeypatch):
    """TensorBoard gets an epoch's scalars as the stats file gets its row: once, for a whole
    epoch. A stop request that cuts epoch 1 leaves epoch 0's only; the resumed run writes
    epoch 1's once."""
    image_folder, _ = uninterrupted
    dump = str(tmp_path / "tb_run")
    argv = tiny_swav_argv(image_folder, dump, EXTRA + ["--tensorboard", "true"])
    real_loss = main_swav.swav_loss
    _signal_at_step(monkeypatch, 4)  # epoch 1, iteration 1
    with pytest.raises(SystemExit):
        _main(argv)
    assert _load(dump)["start_iter"] == 2  # cut mid-epoch
    logdir = os.path.join(dump, "tb")
    assert _tensorboard_steps(logdir, "swav/loss") == [0]
    monkeypatch.setattr(main_swav, "swav_loss", real_loss)
    preemption.reset()
    _main(argv)
    assert _tensorboard_steps(logdir, "swav/loss") == [0, 1]

"""Fault injection: each fault of docs/README_reliability.md is caused here and its outcome
asserted (the message, the exit status, the checkpoint still loadable, nothing lost).

Faults are injected from outside the production code: files corrupted on disk, a process
killed with SIGKILL, and a wrapper script (written by the test) that replaces
`main_swav.swav_loss` on one rank to raise, die or hang."""
import argparse
import logging
import math
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

import main_swav
from conftest import ROOT, entry_args, free_port, make_image_folder, tiny_swav_argv
from src.checkpoint import CheckpointError, remove_stale_tmp_files, safe_load
from src.cli import run_main
from src.engine import (EpochProgress, NonFiniteGuard, NonFiniteLossError, backward_and_step,
                        build_loader)
from src.monitor import CollapseError, CollapseMonitor
from src.imagelist import class_counts
from src.multicropdataset import DataError, MultiCropDataset

PY = sys.executable
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # 2 OpenMP threads on 2 shared busy cores spin for ages


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def swav(data, dump, extra=()):
    """main_swav.main in this process (no interpreter start-up: a tiny run takes ~1 s)."""
    args = main_swav.get_args_parser().parse_args(tiny_swav_argv(data, dump, list(extra)))
    return main_swav.main(args)


def log_of(dump):
    with open(os.path.join(dump, "train.log")) as f:
        return f.read()


def weights(path):
    return safe_load(path)["state_dict"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ============================================================================ collapse
def test_collapse_monitor_warns_once_after_patience_and_summarises(caplog):
    k, ln_k = 20, math.log(20)
    mon = CollapseMonitor(k, patience=5, start_iter=3)
    uniform = torch.full((8, k), 1.0 / k)
    with caplog.at_level(logging.INFO):
        for it in range(6):  # healthy: sharp codes, loss well below ln(K)
            codes = torch.nn.functional.one_hot(torch.arange(8) + it, k).float()
            mon.update(torch.tensor(0.5 * ln_k), codes=[codes, codes], iteration=it)
        healthy = mon.epoch_summary(0)
        for it in range(6, 20):
            loss = ln_k * (1.004 if it != 9 else 0.9)  # one iteration off ln(K) resets the run
            mon.update(loss, codes=[uniform], iteration=it)
            assert mon.warned == (it >= 14), it  # 10..14: five iterations in a row
        collapsed = mon.epoch_summary(1)
    assert healthy["prototypes_used"] == [13] and healthy["assignment_entropy"] < 1e-6
    assert abs(healthy["loss_over_ln_k"] - 0.5) < 1e-6 and not healthy["collapsed"]
    assert collapsed["collapsed"] and abs(collapsed["entropy_over_ln_k"] - 1) < 1e-4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "ln(K) = 2.996" in warnings[0] and "--epsilon (e.g. 0.03" in warnings[0]
    assert "--freeze_prototypes_niters" in warnings[0] and "--queue_length" in warnings[0]
    assert "prototypes used 13/20" in caplog.text and "1.00 ln(K)" in caplog.text
    # the frozen-prototype phase is not counted: at ln(K) from the start, no warning before
    mon = CollapseMonitor(k, patience=5, start_iter=100)
    for it in range(100):
        mon.update(ln_k, iteration=it)
    assert not mon.warned


def test_collapse_monitor_for_deepcluster_heads_and_stop():
    ks = [5, 7]  # two heads: the collapsed loss is the mean of ln(K_h)
    mon = CollapseMonitor(ks, patience=3, stop=True, name="DeepCluster-v2", remedies=["a remedy"])
    assign = [torch.tensor([0, 1, -100, 1]), torch.tensor([2, 2, 2, 2])]
    mon.update(1.0, assignments=assign, iteration=0)
    with pytest.raises(CollapseError, match=r"DeepCluster-v2 collapsed.*ln\(K\) = 1.778.*a remedy"):
        for it in range(1, 10):
            mon.update((math.log(5) + math.log(7)) / 2, assignments=assign, iteration=it)
    assert it == 3  # stopped on the third iteration in a row at ln(K)
    s = mon.epoch_summary()
    assert s["prototypes_used"] == [2, 1] and abs(s["effective_prototypes"][1] - 1) < 1e-6


def _two_rank_monitor(rank, port, results):
    """One rank of a 2-process gloo group (forked: no interpreter start-up)."""
    import datetime
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=30))
    mon = CollapseMonitor(10, patience=3, stop=True)
    codes = torch.full((4, 10), 0.1) if rank else torch.eye(10)[:4] * 0.9 + 0.01
    stopped = None
    try:
        for it in range(10):  # only rank 1 sits at ln(K)
            mon.update(torch.tensor(math.log(10) if rank else 1.0), codes=codes, iteration=it)
    except CollapseError as e:
        stopped = (it, str(e))
    summary = mon.epoch_summary(0)  # all-reduced over both ranks
    results.put((rank, stopped, summary["prototypes_used"]))
    dist.destroy_process_group()


def test_stop_on_collapse_stops_every_rank_at_the_same_iteration():
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_two_rank_monitor, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    out = dict((r, (stopped, used)) for r, stopped, used in [results.get(timeout=60)
                                                            for _ in procs])
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert out[1][0][0] == out[0][0][0] == 2  # the third iteration at ln(K), on both ranks
    assert out[1][0][1].startswith("SwAV collapsed: the loss stayed within 1% of ln(K) = 2.303")
    assert out[0][0][1].startswith("SwAV collapsed (detected on another rank)")
    assert out[0][1] == out[1][1] == [4]  # rank 0 uses ids 0-3, rank 1's argmax is 0


def test_swav_run_configured_to_collapse_stops_cleanly(tmp_path, image_folder, monkeypatch):
    """epsilon 10 makes the Sinkhorn codes uniform: the network learns to predict a uniform
    distribution and the loss goes to ln(K); --stop_on_collapse ends the run with one line."""
    dump = str(tmp_path / "run")
    argv = tiny_swav_argv(image_folder, dump, [
        "--epochs", "30", "--epsilon", "10", "--freeze_prototypes_niters", "0",
        "--warmup_epochs", "0", "--base_lr", "4.8", "--final_lr", "4.8",
        "--collapse_patience", "6", "--stop_on_collapse", "true"])
    monkeypatch.setattr(sys, "argv", ["main_swav.py", *argv])
    with pytest.raises(SystemExit) as exit_info:  # the __main__ block's path
        run_main(main_swav.main, argparse.ArgumentParser(parents=[main_swav.get_args_parser()]))
    message = str(exit_info.value.code)
    assert message.startswith("error: SwAV collapsed") and "\n" not in message
    assert "ln(K) = 2.996" in message and "--epsilon" in message
    log = log_of(dump)
    assert "SwAV looks collapsed at iteration" in log and "e.g. 0.03" in log
    # it stopped mid-run, before the last epoch; the checkpoint it left loads
    last_epoch = safe_load(os.path.join(dump, "checkpoint.pth.tar"))["epoch"]
    assert 1 <= last_epoch < 30


# ============================================================================ non-finite
def test_nan_loss_stops_naming_iteration_and_keeps_last_checkpoint(tmp_path, image_folder,
                                                                   monkeypatch):
    dump = str(tmp_path / "run")
    swav(image_folder, dump, ["--epochs", "1"])  # 3 iterations per epoch
    before = open(os.path.join(dump, "checkpoint.pth.tar"), "rb").read()
    real, calls = main_swav.swav_loss, []

    def nan_at_iteration_4(*a, **kw):
        calls.append(1)
        loss = real(*a, **kw)
        return loss * float("nan") if len(calls) == 2 else loss  # epoch 1 starts at iteration 3

    monkeypatch.setattr(main_swav, "swav_loss", nan_at_iteration_4)
    with pytest.raises(NonFiniteLossError, match="loss is nan at iteration 4.*not overwritten"):
        swav(image_folder, dump, ["--epochs", "2"])
    assert open(os.path.join(dump, "checkpoint.pth.tar"), "rb").read() == before
    assert not os.path.exists(os.path.join(dump, "checkpoints", "ckp-1.pth"))
    # nothing lost: the run resumes from that checkpoint and finishes
    monkeypatch.setattr(main_swav, "swav_loss", real)
    swav(image_folder, dump, ["--epochs", "2"])
    assert safe_load(os.path.join(dump, "checkpoint.pth.tar"))["epoch"] == 2


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.prototypes = nn.Linear(2, 4, bias=False)

    def forward(self, x):
        return self.prototypes(self.layer(x))


def test_nonfinite_gradient_fp32_stops_before_the_update():
    torch.manual_seed(0)
    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.zeros(5, 3)
    x[0, 0] = 1.0
    # finite loss, NaN gradient: d sqrt(|w|)/dw at w = 0
    loss = model(x).sum() * 0 + torch.sqrt(model.layer.weight.abs() * 0).sum()
    with pytest.raises(NonFiniteLossError, match=r"gradient of layer\.weight at iteration 7"):
        backward_and_step(loss, model, opt, None, iteration=7)
    assert same_weights(before, model.state_dict()) and not opt.state
    # a finite step goes through
    backward_and_step(model(x).pow(2).mean(), model, opt, None, iteration=8)
    assert not same_weights(before, model.state_dict())


def test_fp16_scaler_skips_bad_steps_then_stops_after_max_consecutive():
    torch.manual_seed(0)
    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    scaler.nonfinite_guard = NonFiniteGuard(max_steps=3)
    x = torch.randn(4, 3)

    def step(it, bad):
        w = {k: v.clone() for k, v in model.state_dict().items()}
        loss = model(x).pow(2).mean() * (float("inf") if bad else 1.0)
        backward_and_step(loss, model, opt, scaler, iteration=it)
        return not same_weights(w, model.state_dict())

    # an overflow now and then is skipped (weights untouched, scale halved), the run goes on
    assert not step(0, True) and not step(1, True) and scaler.get_scale() == 2.0 ** 14
    assert step(2, False) and scaler.nonfinite_guard.consecutive == 0
    assert not step(3, True) and not step(4, True)
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps skipped.*iteration 5.*"
                                                 r"--max_nonfinite_steps 3"):
        step(5, True)
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        NonFiniteGuard(0)


# ============================================================================ data
def _break_images(root):
    garbage = os.path.join(root, "class_0", "img_3.jpg")
    with open(garbage, "wb") as f:
        f.write(b"this is not an image")
    truncated = os.path.join(root, "class_2", "img_5.jpg")
    with open(truncated, "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    return garbage, truncated


def test_unreadable_images_counted_across_loader_workers(tmp_path, image_folder, caplog):
    bad = _break_images(image_folder)
    log_file = str(tmp_path / "worker.log")  # forked workers inherit this handler
    handler = logging.FileHandler(log_file)
    logging.getLogger().addHandler(handler)
    try:
        ds = MultiCropDataset(image_folder, [16], [2], [0.3], [1])
        args = entry_args("main_swav", ["--seed", "0", "--workers", "2", "--batch_size", "4"],
                          world_size=1, rank=0, device="cpu")
        loader = build_loader(ds, args)  # 24 images, 6 batches: every file is read once
        with caplog.at_level(logging.WARNING):
            for epoch in range(2):
                loader.sampler.set_epoch(epoch)
                assert sum(1 for _ in EpochProgress(loader, epoch, args)) == 6
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    ends = [r.getMessage() for r in caplog.records if "unreadable image(s) skipped" in r.getMessage()]
    assert ends == [f"epoch {e}: 2 unreadable image(s) skipped, each replaced by the next readable "
                    "one (the warnings above name them; --strict_data stops on the first instead)"
                    for e in range(2)]
    assert ds.nmb_bad_images == 4  # the workers' counts reach the main process
    worker_log = open(log_file).read()
    assert all(worker_log.count(f"skipping unreadable image {p}") == 2 for p in bad)

    strict = MultiCropDataset(image_folder, [16], [2], [0.3], [1], strict_data=True)
    with pytest.raises(DataError) as e:
        for _ in build_loader(strict, args):
            pass
    assert str(e.value).startswith("unreadable image ") and str(e.value).split(":")[0][17:] in bad
    assert "\n" not in str(e.value)  # the worker's traceback is not in the one-line message


def test_folder_problems_are_reported(tmp_path, caplog):
    root = make_image_folder(str(tmp_path / "d"), classes=2, per_class=2)
    os.makedirs(os.path.join(root, "class_empty"))
    for name in ["a.gif", "b.gif", "notes.txt", ".DS_Store"]:
        open(os.path.join(root, "class_0", name), "w").close()
    with caplog.at_level(logging.WARNING):
        counts = class_counts(root)
    assert counts == {"class_0": 2, "class_1": 2, "class_empty": 0}
    assert "1 class folder(s) without images are ignored: ['class_empty']" in caplog.text
    assert "ignored 3 file(s) with other extensions: .gif x2, .txt x1" in caplog.text
    only_gifs = tmp_path / "gifs"
    (only_gifs / "c").mkdir(parents=True)
    (only_gifs / "c" / "x.gif").write_bytes(b"GIF89a")
    with pytest.raises(DataError, match=r"contains no images .*found 1 file\(s\) with other "
                                        r"extensions: \.gif x1"):
        class_counts(str(only_gifs))


# ============================================================================ atomic state
_SAVER = """
import sys, torch
sys.path.insert(0, {root!r})
from src.checkpoint import atomic_save
i = 0
while True:  # ~16 MB per save, so most of the time is spent inside torch.save
    atomic_save({{"step": i, "w": torch.full((4_000_000,), float(i))}}, {path!r})
    i += 1
"""


def test_kill_9_during_save_leaves_a_loadable_checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint.pth.tar")
    script = tmp_path / "saver.py"
    script.write_text(_SAVER.format(root=ROOT, path=path))
    caught_mid_save = False
    for attempt in range(4):
        before = os.stat(path).st_mtime_ns if os.path.exists(path) else None
        proc = subprocess.Popen([PY, str(script)], env={**os.environ, **ONE_THREAD})
        try:
            deadline = time.time() + 60  # wait until this child has saved once
            while time.time() < deadline and (
                    not os.path.exists(path) or os.stat(path).st_mtime_ns == before):
                time.sleep(0.01)
            time.sleep(0.13 + 0.07 * attempt)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        ckp = safe_load(path)  # whatever the moment of the kill, the previous save loads
        assert torch.all(ckp["w"] == ckp["step"])
        leftovers = [f for f in os.listdir(tmp_path) if ".tmp" in f]
        caught_mid_save |= bool(leftovers)
        remove_stale_tmp_files(str(tmp_path))  # what a resume does first
        assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
        if caught_mid_save:
            break
    assert caught_mid_save, "the kill never landed inside torch.save"


def test_corrupt_checkpoint_falls_back_to_newest_good_copy(tmp_path, image_folder):
    dump = str(tmp_path / "run")
    swav(image_folder, dump, ["--epochs", "2"])
    ckp, ckps = os.path.join(dump, "checkpoint.pth.tar"), os.path.join(dump, "checkpoints")
    good0 = weights(os.path.join(ckps, "ckp-0.pth"))
    with open(ckp, "r+b") as f:  # a truncated file
        f.truncate(os.path.getsize(ckp) // 2)
    with open(os.path.join(ckps, "ckp-1.pth"), "wb") as f:  # garbage
        f.write(b"\0" * 100)
    open(ckp + ".tmp12345", "wb").close()  # left by a save killed earlier
    swav(image_folder, dump, ["--epochs", "3"])
    log = log_of(dump)
    assert f"cannot resume from {ckp}: not a loadable weights file" in log
    assert f"cannot resume from {ckps}/ckp-1.pth" in log
    assert f"resuming from {ckps}/ckp-0.pth (epoch 1), the newest loadable checkpoint" in log
    assert "Epoch: [1][0]" in log and "Epoch: [2][0]" in log
    assert not os.path.exists(ckp + ".tmp12345")
    import pandas as pd
    assert list(pd.read_pickle(os.path.join(dump, "stats0.pkl"))["epoch"]) == [0, 1, 2]
    assert safe_load(ckp)["epoch"] == 3 and not same_weights(weights(ckp), good0)

    # every checkpoint corrupt: an error, never a silent start from scratch
    for name in [ckp] + [os.path.join(ckps, f) for f in os.listdir(ckps)]:
        with open(name, "wb") as f:
            f.write(b"PK\x03\x04 corrupt")
    with pytest.raises(CheckpointError, match=r"no loadable checkpoint among 4 file\(s\)"):
        swav(image_folder, dump, ["--epochs", "4"])


def test_explicit_resume(tmp_path, image_folder):
    src_dump, dump = str(tmp_path / "a"), str(tmp_path / "b")
    swav(image_folder, src_dump, ["--epochs", "1"])
    with pytest.raises(CheckpointError, match=r"--resume .*nope.pth: no such file"):
        swav(image_folder, dump, ["--resume", str(tmp_path / "nope.pth")])
    with open(tmp_path / "bad.pth", "wb") as f:
        f.write(b"garbage")
    with pytest.raises(CheckpointError, match="bad.pth: not a loadable weights file"):
        swav(image_folder, dump, ["--resume", str(tmp_path / "bad.pth")])
    swav(image_folder, dump, ["--resume", os.path.join(src_dump, "checkpoint.pth.tar")])
    log = log_of(dump)
    assert "Epoch: [0][0]" not in log and "Epoch: [1][0]" in log
    assert safe_load(os.path.join(dump, "checkpoint.pth.tar"))["epoch"] == 2


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling this would create the file
        return (open, (self.path, "w"))


def test_malicious_pickle_is_not_executed(tmp_path, image_folder, monkeypatch):
    marker = str(tmp_path / "pwned")
    plain, zipped = str(tmp_path / "evil.pkl"), str(tmp_path / "evil.pth")
    with open(plain, "wb") as f:
        pickle.dump({"state_dict": _Evil(marker)}, f, protocol=2)
    torch.save({"epoch": 3, "state_dict": _Evil(marker)}, zipped)
    for path in (plain, zipped):
        with pytest.raises(CheckpointError, match="refused to unpickle (builtins|io).open"):
            safe_load(path)
    # as --resume of a run, through the __main__ block: a one-line error, no code run
    monkeypatch.setattr(sys, "argv", ["main_swav.py", *tiny_swav_argv(
        image_folder, str(tmp_path / "r"), ["--resume", zipped])])
    with pytest.raises(SystemExit) as exit_info:  # a str code: printed, exit status 1
        run_main(main_swav.main, argparse.ArgumentParser(parents=[main_swav.get_args_parser()]))
    message = str(exit_info.value.code)
    assert message.startswith(f"error: {zipped}: not a loadable weights file (refused to "
                              "unpickle") and "\n" not in message
    assert not os.path.exists(marker)


# ============================================================================ distributed
_INJECT = """
import argparse, os, signal, sys, time
sys.path.insert(0, {root!r})
import main_swav
from src.cli import run_main

fault, at_call = sys.argv.pop(1), int(sys.argv.pop(1))
real, calls = main_swav.swav_loss, [0]

def swav_loss(*args, **kwargs):
    if os.environ.get("RANK") == "1" and calls[0] == at_call:
        if fault == "raise":
            raise RuntimeError("injected fault on rank 1")
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault == "hang":
            time.sleep(600)
    calls[0] += 1
    return real(*args, **kwargs)

main_swav.swav_loss = swav_loss
run_main(main_swav.main, argparse.ArgumentParser(parents=[main_swav.get_args_parser()]))
"""


def _inject_script(tmp_path):
    path = tmp_path / "inject.py"
    path.write_text(_INJECT.format(root=ROOT))
    return str(path)


@pytest.mark.parametrize("fault", ["raise", "kill"])
def test_one_rank_failing_ends_the_torchrun_job(tmp_path, image_folder, fault):
    argv = tiny_swav_argv(image_folder, str(tmp_path / "run"), ["--epochs", "3"])
    start = time.time()
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--max-restarts", "0", "--master_port", str(free_port()),
                        _inject_script(tmp_path), fault, "1", *argv],
                       cwd=ROOT, capture_output=True, text=True, timeout=180,
                       env={**os.environ, **ONE_THREAD})
    elapsed = time.time() - start
    assert r.returncode != 0 and elapsed < 120
    err = r.stderr
    assert "Root Cause" in err and "rank      : 1 (local_rank: 1)" in err, err[-3000:]
    if fault == "raise":
        assert "injected fault on rank 1" in err
    else:
        assert "Signal 9 (SIGKILL)" in err or "exitcode  : -9" in err, err[-3000:]
    # the epoch finished before the fault was saved and loads
    assert safe_load(str(tmp_path / "run" / "checkpoint.pth.tar"))["epoch"] == 1


def test_hung_rank_times_out_without_a_launcher(tmp_path, image_folder):
    """No torchrun (e.g. srun without --kill-on-bad-exit): rank 1 hangs inside an iteration, so
    rank 0 waits in a collective; --dist_timeout_min bounds the wait and rank 0 exits non-zero."""
    argv = tiny_swav_argv(image_folder, str(tmp_path / "run"),
                          ["--epochs", "3", "--dist_timeout_min", "0.15"])  # 9 s
    env = {**os.environ, **ONE_THREAD, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    script = _inject_script(tmp_path)
    procs = [subprocess.Popen([PY, script, "hang", "1", *argv], cwd=ROOT, env={
        **env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        _, err0 = procs[0].communicate(timeout=120)
        assert procs[0].returncode == 1
        last = err0.strip().splitlines()[-1]
        assert last.startswith("error: rank 0: a collective timed out"), err0[-2000:]
        assert procs[1].poll() is None  # the hung rank is the one still there
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()

"""Reliability (issue 20): the original's checkpoints with numpy scalars load under
weights_only=True, non-finite model state is never saved over the last good checkpoint, a full
disk ends in one line and keeps the previous file, weights that leave much of the backbone
random are refused; a --dump_path that is a file and a negative --width are one-line errors."""
import errno
import os
import runpy
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from conftest import ROOT, tiny_swav_argv
from src import checkpoint as ck
from src.pretrained import load_pretrained


def test_original_checkpoint_with_numpy_learning_rates_loads(tmp_path):
    # the original saved optimizer.state_dict() whose param_groups hold numpy float64 lrs
    sgd = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    sgd.param_groups[0]["lr"] = np.float64(0.0048)
    path = str(tmp_path / "checkpoint.pth.tar")
    torch.save({"epoch": np.int64(3), "optimizer": sgd.state_dict()}, path)
    state = ck.safe_load(path)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0048)
    assert int(state["epoch"]) == 3


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_that_runs_code_is_still_refused(tmp_path):
    path = str(tmp_path / "evil.pth")
    torch.save({"lr": np.float64(0.1), "x": _RunsCode()}, path)
    with pytest.raises(ck.CheckpointError, match="not a loadable weights file"):
        ck.safe_load(path)


def test_inf_batchnorm_statistics_are_not_saved(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    path = str(tmp_path / "checkpoint.pth.tar")
    ck.atomic_save({"state_dict": ck.model_state_dict(model)}, path)  # finite: saved
    model[1].running_var[2] = float("inf")  # the loss stays finite in training mode
    with pytest.raises(ck.NonFiniteStateError, match=r"module\.1\.running_var"):
        ck.atomic_save({"state_dict": ck.model_state_dict(model)}, path)
    saved = ck.safe_load(path)["state_dict"]["module.1.running_var"]
    assert torch.isfinite(saved).all()  # the last good checkpoint is kept


def test_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth.tar")
    ck.atomic_save({"w": torch.ones(3)}, path)

    def no_space(obj, f, *a, **k):
        open(f, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(ck.CheckpointError, match="no space left on device writing .*checkpoint"):
        ck.atomic_save({"w": torch.zeros(1 << 20)}, path)
    monkeypatch.undo()
    assert torch.equal(ck.safe_load(path)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint.pth.tar"]  # no temporary file left


def test_weights_with_most_of_the_backbone_missing_are_refused(tmp_path):
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(10)])
    half = {k: v for k, v in model.state_dict().items() if not k.startswith(("0.", "1."))}
    path = str(tmp_path / "weights.pth")
    torch.save(half, path)
    with pytest.raises(ck.CheckpointError, match="would stay at their random initialisation"):
        load_pretrained(model, path)
    load_pretrained(model, path, allow_missing=True)  # asked for: loads and warns once


def _script(monkeypatch, script, argv):
    """The one-line exit message of `script`'s own __main__ block run with `argv`, here (a
    subprocess costs an import of torch)."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    message = str(exit_.value.code)  # sys.exit("error: ..."): printed as is, exit status 1
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("script", ["main_swav.py", "main_deepclusterv2.py", "main_simsiam.py",
                                    "eval_linear.py", "eval_semisup.py", "eval_knn.py"])
def test_negative_width_is_one_line(script, tmp_path, monkeypatch):
    message = _script(monkeypatch, script, ["--width", "-3", "--dump_path", str(tmp_path / "r")])
    assert message == "error: --width must be > 0 (or 0: the arch's default, 64 x widen), got -3"
    assert not os.path.exists(tmp_path / "r")  # refused before any work


def test_negative_width_on_a_real_run_is_one_line(image_folder, tmp_path, monkeypatch):
    # without the check the tiny run reaches the model and dies in a convolution's constructor
    argv = tiny_swav_argv(image_folder, str(tmp_path / "r"), ["--width", "-3"])
    assert "--width must be > 0" in _script(monkeypatch, "main_swav.py", argv)


@pytest.mark.parametrize("script", ["main_swav.py", "eval_knn.py"])
@pytest.mark.parametrize("under", ["", "sub"])
def test_dump_path_naming_a_file_is_one_line(script, under, image_folder, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("not a folder")
    dump = os.path.join(str(tmp_path / "a_file"), under) if under else str(tmp_path / "a_file")
    message = _script(monkeypatch, script, tiny_swav_argv(image_folder, dump)
                      if script == "main_swav.py" else ["--dump_path", dump])
    expected = (f"error: --dump_path {dump} is a file, not a folder" if not under else
                f"error: --dump_path {dump}: cannot create the folder (Not a directory)")
    assert message.startswith(expected), message


def _save_like_the_original(module, argv, dump):
    """A dump path as the original's main_swav.py / main_deepclusterv2.py leave it after epoch 0:
    checkpoint.pth.tar = {epoch, state_dict of the DDP model ('module.' keys), the LARC-wrapped
    SGD's state_dict with numpy float64 lrs} (no 'args'), plus queue0.pth / mb0.pth."""
    from src.engine import build_larc_sgd
    from src.resnet50 import build_backbone
    args = module.get_args_parser().parse_args(argv)
    torch.manual_seed(5)
    model = build_backbone(args.arch, normalize=True, hidden_mlp=args.hidden_mlp,
                           output_dim=args.feat_dim, nmb_prototypes=args.nmb_prototypes,
                           cifar_stem=args.cifar_stem, width=args.width)
    optimizer = build_larc_sgd(model, args)
    _, out = model([torch.randn(4, 3, 16, 16)])
    (out[0] if isinstance(out, list) else out).sum().backward()
    optimizer.step()  # momentum buffers, as after a real epoch
    for group in optimizer.param_groups:
        group["lr"] = np.float64(0.0123)  # the original set lrs from a numpy schedule
    os.makedirs(dump)
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict()}, os.path.join(dump, "checkpoint.pth.tar"))
    return args, model


@pytest.mark.parametrize("method", ["swav", "deepclusterv2"])
def test_original_training_checkpoint_resumes(method, image_folder, tmp_path, monkeypatch):
    import main_deepclusterv2
    import main_swav
    module = main_swav if method == "swav" else main_deepclusterv2
    dump = str(tmp_path / "run")
    extra = (["--queue_length", "16", "--epoch_queue_starts", "0"] if method == "swav" else
             ["--nmb_prototypes", "6", "5"])
    argv = tiny_swav_argv(image_folder, dump, extra)
    args, model = _save_like_the_original(module, argv, dump)
    if method == "swav":
        queue = torch.nn.functional.normalize(torch.randn(2, 16, args.feat_dim), dim=-1)
        torch.save({"queue": queue}, os.path.join(dump, "queue0.pth"))
    else:  # 24 images, batch 8: 24 rows per crop
        torch.save({"local_memory_embeddings": torch.nn.functional.normalize(
                        torch.randn(2, 24, args.feat_dim), dim=-1),
                    "local_memory_index": torch.randperm(24)}, os.path.join(dump, "mb0.pth"))
    monkeypatch.setattr(sys, "argv", ["x"])
    module.main(module.get_args_parser().parse_args(argv))
    state = ck.safe_load(os.path.join(dump, "checkpoint.pth.tar"))
    assert state["epoch"] == 2  # resumed at epoch 1 and trained one epoch more
    stats = pd.read_pickle(os.path.join(dump, "stats0.pkl"))
    assert stats["epoch"].tolist() == [1]
    saved = {"module." + k: v for k, v in model.state_dict().items()}
    assert state["state_dict"].keys() == saved.keys()
    moved = [k for k, v in state["state_dict"].items()
             if v.is_floating_point() and not torch.equal(v, saved[k])]
    assert "module.conv1.weight" in moved  # started from the original's weights, then trained
    with open(os.path.join(dump, "train.log")) as f:
        log = f.read()
    assert "epoch 1" in log.lower() or "Epoch: [1]" in log

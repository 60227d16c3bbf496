"""eval_linear.py: RegLog as the original, --pretrained in every format, bad input, a short run
(resume, no collision with pre-training files, TensorBoard) in one process and under torchrun."""
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torch.nn as nn

from conftest import ROOT, entry_args, free_port, make_image_folder, make_split_folder

import eval_linear
from eval_linear import RegLog
from src import evaluation
from src.checkpoint import CheckpointError
from src.evaluation import build_eval_datasets, build_frozen_backbone, check_train_val
from src.multicropdataset import DataError
from src.resnet50 import build_backbone


# ----------------------------------------------------------------------------- RegLog
@pytest.mark.parametrize("arch,width", [("resnet50", 2048), ("resnet50w2", 4096),
                                        ("resnet50w4", 8192), ("resnet50w5", 10240),
                                        ("resnet18", 512), ("resnet34", 512)])
def test_reglog_global_pooling_shapes_and_init(arch, width):
    torch.manual_seed(0)
    head = RegLog(1000, arch, global_avg=True, use_bn=True)
    assert isinstance(head.av_pool, nn.AdaptiveAvgPool2d) and head.bn is None  # as the original
    assert head.linear.weight.shape == (1000, width)
    assert abs(head.linear.weight.std().item() - 0.01) < 1e-3
    assert head.linear.bias.abs().max().item() == 0
    assert sorted(head.state_dict()) == ["linear.bias", "linear.weight"]
    fmap = torch.randn(2, width, 3, 3)
    out = head(fmap)
    assert out.shape == (2, 1000)
    # the math: a linear layer on the spatial mean; pooled [N, D] inputs give the same
    torch.testing.assert_close(out, head.linear(fmap.mean((2, 3))))
    torch.testing.assert_close(head(fmap.mean((2, 3))), out)


@pytest.mark.parametrize("use_bn", [True, False])
def test_reglog_without_global_pooling_is_resnet50_6x6_pool(use_bn):
    head = RegLog(10, "resnet50", global_avg=False, use_bn=use_bn)
    assert isinstance(head.av_pool, nn.AvgPool2d) and head.av_pool.kernel_size == 6
    assert head.linear.weight.shape == (10, 8192)
    assert (head.bn is not None) == use_bn
    if use_bn:
        assert isinstance(head.bn, nn.BatchNorm2d) and head.bn.num_features == 2048
        assert set(head.state_dict()) >= {"bn.weight", "bn.running_mean", "linear.weight"}
    head.eval()
    fmap = torch.randn(2, 2048, 7, 7)
    pooled = nn.functional.avg_pool2d(fmap, 6, stride=1)  # 2 x 2048 x 2 x 2
    if use_bn:
        pooled = head.bn(pooled)
    torch.testing.assert_close(head(fmap), head.linear(pooled.reshape(2, -1)))
    with pytest.raises(ValueError, match="only defined for resnet50"):
        RegLog(10, "resnet18", global_avg=False)


def test_reglog_takes_the_backbone_width():
    head = RegLog(7, "resnet18", global_avg=True, num_features=64)
    assert head.linear.weight.shape == (7, 64)


# ----------------------------------------------------------------------------- --pretrained
def small_args(**kw):
    return entry_args("eval_linear", ["--arch", "resnet18", "--width", "8", "--cifar_stem", "true"],
                      device="cpu", **kw)


def test_every_checkpoint_format_loads_the_same_backbone(tmp_path):
    torch.manual_seed(0)
    swav = build_backbone("resnet18", width=8, cifar_stem=True, normalize=True, hidden_mlp=32,
                          output_dim=16, nmb_prototypes=10)
    with torch.no_grad():  # non-default BN statistics must come through too
        for m in swav.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    prefixed = {"module." + k: v for k, v in swav.state_dict().items()}
    backbone_only = {k: v for k, v in swav.state_dict().items()
                     if not k.startswith(("projection_head", "prototypes"))}
    files = {
        "ours.pth.tar": {"epoch": 3, "state_dict": prefixed, "optimizer": {"state": {}}},
        "released.pth": prefixed,  # the model zoo's flat module.-prefixed files
        "torchvision.pth": {**backbone_only, "fc.weight": torch.zeros(5, 64),
                            "fc.bias": torch.zeros(5)},
    }
    expected = {k: v for k, v in backbone_only.items()}
    for name, obj in files.items():
        path = str(tmp_path / name)
        torch.save(obj, path)
        model = build_frozen_backbone(small_args(pretrained=path), 32)
        got = model.state_dict()
        assert set(expected) <= set(got)
        for k, v in expected.items():
            assert torch.equal(got[k], v), (name, k)
        assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_pretrained_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        build_frozen_backbone(small_args(pretrained=str(tmp_path / "missing.pth")), 32)
    path = str(tmp_path / "other.pth")
    torch.save({"encoder_q.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="wrong --arch"):
        build_frozen_backbone(small_args(pretrained=path), 32)


# ----------------------------------------------------------------------------- bad input
def test_bad_data_layouts_are_one_line_errors(tmp_path):
    make_image_folder(str(tmp_path / "a" / "train"), classes=2, per_class=2, size=8)
    with pytest.raises(DataError, match="no val/ folder"):
        check_train_val(str(tmp_path / "a"))
    with pytest.raises(DataError, match="does not exist"):
        check_train_val(str(tmp_path / "nothing"))
    make_image_folder(str(tmp_path / "b" / "train"), classes=2, per_class=2, size=8)
    make_image_folder(str(tmp_path / "b" / "val"), classes=3, per_class=1, size=8)
    with pytest.raises(DataError, match="'class_2' .* is not in the training set"):
        build_eval_datasets(str(tmp_path / "b"), None, None)
    # val without one of train's classes keeps train's labels
    make_image_folder(str(tmp_path / "c" / "train"), classes=3, per_class=2, size=8)
    make_image_folder(str(tmp_path / "c" / "val"), classes=3, per_class=1, size=8)
    os.remove(tmp_path / "c" / "val" / "class_0" / "img_0.jpg")
    train, val = build_eval_datasets(str(tmp_path / "c"), None, None)
    assert val.class_to_idx == train.class_to_idx and sorted(val.targets) == [1, 2]


def test_cli_errors_are_one_line(tmp_path):
    make_image_folder(str(tmp_path / "d" / "train"), classes=2, per_class=2, size=8)
    proc = subprocess.run([sys.executable, "eval_linear.py", "--data_path", str(tmp_path / "d"),
                           "--dump_path", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --data_path")


# ----------------------------------------------------------------------------- short runs
@pytest.fixture(scope="module")
def split_folder(tmp_path_factory):
    """train/ 3 x 8 images; val/ 13 images (odd: a padded sampler would count 14)."""
    return make_split_folder(tmp_path_factory.mktemp("lin") / "data", 8, 4, extra_val=True)


def linear_argv(data, dump, extra=()):
    return ["--data_path", data, "--arch", "resnet18", "--width", "8", "--cifar_stem", "true",
            "--train_crop", "16", "--resize", "16", "--center_crop", "16", "--batch_size", "8",
            "--workers", "0", "--epochs", "2", "--lr", "0.1", "--dump_path", dump, *extra]


def counted_once(prec, n=13):
    return abs(prec * n / 100 - round(prec * n / 100)) < 1e-6


def test_short_run_resume_and_no_collision(split_folder, tmp_path, monkeypatch):
    parser = eval_linear.get_args_parser()
    dump = tmp_path / "run"
    dump.mkdir()
    pretrain_files = {"checkpoint.pth.tar": b"pretraining", "stats0.pkl": b"stats",
                      "train.log": b"log", "params.pkl": b"params"}
    for name, content in pretrain_files.items():
        (dump / name).write_bytes(content)
    final = eval_linear.main(parser.parse_args(linear_argv(split_folder, str(dump))))
    for name, content in pretrain_files.items():
        assert (dump / name).read_bytes() == content, name
    stats = pd.read_pickle(dump / "stats_eval_linear0.pkl")
    assert list(stats.columns) == ["epoch", "loss", "prec1", "prec5", "loss_val", "prec1_val",
                                   "prec5_val"]
    assert list(stats["epoch"]) == [0, 1] and counted_once(final["top1"])
    assert final["best_top1"] == pytest.approx(stats["prec1_val"].max())
    assert os.path.isfile(dump / "eval_linear.log")
    straight = torch.load(dump / "checkpoint_eval_linear.pth.tar", weights_only=True)

    # killed during epoch 1, then resumed: the same classifier as the straight run
    half = str(tmp_path / "half")
    real_train_epoch = evaluation.train_epoch

    def dies_in_epoch_1(forward, modules, loader, optimizer, epoch, args, scaler=None):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_train_epoch(forward, modules, loader, optimizer, epoch, args, scaler)

    monkeypatch.setattr(evaluation, "train_epoch", dies_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        eval_linear.main(parser.parse_args(linear_argv(split_folder, half)))
    monkeypatch.setattr(evaluation, "train_epoch", real_train_epoch)
    eval_linear.main(parser.parse_args(linear_argv(split_folder, half)))
    resumed = torch.load(os.path.join(half, "checkpoint_eval_linear.pth.tar"), weights_only=True)
    assert resumed["epoch"] == straight["epoch"] == 2
    for k, v in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][k], v, rtol=0, atol=0)
    assert len(pd.read_pickle(os.path.join(half, "stats_eval_linear0.pkl"))) == 2


def test_cached_features_pixels_and_tensorboard(split_folder, tmp_path, monkeypatch):
    """--cache_features on raw pixels; --tensorboard writes scalars through SummaryWriter."""
    written = []

    class FakeWriter:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    import src.tensorboard
    monkeypatch.setattr(src.tensorboard, "_summary_writer_class", lambda: FakeWriter)
    dump = str(tmp_path / "px")
    final = eval_linear.main(eval_linear.get_args_parser().parse_args(linear_argv(
        split_folder, dump, ["--arch", "pixels", "--cache_features", "true", "--epochs", "3",
                             "--tensorboard", "true"])))
    assert counted_once(final["top1"])
    assert written[0] == ("dir", os.path.join(dump, "tb", "eval_linear"))
    tags = {w[0] for w in written[1:]}
    assert {"eval_linear/prec1_val", "eval_linear/loss", "eval_linear/lr"} <= tags
    assert sorted({w[2] for w in written[1:]}) == [0, 1, 2]


def test_tensorboard_missing_is_a_warning(tmp_path, monkeypatch, caplog):
    import src.tensorboard
    monkeypatch.setattr(src.tensorboard, "_summary_writer_class", lambda: None)
    args = small_args(dump_path=str(tmp_path), tensorboard=True, rank=0)
    tb = src.tensorboard.TensorBoard(args)
    assert not tb.enabled
    tb.scalars(0, loss=1.0)  # a no-op
    assert "pip install tensorboard" in caplog.text


def test_torchrun_two_processes(split_folder, tmp_path):
    dump = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "eval_linear.py", *linear_argv(split_folder, dump)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = pd.read_pickle(os.path.join(dump, "stats_eval_linear0.pkl"))
    assert len(stats) == 2
    assert all(counted_once(p) for p in stats["prec1_val"])
    assert os.path.isfile(os.path.join(dump, "checkpoint_eval_linear.pth.tar"))
    assert not os.path.exists(os.path.join(dump, "stats_eval_linear1.pkl.tmp"))

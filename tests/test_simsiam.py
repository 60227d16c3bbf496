"""SimSiam: loss, stop-gradient, collapse metric, training against the original's step, the
checkpoint's backbone in load_pretrained, end-to-end runs (one process, torchrun), exact resume."""
import math
import os
import shutil
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

import main_simsiam
from conftest import ROOT, tensorboard_scalars
from src.cli import run_main
from src.pretrained import load_pretrained
from src.resnet50 import resnet18
from src.multicropdataset import MEAN, STD, PILRandomGaussianBlur, normalize_crops
from src.simsiam import (SimSiam, TwoViewDataset, normalized_std, optimizer_groups,
                         simsiam_loss, simsiam_lr_schedule, simsiam_transform)


def _tiny_argv(data, dump, extra=()):
    return ["--data_path", data, "--epochs", "2", "--batch_size", "8", "--size_crop", "16",
            "--dim", "32", "--pred_dim", "8", "--workers", "0", "--use_fp16", "false",
            "--checkpoint_freq", "1", "--dump_path", dump, "--arch", "resnet18", "--width", "8",
            "--cifar_stem", "true", "--device", "cpu", *extra]


def _parse(argv):
    return main_simsiam.get_args_parser().parse_args(argv)


def _backbone(seed=0):
    torch.manual_seed(seed)
    return resnet18(cifar_stem=True, width=8, zero_init_residual=True)


# ----------------------------------------------------------------------------- loss and metric
def test_loss_symmetric_and_minus_one_for_identical_outputs():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(6, 10, generator=g) for _ in range(4))
    loss = simsiam_loss(p1, p2, z1, z2)
    # swapping the views swaps (p1, z1) with (p2, z2)
    torch.testing.assert_close(simsiam_loss(p2, p1, z2, z1), loss)
    ref = -0.5 * (F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean())
    torch.testing.assert_close(loss, ref)
    z = F.normalize(torch.randn(6, 10, generator=g), dim=1)
    torch.testing.assert_close(simsiam_loss(z, z, z, z), torch.tensor(-1.0))
    # scale does not matter (cosine), opposite directions give +1
    torch.testing.assert_close(simsiam_loss(3 * z, z, z, z), torch.tensor(-1.0))
    torch.testing.assert_close(simsiam_loss(-z, -z, z, z), torch.tensor(1.0))


def test_no_gradient_through_the_target_branch():
    torch.manual_seed(0)
    pred = nn.Linear(8, 8)
    z1 = torch.randn(5, 8, requires_grad=True)
    z2 = torch.randn(5, 8, requires_grad=True)
    g1, g2 = torch.autograd.grad(simsiam_loss(pred(z1), pred(z2), z1, z2), [z1, z2])
    # expected: the gradient reaches z only through the predictor, the targets are constants
    c1, c2 = z1.detach().clone(), z2.detach().clone()
    e1, = torch.autograd.grad(-0.5 * F.cosine_similarity(pred(z1), c2).mean(), [z1])
    e2, = torch.autograd.grad(-0.5 * F.cosine_similarity(pred(z2), c1).mean(), [z2])
    torch.testing.assert_close(g1, e1)
    torch.testing.assert_close(g2, e2)
    # without the stop-gradient the gradient would differ (so this test can fail)
    no_stop = -0.5 * (F.cosine_similarity(pred(z1), z2).mean()
                      + F.cosine_similarity(pred(z2), z1).mean())
    h1, = torch.autograd.grad(no_stop, [z1])
    assert not torch.allclose(h1, g1)
    # the targets alone get no gradient at all
    p1, p2 = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    simsiam_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None and p1.grad is not None


def test_collapse_metric():
    g = torch.Generator().manual_seed(0)
    for d in (16, 128, 2048):
        # the paper's reference: an isotropic Gaussian gives std ~ 1/sqrt(d), at any scale
        z = 5 * torch.randn(4096, d, generator=g)
        assert normalized_std(z) == pytest.approx(1 / math.sqrt(d), rel=0.03)
    assert normalized_std(torch.ones(64, 32) * 7) == 0.0
    assert normalized_std(torch.randn(1, 32).expand(64, 32)) < 1e-7


def test_collapse_warning(caplog):
    with caplog.at_level("INFO"):
        main_simsiam.log_collapse(1 / math.sqrt(2048), 2048, epoch=3)
    assert "1/sqrt(2048) = 0.0221" in caplog.text and "collapsing" not in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        main_simsiam.log_collapse(0.001, 2048, epoch=4)
    assert any(r.levelname == "WARNING" and "collapsing" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- model and step
class OriginalSimSiam(nn.Module):
    """facebookresearch/simsiam builder.SimSiam on our backbone (its encoder.fc -> `fc`)."""

    def __init__(self, backbone, dim, pred_dim):
        super().__init__()
        self.encoder = backbone
        prev_dim = backbone.num_features
        self.fc = nn.Sequential(nn.Linear(prev_dim, prev_dim, bias=False), nn.BatchNorm1d(prev_dim),
                                nn.ReLU(inplace=True),
                                nn.Linear(prev_dim, prev_dim, bias=False), nn.BatchNorm1d(prev_dim),
                                nn.ReLU(inplace=True),
                                nn.Linear(prev_dim, dim), nn.BatchNorm1d(dim, affine=False))
        self.fc[6].bias.requires_grad = False  # hack: not use bias as it is followed by BN
        self.predictor = nn.Sequential(nn.Linear(dim, pred_dim, bias=False),
                                       nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
                                       nn.Linear(pred_dim, dim))

    def forward(self, x1, x2):
        z1 = self.fc(self.encoder(x1))
        z2 = self.fc(self.encoder(x2))
        return self.predictor(z1), self.predictor(z2), z1.detach(), z2.detach()


def original_train(batches_per_epoch, model, args, init_lr):
    """The original's optimiser, adjust_learning_rate and train loop, one process."""
    if args.fix_pred_lr:
        params = [{"params": list(model.encoder.parameters()) + list(model.fc.parameters()),
                   "fix_lr": False},
                  {"params": model.predictor.parameters(), "fix_lr": True}]
    else:
        params = model.parameters()
    optimizer = torch.optim.SGD(params, init_lr, momentum=0.9, weight_decay=args.wd)
    criterion = nn.CosineSimilarity(dim=1)
    for epoch, batches in enumerate(batches_per_epoch):
        cur_lr = init_lr * 0.5 * (1. + math.cos(math.pi * epoch / args.epochs))
        for group in optimizer.param_groups:
            group["lr"] = init_lr if group.get("fix_lr") else cur_lr
        model.train()
        for x1, x2 in batches:
            p1, p2, z1, z2 = model(x1=x1, x2=x2)
            loss = -(criterion(p1, z2).mean() + criterion(p2, z1).mean()) * 0.5
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


@pytest.mark.parametrize("fix_pred_lr", [False, True])
def test_training_equals_original(fix_pred_lr):
    args = _parse(["--epochs", "2", "--use_fp16", "false", "--dim", "16", "--pred_dim", "4"])
    args.rank, args.world_size, args.fix_pred_lr = 0, 1, fix_pred_lr
    g = torch.Generator().manual_seed(1)
    batches = [[[torch.randn(6, 3, 8, 8, generator=g) for _ in range(2)] for _ in range(2)]
               for _ in range(2)]
    ours = SimSiam(_backbone(), dim=16, pred_dim=4)
    ref = OriginalSimSiam(_backbone(), dim=16, pred_dim=4)
    # same weights: ours has no bias before the last BN, the original a frozen one
    mapping = {k.replace("backbone.", "encoder.").replace("projector.", "fc."): k
               for k in ours.state_dict()}
    ref.load_state_dict({**{r: ours.state_dict()[o] for r, o in mapping.items()},
                         "fc.6.bias": ref.fc[6].bias.detach()})
    init_lr = 0.5 * 6 / 256
    original_train(batches, ref, args, init_lr)

    optimizer = torch.optim.SGD(optimizer_groups(ours, fix_pred_lr), lr=init_lr, momentum=0.9,
                                weight_decay=args.wd)
    schedule = simsiam_lr_schedule(init_lr, args.epochs, 2)
    for epoch in range(2):
        _, avg, z_std = main_simsiam.train(batches[epoch], ours, optimizer, epoch, schedule, args)
        assert -1 <= avg <= 1 and z_std > 0
    assert [g["lr"] for g in optimizer.param_groups] == (
        [schedule[-1], init_lr] if fix_pred_lr else [schedule[-1]])
    ref_state = ref.state_dict()
    for r, o in mapping.items():
        expected = ref_state[r]
        if r == "fc.7.running_mean":  # the original's frozen bias shifts the running mean only
            expected = expected - ref.fc[6].bias.detach() * (1 - 0.9 ** 8)  # 8 BN updates
        torch.testing.assert_close(ours.state_dict()[o], expected, rtol=1e-4, atol=1e-5, msg=o)


def test_lr_schedule_is_the_original_per_epoch_cosine():
    s = simsiam_lr_schedule(0.1, 4, 3)
    assert len(s) == 12
    for e in range(4):
        assert s[3 * e: 3 * e + 3] == [pytest.approx(0.05 * (1 + math.cos(math.pi * e / 4)))] * 3


@pytest.mark.parametrize("augment", ["fast", "pil"])
def test_two_views_seeded_and_different(image_folder, augment):
    ds = TwoViewDataset(image_folder, size=16, augment=augment)
    v1, v2 = ds[(0, 123)]
    assert v1.shape == v2.shape == (3, 16, 16) and not torch.equal(v1, v2)
    w1, w2 = ds[(0, 123)]
    assert torch.equal(v1, w1) and torch.equal(v2, w2)


def test_fast_augment_is_simsiams_pipeline_with_the_flip_drawn_first(image_folder):
    """fast = crop, flip, jitter 0.4/0.4/0.4/0.1 (p 0.8), grayscale, blur, normalise (on the
    device, normalize_crops), pixel for pixel; SimSiam's order only draws the flip last (a flip
    commutes with the other steps)."""
    fast = simsiam_transform(16, 0.2, 1.0, augment="fast")
    reference = T.Compose([
        T.RandomResizedCrop(16, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
        PILRandomGaussianBlur(p=0.5), T.ToTensor(), T.Normalize(MEAN, STD)])
    image = Image.open(os.path.join(image_folder, "class_0", "img_0.jpg")).convert("RGB")
    for seed in range(8):
        torch.manual_seed(seed)
        a = normalize_crops(fast(image))
        torch.manual_seed(seed)
        torch.testing.assert_close(a, reference(image), rtol=0, atol=0)


# ----------------------------------------------------------------------------- end to end
def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory):
    from conftest import make_image_folder
    root = tmp_path_factory.mktemp("simsiam")
    data = make_image_folder(str(root / "data"))
    dump = str(root / "run")
    stats = main_simsiam.main(_parse(_tiny_argv(data, dump) + ["--tensorboard", "true"]))
    return data, dump, stats


def test_two_epochs_one_process(two_epoch_run):
    data, dump, stats = two_epoch_run
    for f in ["checkpoint.pth.tar", "checkpoints/ckp-0.pth", "checkpoints/ckp-1.pth",
              "params.pkl", "stats0.pkl", "train.log"]:
        assert os.path.isfile(os.path.join(dump, f)), f
    ckp = torch.load(os.path.join(dump, "checkpoint.pth.tar"), weights_only=True)
    assert ckp["epoch"] == 2 and {"optimizer", "rng", "args"} <= set(ckp)
    assert all(k.startswith("module.") for k in ckp["state_dict"])
    frame = pd.read_pickle(os.path.join(dump, "stats0.pkl"))
    assert list(frame.columns) == ["epoch", "loss", "z_std"] and list(frame["epoch"]) == [0, 1]
    assert frame["loss"].between(-1, 1).all() and (frame["z_std"] > 0).all()
    log = open(os.path.join(dump, "train.log")).read()
    assert "std of normalised projector outputs" in log and "1/sqrt(32) = 0.1768" in log
    scalars = tensorboard_scalars(os.path.join(dump, "tb"))
    assert scalars["simsiam/z_std"] == pytest.approx(list(frame["z_std"]))
    assert scalars["simsiam/z_std_no_collapse"] == pytest.approx([0.1768] * 2, abs=1e-4)


def test_checkpoint_backbone_loads_like_swav(two_epoch_run):
    _, dump, _ = two_epoch_run
    state = _weights(os.path.join(dump, "checkpoint.pth.tar"))
    backbone = resnet18(cifar_stem=True, width=8)
    report = load_pretrained(backbone, os.path.join(dump, "checkpoint.pth.tar"))
    assert report["missing"] == [] and report["mismatched"] == []
    assert set(report["loaded"]) == set(backbone.state_dict())
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, state["module.backbone." + k]), k
    assert any(k.startswith("module.projector.") for k in state)
    assert any(k.startswith("module.predictor.") for k in state)


def test_exact_resume(two_epoch_run, tmp_path):
    data, dump, _ = two_epoch_run
    final = _weights(os.path.join(dump, "checkpoint.pth.tar"))
    resumed_dump = str(tmp_path / "resumed")
    shutil.copytree(dump, resumed_dump)
    os.remove(os.path.join(resumed_dump, "checkpoint.pth.tar"))
    shutil.copyfile(os.path.join(resumed_dump, "checkpoints", "ckp-0.pth"),
                    os.path.join(resumed_dump, "checkpoint.pth.tar"))
    stats = main_simsiam.main(_parse(_tiny_argv(data, resumed_dump)))
    resumed = _weights(os.path.join(resumed_dump, "checkpoint.pth.tar"))
    assert set(final) == set(resumed)
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    assert list(stats.stats["epoch"]) == [0, 1]
    assert "Found checkpoint" in open(os.path.join(resumed_dump, "train.log")).read()


def test_torchrun_two_processes(image_folder, tmp_path):
    # --standalone picks a free port (with --master_port 0 torch 2.14's workers dial port 0)
    dump = str(tmp_path / "ddp")
    # own session: on a timeout the workers are killed with the launcher, not left behind
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", "main_simsiam.py",
                             *_tiny_argv(image_folder, dump)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    for f in ["checkpoint.pth.tar", "stats0.pkl", "stats1.pkl", "train.log", "train.log-1"]:
        assert os.path.isfile(os.path.join(dump, f)), f
    ckp = torch.load(os.path.join(dump, "checkpoint.pth.tar"), weights_only=True)
    assert ckp["epoch"] == 2 and ckp["args"]["world_size"] == 2
    # lr scaled by the total batch: 0.05 x (8 x 2) / 256, cosine at epoch 1 of 2
    assert "lr 0.003125 (base_lr 0.05 x total batch 16 / 256)" in open(
        os.path.join(dump, "train.log")).read()


@pytest.mark.parametrize("extra,message", [(["--dim", "0"], "--dim must be >= 1"),
                                           (["--min_scale_crop", "0"], "crop scales")])
def test_bad_flags_one_line_error(image_folder, tmp_path, monkeypatch, extra, message):
    monkeypatch.setattr(sys, "argv", ["main_simsiam.py",
                                      *_tiny_argv(image_folder, str(tmp_path / "r"), extra)])
    parser = main_simsiam.get_args_parser()
    with pytest.raises(SystemExit) as e:
        run_main(main_simsiam.main, parser)
    assert str(e.value).startswith("error: ") and message in str(e.value)

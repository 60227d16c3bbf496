"""fp16 loss scaling, emulated on the CPU: with a power-of-two scale and an fp32 forward, a
GradScaler changes no number (S * g and g / S are exact), so scaled and unscaled training must
give the same weights. Each training loop that takes a scaler is checked, LARC ones included:
unscaling LARC's inner optimizer and then stepping LARC divides the gradients by S twice."""
import copy

import numpy as np
import torch
import torch.nn as nn

import main_deepclusterv2 as dc
import main_simsiam
import main_swav
from conftest import entry_args, tiny_swav_argv
from src import evaluation
from src.engine import build_larc_sgd, build_loader, build_lr_schedule
from src.lars import LARC
from src.multicropdataset import MultiCropDataset
from src.resnet50 import resnet18
from src.simsiam import SimSiam

SCALE = 2.0 ** 12


def _scaler():
    return torch.amp.GradScaler("cpu", init_scale=SCALE)


def _assert_same_weights(scaled, plain, initial):
    """Same floating-point state within 1e-6 relative, and training did move it."""
    moved = False
    for name, a in scaled.state_dict().items():
        if a.is_floating_point():
            torch.testing.assert_close(a, plain.state_dict()[name], rtol=1e-6, atol=0, msg=name)
            moved |= not torch.equal(a, initial[name])
    assert moved


def _swav_model():
    torch.manual_seed(0)
    return resnet18(normalize=True, output_dim=16, hidden_mlp=0, nmb_prototypes=10,
                    cifar_stem=True, width=8)


def test_swav_train_scaled_equals_unscaled():
    args = main_swav.get_args_parser().parse_args([])
    args.rank, args.world_size, args.use_fp16 = 0, 1, False
    args.nmb_crops, args.crops_for_assign = [2, 1], [0, 1]
    args.freeze_prototypes_niters, args.nmb_prototypes, args.feat_dim = 1, 10, 16
    g = torch.Generator().manual_seed(1)
    batches = [[torch.randn(6, 3, 16, 16, generator=g), torch.randn(6, 3, 16, 16, generator=g),
                torch.randn(6, 3, 8, 8, generator=g)] for _ in range(3)]
    lr = np.full(3, 0.1)
    plain, scaled = _swav_model(), _swav_model()
    initial = copy.deepcopy(plain.state_dict())
    for model, scaler in [(plain, None), (scaled, _scaler())]:
        # LARC's trust ratio as the scripts use it (clip=False, trust 0.001)
        main_swav.train(batches, model, build_larc_sgd(model, args), 0, lr, None, args,
                        scaler=scaler)
    _assert_same_weights(scaled, plain, initial)


def test_deepclusterv2_train_scaled_equals_unscaled(image_folder):
    args = dc.get_args_parser().parse_args(tiny_swav_argv(image_folder, "unused", [
        "--nmb_prototypes", "5", "5", "--feat_dim", "16"]))
    args.rank, args.world_size, args.device, args.use_fp16 = 0, 1, "cpu", False
    ds = MultiCropDataset(image_folder, args.size_crops, args.nmb_crops, args.min_scale_crops,
                          args.max_scale_crops, return_index=True)
    loader = build_loader(ds, args)
    schedule = build_lr_schedule(args, len(loader))
    torch.manual_seed(0)
    plain = resnet18(normalize=True, output_dim=args.feat_dim, hidden_mlp=args.hidden_mlp,
                     nmb_prototypes=args.nmb_prototypes, cifar_stem=True, width=8)
    memory = dc.init_memory(loader, plain, args)
    scaled, scaled_memory = copy.deepcopy(plain), copy.deepcopy(memory)
    initial = copy.deepcopy(plain.state_dict())
    for model, mem, scaler in [(plain, memory, None), (scaled, scaled_memory, _scaler())]:
        torch.manual_seed(3)  # the same k-means and crops
        dc.train(loader, model, build_larc_sgd(model, args), 0, schedule, *mem, args,
                 scaler=scaler)
    _assert_same_weights(scaled, plain, initial)


def test_simsiam_train_scaled_equals_unscaled():
    args = main_simsiam.get_args_parser().parse_args(["--use_fp16", "false", "--dim", "16",
                                                      "--pred_dim", "4"])
    args.rank, args.world_size = 0, 1
    g = torch.Generator().manual_seed(1)
    batches = [[torch.randn(6, 3, 8, 8, generator=g) for _ in range(2)] for _ in range(3)]

    def build():
        torch.manual_seed(0)
        return SimSiam(resnet18(cifar_stem=True, width=8, zero_init_residual=True), dim=16,
                       pred_dim=4)

    plain, scaled = build(), build()
    initial = copy.deepcopy(plain.state_dict())
    for model, scaler in [(plain, None), (scaled, _scaler())]:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        main_simsiam.train(batches, model, opt, 0, np.full(3, 0.05), args, scaler=scaler)
    _assert_same_weights(scaled, plain, initial)


def test_evaluation_train_epoch_scaled_equals_unscaled():
    """The linear / semi-supervised loop (evaluation.train_epoch), with SGD and with LARC."""
    args = entry_args("eval_linear", ["--log_freq", "100"], device="cpu", rank=0, world_size=1)
    g = torch.Generator().manual_seed(2)
    loader = [(torch.randn(8, 12, generator=g), torch.randint(0, 4, (8,), generator=g))
              for _ in range(3)]
    for wrap in [lambda o: o, lambda o: LARC(o, trust_coefficient=0.001, clip=False)]:
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
        scaled, initial = copy.deepcopy(plain), copy.deepcopy(plain.state_dict())
        for model, scaler in [(plain, None), (scaled, _scaler())]:
            opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,
                                       weight_decay=1e-4))
            evaluation.train_epoch(model, [model], loader, opt, 0, args, scaler)
        _assert_same_weights(scaled, plain, initial)


def test_deferred_checks_record_each_steps_own_loss_scale():
    """The checks read once per log interval keep the scale each step left (update() changes
    the scaler's scale tensor in place): steps 1 and 2 overflow, 1024 -> 512 -> 256."""
    from src.amp import NonFiniteGuard
    from src.progress import EpochProgress
    from src.step import backward, optimizer_step
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    scaler.nonfinite_guard = NonFiniteGuard(10)
    recorded = []
    record = scaler.nonfinite_guard.record
    scaler.nonfinite_guard.record = lambda skipped, it, loss, scale: (
        recorded.append((it, skipped, scale)), record(skipped, it, loss, scale))
    args = entry_args("main_swav", ["--log_freq", "100"], rank=0, world_size=1)
    progress = EpochProgress(list(range(4)), 0, args)  # one read: at iteration 0, then the end
    for it, iteration, _ in progress:
        loss = model(torch.ones(1, 3)).sum() * (float("inf") if it in (1, 2) else 1.0)
        backward(loss, optimizer, scaler, iteration, progress)
        optimizer_step(loss, model, optimizer, scaler, iteration, progress)
        progress.update(it, loss, 1, 0.1)
    assert recorded == [(0, False, 1024.0), (1, True, 512.0), (2, True, 256.0),
                        (3, False, 256.0)]


def test_evaluation_checkpoint_keeps_the_loss_scale(tmp_path):
    """A resumed fp16 eval_linear / eval_semisup continues at the scale it had reached, not at
    the initial 65536 (which would skip steps until it backed off again)."""
    args = entry_args("eval_linear", [], device="cpu", rank=0, world_size=1)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 10)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    scaler.scale(torch.ones(()))  # the scale is made at first use
    scaler.update(2.0 ** 8)  # where overflows had brought it
    path = str(tmp_path / "checkpoint_eval_linear.pth.tar")
    evaluation.save_eval_state(path, 0, model, optimizer, scheduler, (1.0, 2.0), args, scaler)
    resumed = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    start, best = evaluation.resume_eval_state(path, model, optimizer, scheduler, args, resumed)
    assert (start, best) == (1, (1.0, 2.0)) and resumed.get_scale() == 2.0 ** 8

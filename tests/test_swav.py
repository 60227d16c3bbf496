"""SwAV training: the iteration against the original's math, queue and freeze semantics,
end-to-end runs (one process, torchrun), exact resume, and bad input."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import main_swav
from conftest import ROOT, entry_args, tensorboard_scalars, tiny_swav_argv
from src.lars import LARC
from src.resnet50 import resnet18
from src.runstate import EpochState

PY = sys.executable


def _args(**kw):
    tiny = dict(rank=0, world_size=1, use_fp16=False, nmb_crops=[2, 1], crops_for_assign=[0, 1],
                freeze_prototypes_niters=0, nmb_prototypes=10, feat_dim=16)
    return entry_args("main_swav", **{**tiny, **kw})


def _model(seed=0, hidden_mlp=0):
    # hidden_mlp=0 by default: with a BN after the first head layer, that layer's bias gets a
    # rounding-noise gradient that LARC's trust ratio amplifies, so no two codes agree on it
    torch.manual_seed(seed)
    return resnet18(normalize=True, output_dim=16, hidden_mlp=hidden_mlp, nmb_prototypes=10,
                    cifar_stem=True, width=8)


def _batches(n, bs=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(bs, 3, 16, 16, generator=g), torch.randn(bs, 3, 16, 16, generator=g),
             torch.randn(bs, 3, 8, 8, generator=g)] for _ in range(n)]


def _opt(model):
    return LARC(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6),
                trust_coefficient=0.001, clip=False)


def original_train(batches, model, optimizer, lr_schedule, queue, args):
    """The original's train() (facebookresearch/swav), one process, globals made explicit."""

    def sinkhorn(out):
        Q = torch.exp(out / args.epsilon).t()
        B, K = Q.shape[1], Q.shape[0]
        Q /= torch.sum(Q)
        for _ in range(args.sinkhorn_iterations):
            Q /= torch.sum(Q, dim=1, keepdim=True)
            Q /= K
            Q /= torch.sum(Q, dim=0, keepdim=True)
            Q /= B
        Q *= B
        return Q.t()

    model.train()
    use_the_queue = False
    losses = []
    for it, inputs in enumerate(batches):
        for g in optimizer.param_groups:
            g["lr"] = lr_schedule[it]
        with torch.no_grad():
            w = F.normalize(model.prototypes.weight.data.clone(), dim=1, p=2)
            model.prototypes.weight.copy_(w)
        embedding, output = model(inputs)
        embedding = embedding.detach()
        bs = inputs[0].size(0)
        loss = 0
        for i, crop_id in enumerate(args.crops_for_assign):
            with torch.no_grad():
                out = output[bs * crop_id: bs * (crop_id + 1)].detach()
                if queue is not None:
                    if use_the_queue or not torch.all(queue[i, -1, :] == 0):
                        use_the_queue = True
                        out = torch.cat((torch.mm(queue[i], model.prototypes.weight.t()), out))
                    queue[i, bs:] = queue[i, :-bs].clone()
                    queue[i, :bs] = embedding[crop_id * bs: (crop_id + 1) * bs]
                q = sinkhorn(out)[-bs:]
            subloss = 0
            for v in np.delete(np.arange(np.sum(args.nmb_crops)), crop_id):
                x = output[bs * v: bs * (v + 1)] / args.temperature
                subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
            loss += subloss / (np.sum(args.nmb_crops) - 1)
        loss /= len(args.crops_for_assign)
        optimizer.zero_grad()
        loss.backward()
        if it < args.freeze_prototypes_niters:
            for name, p in model.named_parameters():
                if "prototypes" in name:
                    p.grad = None
        optimizer.step()
        losses.append(loss.item())
    return losses, queue


@pytest.mark.parametrize("use_queue", [False, True])
def test_train_iteration_equals_original(use_queue):
    args = _args(freeze_prototypes_niters=2)
    batches = _batches(5)
    lr = np.linspace(0.05, 0.2, 5)
    ref_model, our_model = _model(), _model()
    our_model.load_state_dict(ref_model.state_dict())
    ref_q = torch.zeros(2, 12, 16) if use_queue else None  # full after 2 iterations of bs 6
    our_q = ref_q.clone() if use_queue else None
    ref_losses, ref_q = original_train(batches, ref_model, _opt(ref_model), lr, ref_q, args)
    (epoch, avg), our_q = main_swav.train(batches, our_model, _opt(our_model), 0, lr, our_q, args)
    assert epoch == 0 and avg == pytest.approx(np.mean(ref_losses), rel=1e-5)
    for (k, a), b in zip(ref_model.state_dict().items(), our_model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=k)
    if use_queue:
        torch.testing.assert_close(our_q, ref_q, rtol=1e-4, atol=1e-5)


def test_queue_fill_order_and_first_use():
    args = _args()
    model = _model()
    embs = []
    model.register_forward_hook(lambda m, i, o: embs.append(o[0].detach().clone()))
    queue = torch.zeros(2, 12, 16)  # 2 batches of 6
    state = EpochState()  # what train() keeps of the epoch (src/runstate.py)
    batches = _batches(3)
    lr = np.full(3, 0.01)
    for it in range(3):
        _, queue = main_swav.train([batches[it]], model, _opt(model), it, lr, queue, args,
                                   state=state)
        # newest batch first: crop c's embeddings of this iteration at the front
        for i, c in enumerate(args.crops_for_assign):
            torch.testing.assert_close(queue[i, :6], embs[-1][6 * c: 6 * (c + 1)])
        # the queue is used only once full (its last row non-zero)
        assert state["use_the_queue"] is (it >= 2)
    torch.testing.assert_close(queue[0, 6:], embs[1][:6])  # previous batch shifted back


def test_prototypes_frozen_for_exactly_n_iterations():
    args = _args(freeze_prototypes_niters=3)
    model = _model()
    opt = _opt(model)
    frozen = []
    step = opt.step
    opt.step = lambda: (frozen.append(model.prototypes.weight.grad is None), step())[1]
    # iterations 0..5 over two epochs of 3: the global iteration drives the freeze
    for epoch in range(2):
        main_swav.train(_batches(3, seed=epoch), model, opt, epoch, np.full(6, 0.1), None, args)
    assert frozen == [True, True, True, False, False, False]
    # other parameters always get gradients
    assert model.conv1.weight.grad is not None


def _run(argv, env=None, timeout=240):
    return subprocess.run([PY, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_two_epochs_one_process_then_exact_resume(image_folder, tmp_path):
    dump = str(tmp_path / "run")
    extra = ["--epochs", "3", "--queue_length", "16", "--epoch_queue_starts", "1",
             "--freeze_prototypes_niters", "2"]
    r = _run(["main_swav.py", *tiny_swav_argv(image_folder, dump, extra)])
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ["checkpoint.pth.tar", "checkpoints/ckp-0.pth", "checkpoints/ckp-2.pth",
              "params.pkl", "stats0.pkl", "train.log", "queue0.pth"]:
        assert os.path.isfile(os.path.join(dump, f)), f
    ckp = torch.load(os.path.join(dump, "checkpoint.pth.tar"), weights_only=True)
    assert ckp["epoch"] == 3 and all(k.startswith("module.") for k in ckp["state_dict"])
    assert {"optimizer", "rng", "queue"} <= set(ckp)
    assert "Epoch: [2][0]" in open(os.path.join(dump, "train.log")).read()
    final = _weights(os.path.join(dump, "checkpoint.pth.tar"))

    # restart from the epoch-0 checkpoint: bit-identical weights at the end
    os.remove(os.path.join(dump, "checkpoint.pth.tar"))
    os.replace(os.path.join(dump, "checkpoints", "ckp-0.pth"), os.path.join(dump, "checkpoint.pth.tar"))
    r = _run(["main_swav.py", *tiny_swav_argv(image_folder, dump, extra)])
    assert r.returncode == 0, r.stderr[-2000:]
    resumed = _weights(os.path.join(dump, "checkpoint.pth.tar"))
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    import pandas as pd
    assert list(pd.read_pickle(os.path.join(dump, "stats0.pkl"))["epoch"]) == [0, 1, 2]


def test_torchrun_two_processes(image_folder, tmp_path):
    dump = str(tmp_path / "ddp")
    r = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "main_swav.py", *tiny_swav_argv(image_folder, dump, ["--queue_length", "16",
                                                                   "--epoch_queue_starts", "1",
                                                                   "--tensorboard", "true"])])
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ["checkpoint.pth.tar", "stats0.pkl", "stats1.pkl", "train.log", "train.log-1",
              "queue0.pth", "queue1.pth"]:
        assert os.path.isfile(os.path.join(dump, f)), f
    ckp = torch.load(os.path.join(dump, "checkpoint.pth.tar"), weights_only=True)
    assert ckp["epoch"] == 2 and ckp["queue"].shape == (2, 2, 8, 16)  # [world, crops, len/world, dim]
    # --tensorboard: rank 0 alone writes one event file with the per-epoch scalars
    events = [f for _, _, files in os.walk(os.path.join(dump, "tb")) for f in files]
    assert len(events) == 1 and events[0].startswith("events.out.tfevents")
    scalars = tensorboard_scalars(os.path.join(dump, "tb"))
    assert {"swav/loss", "swav/lr", "swav/prototypes_in_use"} <= set(scalars)
    assert len(scalars["swav/loss"]) == 2 and 0 < scalars["swav/prototypes_in_use"][-1] <= 1


@pytest.mark.parametrize("extra,message", [
    (["--nmb_crops", "2"], "same length"),
    (["--crops_for_assign", "0", "7"], "out of range"),
    (["--nmb_prototypes", "0"], "nmb_prototypes"),
    (["--queue_length", "4"], "smaller than the global batch"),
])
def test_bad_flags_one_line_error(image_folder, tmp_path, extra, message):
    r = _run(["main_swav.py", *tiny_swav_argv(image_folder, str(tmp_path / "r"), extra)])
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, r.stderr[-1500:]
    assert "Traceback" not in r.stderr


def test_missing_data_and_mismatched_resume(image_folder, tmp_path):
    r = _run(["main_swav.py", *tiny_swav_argv(str(tmp_path / "none"), str(tmp_path / "r"))])
    assert r.returncode != 0 and "does not exist" in r.stderr.strip().splitlines()[-1]
    dump = str(tmp_path / "r2")
    r = _run(["main_swav.py", *tiny_swav_argv(image_folder, dump, ["--epochs", "1"])])
    assert r.returncode == 0, r.stderr[-2000:]
    before = open(os.path.join(dump, "checkpoint.pth.tar"), "rb").read()
    r = _run(["main_swav.py", *tiny_swav_argv(image_folder, dump, ["--feat_dim", "24"])])
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "does not fit this model" in last and "Traceback" not in r.stderr
    assert open(os.path.join(dump, "checkpoint.pth.tar"), "rb").read() == before


def test_queue_length_rounded_for_the_run_not_in_the_parsed_args(image_folder, tmp_path):
    """--queue_length 20 with a global batch of 8: the run rounds it down to 16 as the original
    (its queue holds 16 rows; params.pkl and the checkpoint's flags record 16), while the parsed
    `args` keep the 20 they were given."""
    import pickle
    dump = str(tmp_path / "run")
    args = main_swav.get_args_parser().parse_args(tiny_swav_argv(
        image_folder, dump, ["--epochs", "1", "--queue_length", "20", "--epoch_queue_starts", "0"]))
    main_swav.main(args)
    assert args.queue_length == 20
    ckp = torch.load(os.path.join(dump, "checkpoint.pth.tar"), weights_only=True)
    assert ckp["args"]["queue_length"] == 16 and ckp["queue"].shape == (1, 2, 16, 16)
    with open(os.path.join(dump, "params.pkl"), "rb") as f:
        assert pickle.load(f).queue_length == 16

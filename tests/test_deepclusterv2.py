"""DeepCluster-v2 (main_deepclusterv2.py): the loss and the training loop against the original's
code, k-means into the prototypes, the memory bank, end-to-end runs (one process, torchrun),
exact resume (from an epoch checkpoint and after a mid-epoch stop), and bad input."""
import copy
import os
import runpy
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torch.nn as nn

import main_deepclusterv2 as dc
from conftest import ROOT, entry_args, tensorboard_scalars, tiny_swav_argv
from src import preemption
from src.checkpoint import CheckpointError
from src.engine import build_larc_sgd, build_loader, build_lr_schedule, to_device
from src.kmeans import spherical_kmeans
from src.multicropdataset import MultiCropDataset
from src.resnet50 import resnet18

PROTOTYPES = ["--nmb_prototypes", "6", "5", "4"]


pytestmark = pytest.mark.usefixtures("no_launcher", "one_thread")  # conftest.py


def _argv(data, dump, extra=()):
    """The tiny CPU run of the SwAV tests with three k-means heads."""
    return tiny_swav_argv(data, dump, [*PROTOTYPES, *extra])


def _main(argv):
    return dc.main(dc.get_args_parser().parse_args(argv))


def _args(data, **kw):
    return entry_args("main_deepclusterv2", _argv(data, "unused"),
                      **{"rank": 0, "world_size": 1, "device": "cpu", **kw})


def _model(args, seed=0):
    torch.manual_seed(seed)
    return resnet18(normalize=True, output_dim=args.feat_dim, hidden_mlp=args.hidden_mlp,
                    nmb_prototypes=args.nmb_prototypes, cifar_stem=True, width=8)


def _loader(data, args):
    ds = MultiCropDataset(data, args.size_crops, args.nmb_crops, args.min_scale_crops,
                          args.max_scale_crops, return_index=True)
    return build_loader(ds, args)


def _load(dump, name="checkpoint.pth.tar"):
    return torch.load(os.path.join(dump, name), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- math
def test_loss_equals_original_and_ignores_unseen():
    torch.manual_seed(0)
    bs, ncrops, ks = 5, 3, [7, 4]
    output = [torch.randn(bs * ncrops, k, requires_grad=True) for k in ks]
    assignments = torch.stack([torch.randint(4, (20,)), torch.randint(4, (20,))])
    assignments[:, [3, 8]] = -100  # two images in no memory bank
    idx = torch.tensor([3, 0, 8, 11, 19])
    loss = dc.deepcluster_loss(output, assignments, idx, ncrops, 0.1)
    # the original's: mean over heads of CrossEntropyLoss(ignore_index=-100)
    ce = nn.CrossEntropyLoss(ignore_index=-100)
    ref = sum(ce(output[h] / 0.1, assignments[h][idx].repeat(ncrops)) for h in range(2)) / 2
    assert torch.equal(loss, ref)
    # the ignored samples (every crop of images 3 and 8) get no gradient
    loss.backward()
    ignored = torch.tensor([0, 2]).repeat(ncrops) + bs * torch.arange(ncrops).repeat_interleave(2)
    for o in output:
        assert torch.all(o.grad[ignored] == 0) and o.grad.abs().sum() > 0
    # a batch of unseen images only: 0, not the original's NaN
    none = torch.full((2, 20), -100, dtype=torch.long)
    assert dc.deepcluster_loss(output, none, idx, ncrops, 0.1).item() == 0


def test_cluster_memory_sets_prototypes_and_assignments(image_folder):
    args = _args(image_folder, crops_for_assign=[0, 1])
    model = _model(args)
    g = torch.Generator().manual_seed(1)
    embeddings = nn.functional.normalize(torch.randn(2, 20, args.feat_dim, generator=g), dim=2)
    index = torch.randperm(26, generator=g)[:20]  # 6 of 26 images in no memory bank
    torch.manual_seed(7)
    assignments = dc.cluster_memory(model, index, embeddings, 26, args, nmb_kmeans_iters=5)
    assert assignments.shape == (3, 26) and assignments.dtype == torch.long
    torch.manual_seed(7)
    for h, K in enumerate(args.nmb_prototypes):
        # head h clusters memory bank h mod 2; the RNG is consumed head after head
        c, a, _ = spherical_kmeans(embeddings[h % 2], K, 5)
        assert torch.equal(getattr(model.prototypes, f"prototypes{h}").weight, c)
        assert torch.equal(assignments[h][index], a)
        unseen = torch.ones(26, dtype=torch.bool)
        unseen[index] = False
        assert torch.all(assignments[h][unseen] == -100)


def test_init_memory_holds_each_assigned_crops_embedding(image_folder):
    args = _args(image_folder, crops_for_assign=[1, 2])
    model = _model(args)
    loader = _loader(image_folder, args)
    index, embeddings = dc.init_memory(loader, model, args)
    assert embeddings.shape == (2, 24, args.feat_dim) and sorted(index.tolist()) == list(range(24))
    start = 0
    with torch.no_grad():  # train mode: batch statistics, so a second pass gives the same
        for idx, inputs in loader:
            assert torch.equal(index[start:start + 8], idx)
            for j, crop in enumerate(args.crops_for_assign):
                torch.testing.assert_close(embeddings[j, start:start + 8],
                                           model(to_device(inputs[crop], "cpu"))[0])
            start += 8


def _original_train(loader, model, optimizer, epoch, schedule, mem_index, mem_emb, args,
                    assignments):
    """The original's train() after its cluster_memory call, on the CPU without DDP."""
    model.train()
    cross_entropy = nn.CrossEntropyLoss(ignore_index=-100)
    start_idx = 0
    for it, (idx, inputs) in enumerate(loader):
        iteration = epoch * len(loader) + it
        for param_group in optimizer.param_groups:
            param_group["lr"] = schedule[iteration]
        emb, output = model(to_device(inputs, "cpu"))  # the original's float crops
        emb = emb.detach()
        bs = inputs[0].size(0)
        loss = 0
        for h in range(len(args.nmb_prototypes)):
            scores = output[h] / args.temperature
            targets = assignments[h][idx].repeat(sum(args.nmb_crops))
            loss += cross_entropy(scores, targets)
        loss /= len(args.nmb_prototypes)
        optimizer.zero_grad()
        loss.backward()
        if iteration < args.freeze_prototypes_niters:
            for name, p in model.named_parameters():
                if "prototypes" in name:
                    p.grad = None
        optimizer.step()
        mem_index[start_idx: start_idx + bs] = idx
        for i, crop_idx in enumerate(args.crops_for_assign):
            mem_emb[i][start_idx: start_idx + bs] = emb[crop_idx * bs: (crop_idx + 1) * bs]
        start_idx += bs


def test_train_epoch_equals_the_originals(image_folder):
    args = _args(image_folder, base_lr=0.5, warmup_epochs=0, epochs=2)
    loader = _loader(image_folder, args)
    schedule = build_lr_schedule(args, len(loader))
    model = _model(args)
    memory = dc.init_memory(loader, model, args)
    ref_model, ref_memory = copy.deepcopy(model), copy.deepcopy(memory)
    optimizer, ref_optimizer = build_larc_sgd(model, args), build_larc_sgd(ref_model, args)
    loader.sampler.set_epoch(1)

    torch.manual_seed(3)
    (epoch, loss), index, embeddings = dc.train(loader, model, optimizer, 1, schedule, *memory,
                                                args)
    torch.manual_seed(3)  # the same k-means, then the original's loop
    assignments = dc.cluster_memory(ref_model, *ref_memory, len(loader.dataset), args)
    _original_train(loader, ref_model, ref_optimizer, 1, schedule, *ref_memory, args, assignments)
    assert epoch == 1 and loss > 0
    for (name, p), q in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(p, q), name
    assert torch.equal(index, ref_memory[0]) and torch.equal(embeddings, ref_memory[1])


# ----------------------------------------------------------------------------- runs
def test_two_epochs_then_exact_resume_from_epoch_and_mid_epoch(image_folder, tmp_path,
                                                               monkeypatch):
    ref = str(tmp_path / "ref")
    _main(_argv(image_folder, ref, ["--tensorboard", "true"]))
    for f in ["checkpoint.pth.tar", "checkpoints/ckp-0.pth", "checkpoints/ckp-1.pth",
              "mb0.pth", "stats0.pkl", "train.log", "params.pkl"]:
        assert os.path.isfile(os.path.join(ref, f)), f
    expected = _load(ref)
    assert expected["epoch"] == 2 and expected["memory_bank"]["embeddings"].shape == (1, 2, 24, 16)
    mb = _load(ref, "mb0.pth")
    assert torch.equal(mb["local_memory_embeddings"], expected["memory_bank"]["embeddings"][0])
    assert sorted(mb["local_memory_index"].tolist()) == list(range(24))
    scalars = tensorboard_scalars(os.path.join(ref, "tb"))
    assert len(scalars["deepclusterv2/loss"]) == 2
    assert 0 < scalars["deepclusterv2/clusters_in_use"][-1] <= 1
    log = open(os.path.join(ref, "train.log")).read()
    assert "k-means head 2 (K=4, memory bank 0):" in log and "largest cluster" in log
    assert list(pd.read_pickle(os.path.join(ref, "stats0.pkl"))["epoch"]) == [0, 1]

    def same_as_ref(dump):
        final = _load(dump)
        assert final["epoch"] == 2 and "start_iter" not in final
        for key, value in expected["state_dict"].items():
            assert torch.equal(final["state_dict"][key], value), key
        assert torch.equal(final["memory_bank"]["embeddings"], expected["memory_bank"]["embeddings"])
        losses = pd.read_pickle(os.path.join(dump, "stats0.pkl"))["loss"]
        assert list(losses) == list(pd.read_pickle(os.path.join(ref, "stats0.pkl"))["loss"])

    # from the epoch-0 checkpoint (mb0.pth is the end-of-run one: the checkpoint's bank wins)
    os.replace(os.path.join(ref, "checkpoints", "ckp-0.pth"),
               os.path.join(ref, "checkpoint.pth.tar"))
    _main(_argv(image_folder, ref))
    same_as_ref(ref)

    # a stop request during epoch 1's iteration 1: mid-epoch checkpoint, exit, resume
    dump = str(tmp_path / "stopped")
    calls, loss_fn = {"n": 0}, dc.deepcluster_loss

    def signal_at_step_4(*a, **kw):
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGUSR1)
        calls["n"] += 1
        return loss_fn(*a, **kw)

    monkeypatch.setattr(dc, "deepcluster_loss", signal_at_step_4)
    with pytest.raises(SystemExit) as stop:
        _main(_argv(image_folder, dump))
    assert stop.value.code == preemption.REQUEUE_EXIT_CODE
    ckp = _load(dump)
    assert ckp["epoch"] == 1 and ckp["start_iter"] == 2
    assert ckp["epoch_state"]["assignments"].shape == (3, 24)
    preemption.reset()
    monkeypatch.undo()
    _main(_argv(image_folder, dump))
    same_as_ref(dump)


def test_torchrun_two_processes(image_folder, tmp_path):
    dump = str(tmp_path / "ddp")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", "main_deepclusterv2.py",
                        *_argv(image_folder, dump, ["--batch_size", "4"])],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ["checkpoint.pth.tar", "mb0.pth", "mb1.pth", "stats1.pkl", "train.log-1"]:
        assert os.path.isfile(os.path.join(dump, f)), f
    ckp = _load(dump)
    # [world, crops_for_assign, 3 batches of 4, feat_dim]; the two shards are disjoint
    assert ckp["epoch"] == 2 and ckp["memory_bank"]["embeddings"].shape == (2, 2, 12, 16)
    assert sorted(ckp["memory_bank"]["index"].flatten().tolist()) == list(range(24))
    # the prototypes are the k-means centroids: unit rows, the same on both ranks (DDP)
    w = ckp["state_dict"]["module.prototypes.prototypes0.weight"]
    torch.testing.assert_close(w.norm(dim=1), torch.ones(6))


def test_bad_input_one_line_errors(image_folder, tmp_path, monkeypatch):
    # the script's own __main__ block, in this process (a subprocess costs an import of torch)
    monkeypatch.setattr(sys, "argv", ["main_deepclusterv2.py", *_argv(
        image_folder, str(tmp_path / "k"), ["--nmb_prototypes", "30"])])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(os.path.join(ROOT, "main_deepclusterv2.py"), run_name="__main__")
    message = str(exit_.value.code)  # sys.exit("error: ..."): printed, exit status 1
    assert message.startswith("error: --nmb_prototypes 30 is more than the 24 samples")
    assert "\n" not in message
    with pytest.raises(ValueError, match="out of range"):
        _main(_argv(image_folder, str(tmp_path / "c"), ["--crops_for_assign", "0", "4"]))

    # a memory bank of another feature size, then of another dataset size
    dump = str(tmp_path / "mb")
    os.makedirs(dump)
    torch.save({"local_memory_index": torch.arange(24),
                "local_memory_embeddings": torch.zeros(2, 24, 8)}, os.path.join(dump, "mb0.pth"))
    with pytest.raises(CheckpointError, match=r"shape \(2, 24, 8\) does not fit.*\(2, 24, 16\)"):
        _main(_argv(image_folder, dump))
    torch.save({"local_memory_index": torch.arange(24) + 100,
                "local_memory_embeddings": torch.zeros(2, 24, 16)}, os.path.join(dump, "mb0.pth"))
    with pytest.raises(CheckpointError, match="indexes images up to 123, the dataset has 24"):
        _main(_argv(image_folder, dump))
    torch.save({"local_memory_index": torch.arange(16),
                "local_memory_embeddings": torch.zeros(2, 16, 16)}, os.path.join(dump, "mb0.pth"))
    with pytest.raises(CheckpointError, match="samples per process from the dataset size"):
        _main(_argv(image_folder, dump))


def test_memory_bank_left_out_of_the_checkpoint_resumes_from_mb_file(image_folder, tmp_path):
    dump, off = str(tmp_path / "run"), ["--checkpoint_memory_bank", "false"]
    _main(_argv(image_folder, dump, ["--epochs", "1", *off]))
    assert "memory_bank" not in _load(dump)
    mb = _load(dump, "mb0.pth")
    _main(_argv(image_folder, dump, off))  # epoch 1 starts from mb0.pth
    assert _load(dump)["epoch"] == 2
    log = open(os.path.join(dump, "train.log")).read()
    assert log.count("Start initializing the memory banks") == 1
    assert not torch.equal(_load(dump, "mb0.pth")["local_memory_embeddings"],
                           mb["local_memory_embeddings"])


def test_hidden_mlp_default_is_the_originals_flat_2048():
    # the original's DeepCluster-v2 default does not scale with the width of resnet50wN
    args = dc.get_args_parser().parse_args(["--arch", "resnet50w2"])
    assert args.hidden_mlp == 2048


def test_cuda_settings_come_before_the_memory_banks_forward(image_folder, tmp_path, monkeypatch):
    """cuDNN autotuning and --tf32 (configure_backends) are set before init_memory's forward
    over the rank's shard, not only at the epochs: else that pass runs in cuDNN's default TF32
    though --tf32 false promises IEEE fp32."""
    from src import engine
    order, init_memory = [], dc.init_memory
    monkeypatch.setattr(engine, "configure_backends", lambda args: order.append("backends"))
    monkeypatch.setattr(dc, "init_memory", lambda *a, **kw: (order.append("memory"),
                                                             init_memory(*a, **kw))[1])
    _main(_argv(image_folder, str(tmp_path / "dc"), ["--epochs", "1"]))
    assert order[:2] == ["backends", "memory"]

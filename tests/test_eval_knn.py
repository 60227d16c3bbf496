"""eval_knn.py: the weighted k-NN classifier's math, the sharded bank over 2 gloo ranks, and short
runs in one process and under torchrun (same numbers: each rank keeps its shard of the train
bank, the merged top-k equal one process's, each val image counted once)."""
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision.datasets as datasets
import torchvision.transforms as transforms

from conftest import ROOT, free_port, make_split_folder

import eval_knn
from src.engine import gather_to_rank0
from src.evaluation import knn_classify
from src.multicropdataset import MEAN, STD
from src.utils import accuracy


def test_knn_separable_features_are_classified_perfectly():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(10, 32, generator=g), dim=1) * 10
    train_y = torch.arange(10).repeat_interleave(30)
    test_y = torch.arange(10).repeat_interleave(10)
    train_x = centres[train_y] + torch.randn(300, 32, generator=g)
    test_x = centres[test_y] + torch.randn(100, 32, generator=g)
    scores = knn_classify(train_x, train_y, test_x, 10, k=20, temperature=0.07, batch_size=7)
    assert scores.shape == (100, 10)
    assert (scores.argmax(1) == test_y).all()


def test_knn_on_shuffled_labels_is_about_chance():
    g = torch.Generator().manual_seed(1)
    train_x, test_x = torch.randn(3000, 16, generator=g), torch.randn(2000, 16, generator=g)
    train_y = torch.randint(0, 10, (3000,), generator=g)
    test_y = torch.randint(0, 10, (2000,), generator=g)
    acc = (knn_classify(train_x, train_y, test_x, 10).argmax(1) == test_y).float().mean().item()
    assert 0.07 < acc < 0.13  # chance is 0.10; 2000 samples: sd ~0.007


def test_knn_matches_a_direct_implementation():
    g = torch.Generator().manual_seed(2)
    train_x, test_x = torch.randn(50, 8, generator=g), torch.randn(9, 8, generator=g)
    train_y = torch.randint(0, 4, (50,), generator=g)
    k, t = 5, 0.1
    scores = knn_classify(train_x, train_y, test_x, 4, k=k, temperature=t, batch_size=4)
    for i in range(9):
        sims = [F.cosine_similarity(test_x[i], train_x[j], dim=0).item() for j in range(50)]
        nearest = sorted(range(50), key=lambda j: -sims[j])[:k]
        expected = torch.zeros(4)
        for j in nearest:
            expected[train_y[j]] += torch.exp(torch.tensor(sims[j] / t))
        torch.testing.assert_close(scores[i], expected, rtol=1e-4, atol=1e-5)
    # k larger than the training set uses every training sample
    assert knn_classify(train_x, train_y, test_x, 4, k=500).shape == (9, 4)


def _knn_worker(rank, port, train_x, train_y, test_x, ks, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        # each rank holds only its shard of the bank, as ShardSampler splits a dataset
        scores = {k: knn_classify(train_x[rank::2], train_y[rank::2], test_x, 4, k=k,
                                  temperature=0.1, batch_size=6) for k in ks}
        stacked = gather_to_rank0(torch.full((2, 3), float(rank)))
        torch.save({"scores": scores, "stacked": stacked}, os.path.join(out_dir, f"r{rank}.pth"))
    finally:
        dist.destroy_process_group()


def test_knn_over_two_gloo_ranks_with_a_sharded_bank_equals_one_rank(tmp_path):
    g = torch.Generator().manual_seed(5)
    centres = F.normalize(torch.randn(4, 8, generator=g), dim=1) * 2
    train_y = torch.randint(0, 4, (41,), generator=g)
    test_y = torch.randint(0, 4, (17,), generator=g)
    train_x = centres[train_y] + torch.randn(41, 8, generator=g)
    test_x = centres[test_y] + torch.randn(17, 8, generator=g)
    ks = (1, 5, 30, 100)  # 30: more than rank 1's 20 rows; 100: more than the whole bank (41)
    # fork: the children start with torch imported (spawn's fresh interpreters cost ~10 s here)
    mp.start_processes(_knn_worker, args=(free_port(), train_x, train_y, test_x, ks,
                                          str(tmp_path)), nprocs=2, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"r{r}.pth", weights_only=True) for r in (0, 1))
    for k in ks:
        one = knn_classify(train_x, train_y, test_x, 4, k=k, temperature=0.1, batch_size=6)
        for r in (r0, r1):
            torch.testing.assert_close(r["scores"][k], one, rtol=1e-6, atol=1e-6)
            assert [a.item() for a in accuracy(r["scores"][k], test_y, topk=(1, 2))] == \
                [a.item() for a in accuracy(one, test_y, topk=(1, 2))]
    # the checkpoint gather: only rank 0 receives every rank's tensor
    assert torch.equal(r0["stacked"], torch.tensor([0.0, 1.0]).view(2, 1, 1).expand(2, 2, 3))
    assert r1["stacked"] is None


@pytest.fixture
def split_folder(tmp_path):
    """train/ 3 classes x 7 (odd), val/ 3 classes x 3 + 1 extra: uneven shards over 2 ranks."""
    return make_split_folder(tmp_path / "data", 7, 3, extra_val=True)


def knn_argv(data, dump, extra=()):
    return ["--data_path", data, "--arch", "resnet18", "--width", "8", "--cifar_stem", "true",
            "--resize", "16", "--center_crop", "16", "--batch_size", "4", "--workers", "0",
            "--nb_knn", "3", "20", "--dump_path", dump, *extra]


def test_eval_knn_one_process_and_torchrun_agree(split_folder, tmp_path):
    parser = eval_knn.get_args_parser()
    one = eval_knn.main(parser.parse_args(knn_argv(split_folder, str(tmp_path / "one"))))
    # 10 val images, each counted once: accuracies are multiples of 10 %
    for res in one.values():
        assert abs(res["top1"] / 10 - round(res["top1"] / 10)) < 1e-6
    stats = pd.read_pickle(tmp_path / "one" / "stats_eval_knn0.pkl")
    assert list(stats["k"]) == [3, 20]

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "eval_knn.py",
           *knn_argv(split_folder, str(tmp_path / "two"))]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = pd.read_pickle(tmp_path / "two" / "stats_eval_knn0.pkl")
    assert list(two["top1"]) == pytest.approx([one[3]["top1"], one[20]["top1"]])
    assert list(two["top5"]) == pytest.approx([one[3]["top5"], one[20]["top5"]])


def test_eval_knn_pixels_baseline_needs_no_weights(split_folder, tmp_path):
    parser = eval_knn.get_args_parser()
    res = eval_knn.main(parser.parse_args(knn_argv(split_folder, str(tmp_path / "px"),
                                                   ["--arch", "pixels"])))
    # the same k-NN on the images' own pixels, read here with torchvision: the same accuracies
    tf = transforms.Compose([transforms.Resize(16), transforms.CenterCrop(16),
                             transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    train, val = (datasets.ImageFolder(os.path.join(split_folder, s), tf) for s in ("train", "val"))
    train_x, train_y = torch.stack([x for x, _ in train]).flatten(1), torch.tensor(train.targets)
    val_x, val_y = torch.stack([x for x, _ in val]).flatten(1), torch.tensor(val.targets)
    for k in (3, 20):
        scores = knn_classify(train_x, train_y, val_x, 3, k=k, temperature=0.07)
        top1, top5 = (a.item() for a in accuracy(scores, val_y, topk=(1, 5)))
        assert res[k] == {"top1": pytest.approx(top1), "top5": pytest.approx(top5)}
    with pytest.raises(ValueError, match="pixels takes no --pretrained"):
        eval_knn.main(parser.parse_args(knn_argv(split_folder, str(tmp_path / "px2"),
                                                 ["--arch", "pixels", "--pretrained", "x.pth"])))


@pytest.mark.parametrize("poison,message", [
    ("running_var", "non-finite values"),  # inf BN statistics in the file: refused at load
    ("huge", "feature vectors hold NaN/inf"),  # finite weights whose features overflow
])
def test_eval_knn_refuses_non_finite_weights_or_features(split_folder, tmp_path, poison, message):
    from src.checkpoint import NonFiniteStateError
    from src.resnet50 import build_backbone
    model = build_backbone("resnet18", cifar_stem=True, width=8)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if poison == "running_var" and name.endswith("running_var"):
                t.fill_(float("inf"))
            elif poison == "huge" and "conv" in name:
                t.fill_(1e4)  # x ~1e5 per conv: inf after a few layers
    path = str(tmp_path / "w.pth")
    torch.save(model.state_dict(), path)
    with pytest.raises(NonFiniteStateError, match=message):
        eval_knn.main(eval_knn.get_args_parser().parse_args(
            knn_argv(split_folder, str(tmp_path / "k"), ["--pretrained", path])))


def test_eval_refuses_weights_missing_most_of_the_backbone_unless_asked(split_folder, tmp_path):
    from src.checkpoint import CheckpointError
    from src.resnet50 import build_backbone
    state = build_backbone("resnet18", cifar_stem=True, width=8).state_dict()
    path = str(tmp_path / "w.pth")
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4")}, path)
    parser = eval_knn.get_args_parser()
    with pytest.raises(CheckpointError, match="--allow_missing_keys true"):
        eval_knn.main(parser.parse_args(knn_argv(split_folder, str(tmp_path / "a"),
                                                 ["--pretrained", path])))
    res = eval_knn.main(parser.parse_args(knn_argv(
        split_folder, str(tmp_path / "b"), ["--pretrained", path, "--allow_missing_keys", "true"])))
    assert set(res) == {3, 20}

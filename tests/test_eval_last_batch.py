"""The evaluations' training epochs keep the last partial batch, as the original's eval_linear
and eval_semisup (a DataLoader without drop_last): every labelled image is trained on each
epoch. The one exception: a last batch of one sample per process when BatchNorm layers train."""
import pytest
import torch
import torch.nn as nn

import eval_linear
import eval_semisup
from conftest import entry_args, make_split_folder
from src import evaluation
from src.evaluation import tensor_loaders, train_epoch


def _count_samples(monkeypatch):
    """Samples each train_epoch call trains on (what its forward is given)."""
    seen, real = [], evaluation.train_epoch

    def counting(forward, modules, loader, *a, **kw):
        sizes = []
        out = real(lambda x: (sizes.append(len(x)), forward(x))[1], modules, loader, *a, **kw)
        seen.append(sum(sizes))
        return out
    monkeypatch.setattr(evaluation, "train_epoch", counting)
    return seen


def _args():
    return entry_args("eval_linear", ["--seed", "0", "--batch_size", "4"], world_size=1, rank=0,
                      device="cpu")


def _tensors(n, dim=6):
    torch.manual_seed(0)
    return torch.randn(n, dim), torch.arange(n) % 3


@pytest.mark.parametrize("n,head,expected", [
    (22, nn.Linear(6, 3), 22),                                    # 5 batches of 4 + 2
    (21, nn.Linear(6, 3), 21),                                    # + 1
    (22, nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 3)), 22),  # + 2: kept with BatchNorm
    (21, nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 3)), 20),  # + 1: BatchNorm cannot
])
def test_cached_features_epoch_sees_every_sample(n, head, expected):
    args = _args()
    train_loader, _ = tensor_loaders(_tensors(n), _tensors(3), args)
    train_loader.sampler.set_epoch(0)
    seen = []
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    epoch, loss, prec1, prec5 = train_epoch(lambda x: (seen.append(len(x)), head(x))[1], [head],
                                            train_loader, optimizer, 0, args)
    assert sum(seen) == expected and torch.isfinite(torch.tensor(loss))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # 3 classes x 6 train images = 18: 4 batches of 4 and a last one of 2
    return make_split_folder(tmp_path_factory.mktemp("last") / "data", 6, 2)


@pytest.mark.parametrize("cache", ["true", "false"])
def test_eval_linear_trains_on_every_image(folder, tmp_path, monkeypatch, cache):
    seen = _count_samples(monkeypatch)
    eval_linear.main(eval_linear.get_args_parser().parse_args([
        "--data_path", folder, "--arch", "pixels", "--train_crop", "16", "--resize", "16",
        "--center_crop", "16", "--batch_size", "4", "--workers", "0", "--epochs", "1",
        "--cache_features", cache, "--dump_path", str(tmp_path / "lin")]))
    assert seen == [18]


def test_eval_semisup_trains_on_every_labelled_image(folder, tmp_path, monkeypatch):
    seen = _count_samples(monkeypatch)
    eval_semisup.main(eval_semisup.get_args_parser().parse_args([
        "--data_path", folder, "--arch", "resnet18", "--width", "8", "--cifar_stem", "true",
        "--train_crop", "16", "--resize", "16", "--center_crop", "16", "--batch_size", "4",
        "--workers", "0", "--epochs", "1", "--labels_perc", "100",
        "--dump_path", str(tmp_path / "semi")]))
    assert seen == [18]  # the backbone's BatchNorm trains on the last batch of 2 as well

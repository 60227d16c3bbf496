"""assign_clusters.py on tiny data: argmax, balanced and k-means assignments, NMI = 1 where the
set separates, Sinkhorn's near-equal sizes where argmax leaves a cluster empty, the CSV / JSON /
PNG outputs, one-line errors, and a 2-process run equal to the 1-process one."""
import argparse
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import ROOT, free_port

import assign_clusters
from src.checkpoint import add_module_prefix
from src.cli import run_main
from src.resnet50 import build_backbone

COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 230)]
PER_CLASS = 10


def make_colour_images(root, flat=False, seed=0):
    """4 classes x 10 near-solid colour PNGs (16x16): root/class_c/img_i.png, or all in root."""
    rng = np.random.default_rng(seed)
    for c, colour in enumerate(COLOURS):
        folder = root if flat else os.path.join(root, f"class_{c}")
        os.makedirs(folder, exist_ok=True)
        for i in range(PER_CLASS):
            arr = (np.array(colour) + rng.integers(-15, 15, (1, 1, 3))
                   + rng.integers(0, 10, (16, 16, 3)))
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(
                os.path.join(folder, f"c{c}_img_{i}.png"))
    return str(root)


def tiny_swav(nmb_prototypes=4, output_dim=4):
    torch.manual_seed(0)
    return build_backbone("resnet18", normalize=True, output_dim=output_dim, hidden_mlp=0,
                          nmb_prototypes=nmb_prototypes, cifar_stem=True, width=8)


def save_checkpoint(model, path, **flags):
    """Our training checkpoint's layout: `module.` keys and the run's flags."""
    torch.save({"epoch": 1, "state_dict": add_module_prefix(model.state_dict()),
                "args": {"arch": "resnet18", **flags}}, path)
    return str(path)


def argv(data, dump, pretrained, *extra):
    return ["--data_path", data, "--dump_path", dump, "--pretrained", pretrained,
            "--arch", "resnet18", "--width", "8", "--cifar_stem", "true", "--resize", "16",
            "--center_crop", "16", "--batch_size", "8", "--workers", "0", "--thumb_size", "16",
            "--log_freq", "2", *extra]


def run(*args):
    return assign_clusters.main(assign_clusters.get_args_parser().parse_args(argv(*args)))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """The colour ImageFolder and a tiny SwAV checkpoint whose projection head and prototypes
    are set by hand from the images' backbone features (written by --save_features): the head
    is a ridge regression onto the centred one-hot classes, the prototypes the normalised class
    means of the projections, so prototypes separate the classes exactly."""
    tmp = tmp_path_factory.mktemp("fitted")
    data = make_colour_images(str(tmp / "data"))
    model = tiny_swav()
    run(data, str(tmp / "first"), save_checkpoint(model, tmp / "random.pth"),
        "--save_features", "true")
    feats = torch.from_numpy(np.load(tmp / "first" / "features.npy"))
    with open(tmp / "first" / "features_paths.txt") as f:
        paths = f.read().splitlines()
    y = torch.tensor([int(os.path.basename(os.path.dirname(p))[-1]) for p in paths])
    x = feats - feats.mean(0)
    targets = F.one_hot(y, 4).float() - 0.25
    ridge = 0.01 * (x * x).sum() / len(x)
    w = torch.linalg.solve(x.t() @ x + ridge * torch.eye(x.shape[1]), x.t() @ targets).t()
    with torch.no_grad():
        model.projection_head.weight.copy_(w)
        model.projection_head.bias.copy_(-w @ feats.mean(0))
        z = F.normalize(model.projection_head(feats), dim=1)
        means = F.normalize(torch.stack([z[y == c].mean(0) for c in range(4)]), dim=1)
    return {"tmp": tmp, "data": data, "model": model, "means": means, "paths": paths,
            "feats": feats}


def with_prototypes(fitted, name, prototypes, **flags):
    with torch.no_grad():
        fitted["model"].prototypes.weight.copy_(prototypes)
    return save_checkpoint(fitted["model"], fitted["tmp"] / name, **flags)


def test_argmax_separates_the_classes_and_writes_every_output(fitted, tmp_path):
    # shuffled prototype order: clusters are a permutation of the classes
    # prototypes of different norms: training normalises them before scoring
    prototypes = fitted["means"][[2, 0, 3, 1]] * torch.tensor([[1.0], [2.0], [3.0], [0.5]])
    ckpt = with_prototypes(fitted, "sep.pth", prototypes, temperature=0.2, epsilon=0.05)
    res = run(fitted["data"], str(tmp_path), ckpt, "--mode", "argmax")
    assert res["mode"] == "argmax" and res["clusters"] == 4
    assert res["nmi"] == pytest.approx(1.0) and res["ari"] == pytest.approx(1.0)
    assert res["purity"] == pytest.approx(1.0)

    rows = read_csv(tmp_path / "assignments.csv")
    assert list(rows[0]) == ["path", "cluster", "confidence", "label"]
    assert [r["path"] for r in rows] == fitted["paths"]  # one row per image, order found
    assert {(r["label"], r["cluster"]) for r in rows} == \
        {("class_0", "1"), ("class_1", "3"), ("class_2", "0"), ("class_3", "2")}
    # confidence: softmax(z . c / T), z the normalised projection, c the normalised prototype
    with torch.no_grad():
        z = F.normalize(fitted["model"].projection_head(fitted["feats"]), dim=1)
        probs = F.softmax(z @ F.normalize(prototypes, dim=1).t() / 0.2, dim=1)
    np.testing.assert_allclose([float(r["confidence"]) for r in rows], probs.max(1)[0].numpy(),
                               atol=1e-5)

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["sizes"] == [10, 10, 10, 10] and metrics["temperature"] == 0.2
    assert metrics["nmi"] == pytest.approx(1.0)
    sheets = sorted(os.listdir(tmp_path / "sheets"))
    assert sheets == [f"cluster_00{k}_n10.png" for k in range(4)]
    sheet = Image.open(tmp_path / "sheets" / sheets[0])
    assert sheet.size == (4 * 18 + 2, 3 * 18 + 2)  # 10 thumbnails of 16 px: 4 columns, 3 rows
    # the red cluster's sheet is red, the overview has a row per cluster
    pixels = np.asarray(Image.open(tmp_path / "sheets" / "cluster_001_n10.png"))
    assert pixels[2:18, 2:18, 0].mean() > 180 and pixels[2:18, 2:18, 1].mean() < 80
    assert Image.open(tmp_path / "overview.png").size[1] == 4 * 18 + 2
    assert not (tmp_path / "features.npy").exists()  # only with --save_features


def unbalanced_prototypes(means):
    """Classes 0 and 1 keep their prototype; classes 2 and 3 share two nearby prototypes, the
    first nearer to almost all of them: argmax leaves cluster 3 (nearly) empty."""
    mid = F.normalize(means[2] + means[3], dim=0)
    return torch.stack([means[0], means[1], mid, F.normalize(mid - 0.2 * means[0], dim=0)])


def test_balanced_evens_out_the_sizes_argmax_leaves_unbalanced(fitted, tmp_path):
    ckpt = with_prototypes(fitted, "unbal.pth", unbalanced_prototypes(fitted["means"]),
                           epsilon=0.04, sinkhorn_iterations=4)
    argmax = run(fitted["data"], str(tmp_path / "argmax"), ckpt)  # the default mode
    assert argmax["mode"] == "argmax"
    n_over_k = 40 / 4
    assert min(argmax["sizes"]) < n_over_k / 3  # argmax: a cluster (nearly) empty
    balanced = run(fitted["data"], str(tmp_path / "balanced"), ckpt, "--mode", "balanced")
    assert balanced["epsilon"] == 0.04 and balanced["sinkhorn_iterations"] == 4  # training's
    sizes = balanced["sizes"]
    assert n_over_k / 3 <= min(sizes) and max(sizes) <= 3 * n_over_k, sizes
    conf = balanced["confidence"]
    assert ((conf > 0) & (conf <= 1 + 1e-5)).all()  # Sinkhorn probabilities
    rows = read_csv(tmp_path / "balanced" / "assignments.csv")
    assert [int(r["cluster"]) for r in rows] == balanced["assignments"].tolist()


def test_prototype_groups_merge_the_finer_prototypes_into_the_classes(fitted, tmp_path):
    """8 prototypes, two per class (each class mean turned a little either way): argmax splits
    every class in two, --prototype_groups 4 gives the classes back; the prototype-level
    figures stay in metrics.json."""
    model = tiny_swav(nmb_prototypes=8)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.load_state_dict({k: v for k, v in fitted["model"].state_dict().items()
                               if not k.startswith("prototypes")}, strict=False)
        means = fitted["means"]
        turn = F.normalize(torch.randn(4, means.shape[1], generator=generator), dim=1)
        turn = F.normalize(turn - (turn * means).sum(1, keepdim=True) * means, dim=1)
        model.prototypes.weight.copy_(torch.cat([means + 0.3 * turn, means - 0.3 * turn]))
    ckpt = save_checkpoint(model, tmp_path / "eight.pth", temperature=0.1)
    finer = run(fitted["data"], str(tmp_path / "finer"), ckpt)
    assert finer["clusters"] == 8 and finer["nmi"] < 0.95  # each class split between two

    res = run(fitted["data"], str(tmp_path / "grouped"), ckpt, "--prototype_groups", "4")
    assert res["mode"] == "argmax" and res["clusters"] == 4 and sorted(res["sizes"]) == [10] * 4
    assert res["nmi"] == pytest.approx(1.0) and res["ari"] == pytest.approx(1.0)
    groups = res["prototype_group"]
    assert [groups[c] == groups[c + 4] for c in range(4)] == [True] * 4  # a class's two
    assert len(set(groups)) == 4
    # each image: its prototype's group and its prototype's confidence
    assert res["assignments"].tolist() == [groups[c] for c in finer["assignments"].tolist()]
    assert torch.equal(res["confidence"], finer["confidence"])
    metrics = json.loads((tmp_path / "grouped" / "metrics.json").read_text())
    assert metrics["prototypes"]["clusters"] == 8
    assert metrics["prototypes"]["nmi"] == pytest.approx(finer["nmi"])
    rows = read_csv(tmp_path / "grouped" / "assignments.csv")
    assert [int(r["cluster"]) for r in rows] == res["assignments"].tolist()
    assert len(os.listdir(tmp_path / "grouped" / "sheets")) == 4


def test_kmeans_on_a_backbone_without_prototypes_flat_folder(tmp_path):
    """A plain backbone (torchvision-style state dict: no head) on a flat folder: k-means, no
    labels, so no metrics but everything else; the same images as an ImageFolder give NMI 1."""
    torch.manual_seed(0)  # with this init, uniformly drawn k-means centroids gave NMI 0.80
    model = build_backbone("resnet18", cifar_stem=True, width=8)
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    ckpt = str(tmp_path / "backbone.pth")
    folder = make_colour_images(str(tmp_path / "folder"))
    res = run(folder, str(tmp_path / "labelled"), ckpt, "--nmb_clusters", "4")
    assert res["mode"] == "kmeans" and res["nmi"] == pytest.approx(1.0)
    conf = res["confidence"]
    assert ((conf > 0.9) & (conf <= 1 + 1e-5)).all()  # cosines to the centroids

    flat = make_colour_images(str(tmp_path / "flat"), flat=True)
    out = tmp_path / "unlabelled"
    res = run(flat, str(out), ckpt, "--mode", "kmeans", "--nmb_clusters", "4",
              "--save_features", "true")
    rows = read_csv(out / "assignments.csv")
    assert list(rows[0]) == ["path", "cluster", "confidence"] and len(rows) == 40
    metrics = json.loads((out / "metrics.json").read_text())
    assert "nmi" not in metrics and sum(metrics["sizes"]) == 40
    assert "no class labels" in (out / "assign_clusters.log").read_text()
    assert np.load(out / "features.npy").shape == (40, model.num_features)
    assert len(os.listdir(out / "sheets")) == metrics["non_empty"]
    assert (out / "overview.png").exists()


def test_deepcluster_heads_and_bad_input_are_one_line_errors(fitted, tmp_path, monkeypatch):
    # DeepCluster-v2: several prototype heads, --head picks one
    dc = build_backbone("resnet18", normalize=True, output_dim=4, hidden_mlp=0,
                        nmb_prototypes=[4, 5], cifar_stem=True, width=8)
    with torch.no_grad():
        dc.load_state_dict({k: v for k, v in fitted["model"].state_dict().items()
                            if not k.startswith("prototypes")}, strict=False)
        dc.prototypes.prototypes1.weight[:4] = fitted["means"]
        dc.prototypes.prototypes1.weight[4] = -fitted["means"].sum(0)
    dc_ckpt = save_checkpoint(dc, tmp_path / "dc.pth", temperature=0.1)
    res = run(fitted["data"], str(tmp_path / "dc"), dc_ckpt, "--head", "1")
    assert res["clusters"] == 5 and res["nmi"] == pytest.approx(1.0)

    backbone = build_backbone("resnet18", cifar_stem=True, width=8)
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    cases = [
        ([dc_ckpt, "--head", "2"], "--head 2 out of range"),
        ([str(tmp_path / "backbone.pth"), "--mode", "argmax"], "--mode argmax needs prototypes"),
        ([str(tmp_path / "backbone.pth")], "give --nmb_clusters K"),
        ([dc_ckpt, "--mode", "balanced", "--nmb_clusters", "3"], "give one of them"),
        ([dc_ckpt, "--nmb_clusters", "3", "--prototype_groups", "2"], "--mode argmax|balanced"),
        ([dc_ckpt, "--prototype_groups", "5"], "prototypes that hold images"),
        ([str(tmp_path / "backbone.pth"), "--nmb_clusters", "41"], "K <= the 40 images"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append(([dc_ckpt], "contains no images", str(empty)))
    for extra, message, *data in cases:
        monkeypatch.setattr(sys, "argv", ["assign_clusters.py", *argv(
            data[0] if data else fitted["data"], str(tmp_path / "err"), *extra)])
        with pytest.raises(SystemExit) as exit_info:  # the __main__ block's run_main
            run_main(assign_clusters.main, argparse.ArgumentParser(
                parents=[assign_clusters.get_args_parser()]))
        text = str(exit_info.value.code)
        assert text.startswith("error: ") and message in text and "\n" not in text, text


def test_two_processes_give_the_one_process_assignments(fitted, tmp_path):
    """Sinkhorn over the two shards = over the whole set. (k-means is not run under torchrun
    here, each run costs seconds; its centroids start from the same seeded draw on every rank.)"""
    ckpt = with_prototypes(fitted, "two.pth", unbalanced_prototypes(fitted["means"]),
                           epsilon=0.05)
    extra = ["--mode", "balanced"]
    one = run(fitted["data"], str(tmp_path / "one"), ckpt, *extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "assign_clusters.py",
           *argv(fitted["data"], str(tmp_path / "two"), ckpt, *extra)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_csv(tmp_path / "two" / "assignments.csv")
    assert [int(r["cluster"]) for r in rows] == one["assignments"].tolist()
    np.testing.assert_allclose([float(r["confidence"]) for r in rows],
                               one["confidence"].numpy(), atol=1e-4)


@pytest.mark.parametrize("kind", ["ours", "released", "safetensors"])
def test_prototypes_and_training_flags_are_read_from_every_format(tmp_path, kind):
    """The head is rebuilt from shapes alone (released files hold no flags); our checkpoints
    also give the training flags, from the same single load."""
    from safetensors.torch import save_file

    from src.clusters import head_config, read_weights
    model = build_backbone("resnet18", normalize=True, output_dim=8, hidden_mlp=32,
                           nmb_prototypes=[5, 6], cifar_stem=True, width=8)
    path = str(tmp_path / f"w.{kind}")
    if kind == "ours":
        save_checkpoint(model, path, epsilon=0.03)
    elif kind == "released":  # the original's files: flat `module.` keys, old pickle format
        torch.save(add_module_prefix(model.state_dict()), path,
                   _use_new_zipfile_serialization=False)
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    state, flags = read_weights(path)
    assert head_config(state) == {"output_dim": 8, "nmb_prototypes": [5, 6], "hidden_mlp": 32}
    assert flags == ({"arch": "resnet18", "epsilon": 0.03} if kind == "ours" else {})
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    del state["prototypes.prototypes0.weight"], state["prototypes.prototypes1.weight"]
    assert head_config(state) is None  # a backbone (+ head) without prototypes: k-means

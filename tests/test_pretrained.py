"""src.pretrained: every weights format loads the same tensors; bad files give one-line errors."""
import os
import pickle
import re

import pytest
import torch
from safetensors.torch import save_file

from src.checkpoint import CheckpointError, add_module_prefix
from src.pretrained import (RELEASES, extract_state_dict, load_linear_classifier,
                            load_pretrained, read_state_dict, resolve_weights)
from src.resnet50 import resnet18, resnet50


def tiny(**kwargs):
    torch.manual_seed(kwargs.pop("seed", 0))
    return resnet18(width=8, cifar_stem=True, **kwargs)


def randomize(model):
    """Non-default values in every tensor, BN statistics included."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5)
    return model


def backbone_state(model):
    return {k: v for k, v in model.state_dict().items()
            if not k.startswith(("projection_head.", "prototypes."))}


def assert_same_backbone(model, reference):
    got, want = backbone_state(model), backbone_state(reference)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.fixture
def source_model():
    return randomize(tiny(seed=1, output_dim=16, hidden_mlp=32, nmb_prototypes=10))


def write_format(kind, model, path):
    sd = model.state_dict()
    if kind == "ours":  # a training checkpoint of main_swav.py
        torch.save({"epoch": 3, "state_dict": add_module_prefix(sd), "optimizer": {}}, path)
    elif kind == "released":  # flat, module.-prefixed, heads included
        torch.save(add_module_prefix(sd), path)
    elif kind == "torchvision":
        torch.save(backbone_state(model), path)
    elif kind == "wrapped_with_stray_tensor":  # a wrapper beside a metric saved as a tensor
        torch.save({"model": sd, "best_acc": torch.tensor(75.3)}, path)
    elif kind == "safetensors":  # timm's format
        save_file({k: v.contiguous() for k, v in backbone_state(model).items()}, path)
    elif kind == "safetensors_noext":  # detected by content, not by name
        save_file({k: v.contiguous() for k, v in backbone_state(model).items()}, path)
    return path


@pytest.mark.parametrize("kind", ["ours", "released", "torchvision", "wrapped_with_stray_tensor",
                                  "safetensors", "safetensors_noext"])
def test_every_format_loads_the_same_backbone(tmp_path, source_model, kind):
    ext = ".safetensors" if kind == "safetensors" else ".pth"
    path = write_format(kind, source_model, str(tmp_path / f"w_{kind}{ext}"))
    model = tiny(seed=2)
    report = load_pretrained(model, path)
    assert_same_backbone(model, source_model)
    assert report["missing"] == [] and report["mismatched"] == [] and report["unexpected"] == []
    # strict accepts an exact match; heads in the file are ignored, not "unexpected"
    load_pretrained(tiny(seed=3), path, strict=True)


def test_heads_load_when_asked(tmp_path, source_model):
    path = write_format("released", source_model, str(tmp_path / "r.pth"))
    model = tiny(seed=2, output_dim=16, hidden_mlp=32, nmb_prototypes=10)
    load_pretrained(model, path, include_heads=True, strict=True)
    for k, v in source_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_missing_and_unexpected_keys_are_reported_and_strict_refuses(tmp_path, source_model):
    sd = backbone_state(source_model)
    del sd["layer4.1.conv2.weight"]
    sd["layer9.extra.weight"] = torch.ones(3)
    path = str(tmp_path / "partial.pth")
    torch.save(sd, path)
    report = load_pretrained(tiny(seed=2), path)
    assert report["missing"] == ["layer4.1.conv2.weight"]
    assert report["unexpected"] == ["layer9.extra.weight"]
    with pytest.raises(CheckpointError, match=r"partial\.pth: does not match the model exactly: "
                                              r"1 missing \(e\.g\. layer4\.1\.conv2\.weight\)"):
        load_pretrained(tiny(seed=2), path, strict=True)


class Evil:
    """Unpickling this would create a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def bad_file(kind, tmp_path):
    path = str(tmp_path / f"{kind}.pth")
    good = str(tmp_path / "good.pth")
    torch.save(backbone_state(tiny()), good)
    if kind == "truncated":
        with open(good, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
    elif kind == "corrupt":
        with open(path, "wb") as f:
            f.write(os.urandom(4096))
    elif kind == "html":
        with open(path, "w") as f:
            f.write("<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>\n")
    elif kind == "empty":
        open(path, "wb").close()
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "dict_without_tensors":
        torch.save({"epoch": 3, "args": {"lr": 0.1}}, path)
    elif kind == "truncated_safetensors":
        st = str(tmp_path / "good.safetensors")
        save_file(backbone_state(tiny()), st)
        with open(st, "rb") as f:
            data = f.read()
        path = str(tmp_path / "cut.safetensors")
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
    elif kind == "other_width":  # same names, every shape different
        torch.save(resnet18(width=16, cifar_stem=True).state_dict(), path)
    elif kind == "other_block":  # a Bottleneck ResNet's weights for a BasicBlock model
        torch.save(resnet50(width=8, cifar_stem=True).state_dict(), path)
    elif kind == "no_resnet":
        torch.save({"encoder.weight": torch.ones(4, 4), "decoder.weight": torch.ones(4)}, path)
    return path


BAD = {
    "truncated": "corrupt or truncated zip archive",
    "corrupt": "not a loadable weights file",
    "html": "HTML/XML page",
    "empty": "empty file",
    "list": "holds no state dict .*found list",
    "dict_without_tensors": "holds no state dict .*keys \\['args', 'epoch'\\]",
    "truncated_safetensors": "corrupt or truncated safetensors file",
    "other_width": "weights of another architecture: 0 tensors fit, of 100 in the model and "
                   "100 in the file \\(100 of another shape",
    "other_block": "weights of another architecture",
    "no_resnet": "weights of another architecture: 0 tensors fit",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_files_give_one_line_errors_naming_the_file(tmp_path, kind):
    path = bad_file(kind, tmp_path)
    model = tiny(seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_pretrained(model, path)
    msg = str(info.value)
    assert msg.startswith(path + ": ") and "\n" not in msg
    assert re.search(BAD[kind], msg), msg
    for k, v in model.state_dict().items():  # nothing half-loaded
        assert torch.equal(v, before[k]), k


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, how):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "evil.pth")
    payload = {"conv1.weight": torch.ones(1), "x": Evil(str(marker))}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(tiny(), path)
    assert not marker.exists()
    control = tmp_path / "control"  # the payload is live: unpickling it creates its file
    pickle.loads(pickle.dumps(Evil(str(control)))).close()
    assert control.exists()
    msg = str(info.value)
    assert msg.startswith(path + ": not a loadable weights file") and "\n" not in msg
    if how == "torch.save":
        assert re.search(r"refused to unpickle (io|builtins)\.open: .* could run code", msg), msg


def test_missing_file_and_uncached_url_do_not_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(CheckpointError, match="nope.pth: no such file"):
        load_pretrained(tiny(), str(tmp_path / "nope.pth"))
    url = "http://127.0.0.1:9/w.pth"  # never contacted: download=False
    with pytest.raises(CheckpointError, match=r"^http://127\.0\.0\.1:9/w\.pth: not downloaded "
                                              r"\(looked for .*th/hub/checkpoints/w\.pth\)"):
        load_pretrained(tiny(), url)
    with pytest.raises(CheckpointError, match="swav_800ep_pretrain.pth.tar: not downloaded"):
        resolve_weights("swav_800ep")


def test_url_and_released_name_use_the_torch_hub_cache(tmp_path, monkeypatch, source_model):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    cache = tmp_path / "th" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    write_format("released", source_model, str(cache / RELEASES["swav_100ep"].file))
    assert resolve_weights("swav_100ep") == str(cache / "swav_100ep_pretrain.pth.tar")
    model = tiny(seed=2)
    load_pretrained(model, RELEASES["swav_100ep"].url)  # found in the cache: no download
    assert_same_backbone(model, source_model)
    # a local file named like a release wins over the release
    local = tmp_path / "swav_100ep"
    write_format("torchvision", tiny(seed=5), str(local))
    monkeypatch.chdir(tmp_path)
    assert resolve_weights("swav_100ep") == "swav_100ep"


def test_extract_state_dict_strips_wrappers():
    t = torch.ones(1)
    assert extract_state_dict({"teacher": {"module.backbone.conv1.weight": t}}) == \
        {"conv1.weight": t}
    assert extract_state_dict({"state_dict": {"model": {"encoder.layer1.0.w": t}}}) == \
        {"layer1.0.w": t}


def linear_checkpoint(path, weight, bias, **extra):
    """eval_linear.py's checkpoint: the DDP-wrapped RegLog under "state_dict"."""
    torch.save({"epoch": 100, "state_dict": {"module.linear.weight": weight,
                                             "module.linear.bias": bias, **extra},
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.3, "params": [0, 1]}]},
                "best_acc": 75.3}, path)
    return path


def test_load_linear_classifier(tmp_path):
    w, b = torch.randn(10, 64), torch.randn(10)
    fc = load_linear_classifier(linear_checkpoint(str(tmp_path / "l.pth"), w, b), 64)
    assert torch.equal(fc.weight, w) and torch.equal(fc.bias, b)
    torch.save({"fc.weight": w, "fc.bias": b, "conv1.weight": torch.ones(1)}, tmp_path / "tv.pth")
    assert torch.equal(load_linear_classifier(str(tmp_path / "tv.pth"), 64).weight, w)
    with pytest.raises(CheckpointError, match="takes 64 features but the backbone gives 2048"):
        load_linear_classifier(str(tmp_path / "l.pth"), 2048)
    bn = linear_checkpoint(str(tmp_path / "bn.pth"), w, b, **{"module.bn.weight": torch.ones(3)})
    with pytest.raises(CheckpointError, match="BatchNorm before its linear layer"):
        load_linear_classifier(bn, 64)
    torch.save({"conv1.weight": torch.ones(1)}, tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match="holds no linear classifier"):
        load_linear_classifier(str(tmp_path / "none.pth"), 64)


def test_read_state_dict_of_a_state_dict_file(tmp_path, source_model):
    path = write_format("safetensors", source_model, str(tmp_path / "w.safetensors"))
    state = read_state_dict(path)
    assert set(state) == set(backbone_state(source_model))

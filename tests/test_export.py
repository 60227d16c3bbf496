"""tools/export_backbone.py: export -> load into torchvision / timm -> same features as ours."""
import importlib.util
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from safetensors import safe_open

from conftest import randomize_bn

from src.checkpoint import CheckpointError, add_module_prefix
from src.resnet50 import resnet18, resnet50, resnet50w2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "export_backbone.py")
spec = importlib.util.spec_from_file_location("export_backbone", TOOL)
export_backbone = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export_backbone)


@pytest.fixture(scope="module")
def swav_rn50(tmp_path_factory):
    """Our ResNet-50 (eval mode) and its weights in the released format (heads included)."""
    torch.manual_seed(0)
    model = randomize_bn(resnet50(output_dim=16, hidden_mlp=32, nmb_prototypes=10)).eval()
    path = str(tmp_path_factory.mktemp("export") / "swav_rn50.pth.tar")
    torch.save(add_module_prefix(model.state_dict()), path)
    return model, path


@pytest.fixture(scope="module")
def batch():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def our_features(model, x):
    return model.forward_backbone(x)


def test_torchvision_export_loads_strictly_and_gives_our_features(swav_rn50, batch, tmp_path):
    model, src = swav_rn50
    out = str(tmp_path / "tv.pth")
    export_backbone.main([src, "--to", "torchvision", "-o", out])
    state = torch.load(out, map_location="cpu", weights_only=True)
    tv = torchvision.models.resnet50()
    assert set(state) == set(tv.state_dict()) - {"fc.weight", "fc.bias"}
    tv.fc = nn.Identity()
    tv.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(batch), our_features(model, batch), atol=1e-5,
                                   rtol=0)


@pytest.fixture(scope="module")
def timm_export(swav_rn50, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("timm") / "swav.safetensors")
    export_backbone.main([swav_rn50[1], "--to", "timm", "-o", out, "--no_check"])
    return out


def test_timm_export_loads_strictly_and_gives_our_features(swav_rn50, timm_export, batch):
    model, src = swav_rn50
    out = timm_export
    with safe_open(out, "pt") as f:
        assert f.metadata()["source"] == src
    # timm's own loader, strict: every key of timm's ResNet-50 (no classifier) is in the file
    net = timm.create_model("resnet50", num_classes=0, checkpoint_path=out)
    assert type(net) is timm.models.resnet.ResNet
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(batch), our_features(model, batch), atol=1e-5,
                                   rtol=0)


def test_classifier_is_exported_as_fc(batch, tmp_path):
    # a ResNet-18 (the same code path as ResNet-50, half the cost) in our training format
    torch.manual_seed(0)
    model = randomize_bn(resnet18()).eval()
    src = str(tmp_path / "checkpoint.pth.tar")
    torch.save({"epoch": 1, "state_dict": add_module_prefix(model.state_dict())}, src)
    w, b = torch.randn(10, 512) * 0.01, torch.randn(10)
    linear = str(tmp_path / "linear.pth.tar")
    torch.save({"epoch": 100, "state_dict": {"module.linear.weight": w,
                                             "module.linear.bias": b}}, linear)
    out = str(tmp_path / "tv_fc.pth")
    export_backbone.main([src, "--to", "torchvision", "-o", out, "--classifier", linear,
                          "--no_check"])
    tv = torchvision.models.resnet18(num_classes=10)
    tv.load_state_dict(torch.load(out, weights_only=True), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(batch), our_features(model, batch) @ w.T + b,
                                   atol=1e-5, rtol=0)


def test_timm_safetensors_input_round_trips_to_torchvision(swav_rn50, timm_export, tmp_path):
    model = swav_rn50[0]
    out = str(tmp_path / "b.pth")
    export_backbone.main([timm_export, "--to", "torchvision", "-o", out, "--no_check"])
    state = torch.load(out, weights_only=True)
    for k, v in state.items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_the_wide_models_have_no_twin_and_say_so():
    with torch.device("meta"):  # only shapes are read
        state = resnet50w2().state_dict()
    layout = export_backbone.infer_layout(state, "w2.pth")
    assert layout.num_features == 4096 and layout.stem_width == 128
    with pytest.raises(CheckpointError, match=r"^w2\.pth: a resnet50w2 layout .* has no "
                                              r"torchvision twin: .*wide_resnet50_2 widens only"):
        export_backbone.build_target(layout, "torchvision", 0, "w2.pth")
    with pytest.raises(CheckpointError, match=r"^w2\.pth: a resnet50w2 layout .* has no timm "
                                              r"twin: .*plain 7x7 stem with 64 channels"):
        export_backbone.build_target(layout, "timm", 0, "w2.pth")


def test_small_and_deeper_layouts_map_to_their_named_twins():
    with torch.device("meta"):
        basic = export_backbone.infer_layout(resnet18().state_dict(), "r18")
        wide = export_backbone.infer_layout(torchvision.models.wide_resnet50_2().state_dict(),
                                            "wrn")
        for to in ("torchvision", "timm"):
            assert "resnet18" in export_backbone.build_target(basic, to, 0, "r18")[1]
            assert "wide_resnet50_2" in export_backbone.build_target(wide, to, 0, "wrn")[1]


def test_cifar_stem_has_no_twin(tmp_path):
    cifar = str(tmp_path / "cifar.pth")
    torch.save({"state_dict": add_module_prefix(resnet18(width=8, cifar_stem=True).state_dict())},
               cifar)
    with pytest.raises(CheckpointError, match="cifar.pth: a resnet18 layout .* 3x3 CIFAR stem "
                                              "has no torchvision twin"):
        export_backbone.main([cifar, "--to", "torchvision", "-o", str(tmp_path / "x.pth")])
    assert not os.path.exists(tmp_path / "x.pth")


def test_cli_error_is_one_line(tmp_path):
    html = tmp_path / "page.pth"
    html.write_text("<!doctype html><title>Service unavailable</title>")
    r = subprocess.run([sys.executable, TOOL, str(html), "--to", "timm", "-o",
                        str(tmp_path / "x.safetensors")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    assert r.stderr == f"error: {html}: not a loadable weights file (an HTML/XML page, not " \
                       "weights: a failed download or an error page saved as the file?)\n"
    assert not os.path.exists(tmp_path / "x.safetensors")

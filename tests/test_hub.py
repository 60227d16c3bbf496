"""hubconf.py through torch.hub.load(..., source="local"); downloads from a server on 127.0.0.1."""
import http.server
import importlib.util
import os
import sys
import threading
import types

import pytest
import torch
import torch.nn as nn
import torchvision

from conftest import randomize_bn

from src.checkpoint import CheckpointError, add_module_prefix
from src.pretrained import HUB_ALIASES, RELEASES, Release
from src.resnet50 import resnet18, resnet50

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hub_load(name, **kwargs):
    return torch.hub.load(ROOT, name, source="local", **kwargs)


def import_hubconf():
    spec = importlib.util.spec_from_file_location("hubconf_under_test", os.path.join(ROOT,
                                                                                     "hubconf.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Server:
    """Serves a folder over HTTP on 127.0.0.1 (ephemeral port) and counts the requests."""

    def __init__(self, root):
        self.requests = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                outer.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    root = tmp_path / "www"
    root.mkdir()
    s = Server(root)
    s.root = root
    yield s
    s.close()


@pytest.fixture(scope="module")
def released_rn50():
    """A file in the released format: flat, `module.`-prefixed, projection head and prototypes."""
    torch.manual_seed(0)
    model = randomize_bn(resnet50(output_dim=16, hidden_mlp=32, nmb_prototypes=10))
    return add_module_prefix(model.state_dict())


def test_entries_are_the_model_zoo_plus_the_original_names():
    hub = import_hubconf()
    entries = {f for f in dir(hub) if callable(getattr(hub, f)) and not f.startswith("_")}
    assert entries == set(RELEASES) | set(HUB_ALIASES)
    assert len(RELEASES) == 15
    assert RELEASES["swav_800ep"].url == \
        "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar"
    assert hub.resnet50.__doc__.startswith("SwAV resnet50, 800 epochs")


@pytest.mark.parametrize("name", sorted(set(RELEASES) | set(HUB_ALIASES)))
def test_every_entry_builds_without_weights(name):
    # on the meta device: the constructors run in full, without allocating 586M parameters
    with torch.device("meta"):
        model = hub_load(name, pretrained=False)
    arch = RELEASES[HUB_ALIASES.get(name, name)].arch
    n_params = sum(p.numel() for p in model.parameters())
    if arch == "resnet50":
        assert type(model) is torchvision.models.ResNet and isinstance(model.fc, nn.Identity)
        assert n_params == 23_508_032
    else:  # the original README's parameter counts: 94M, 375M, 586M
        assert type(model).__name__ == "ResNet" and model.num_features == 2048 * int(arch[-1])
        assert round(n_params / 1e6) == {"resnet50w2": 94, "resnet50w4": 375,
                                         "resnet50w5": 586}[arch]


def test_resnet50_on_cpu_returns_features_or_a_new_head():
    model = hub_load("resnet50", pretrained=False).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2048)
    model = hub_load("swav_400ep", pretrained=False, num_classes=10)
    assert model.fc.out_features == 10


def test_pretrained_downloads_from_the_url_and_loads_the_files_weights(server, released_rn50):
    torch.save(released_rn50, server.root / "swav_800ep_pretrain.pth.tar")
    url = server.url + "swav_800ep_pretrain.pth.tar"
    model = hub_load("resnet50", weights=url, progress=False)
    assert type(model) is torchvision.models.ResNet and isinstance(model.fc, nn.Identity)
    state = model.state_dict()
    backbone = {k[len("module."):]: v for k, v in released_rn50.items()
                if not k.startswith(("module.projection_head", "module.prototypes"))}
    assert set(state) == set(backbone)
    for k, v in backbone.items():
        assert torch.equal(state[k], v), k
    # cached in torch.hub's cache under TORCH_HOME: a second load does not download again
    cached = os.path.join(os.environ["TORCH_HOME"], "hub", "checkpoints",
                          "swav_800ep_pretrain.pth.tar")
    assert os.path.isfile(cached) and server.requests == ["/swav_800ep_pretrain.pth.tar"]
    hub_load("deepclusterv2_800ep", weights=url)
    assert len(server.requests) == 1


def test_classifier_from_a_url_becomes_fc(server):
    # eval_linear.py's checkpoint format, as the released swav_800ep_eval_linear.pth.tar
    w, b = torch.randn(1000, 2048) * 0.01, torch.randn(1000)
    torch.save({"epoch": 100, "state_dict": {"module.linear.weight": w, "module.linear.bias": b},
                "best_acc": 75.3}, server.root / "linear.pth.tar")
    model = hub_load("resnet50", pretrained=False, classifier=server.url + "linear.pth.tar",
                     progress=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        fc, model.fc = model.fc, nn.Identity()
        features = model(x)
    assert torch.equal(fc.weight, w) and torch.equal(fc.bias, b)
    torch.testing.assert_close(logits, features @ w.T + b)


def test_classifier_true_where_none_was_released():
    with pytest.raises(ValueError, match="no linear classifier was released for "
                                         "deepclusterv2_800ep"):
        hub_load("deepclusterv2_800ep", pretrained=False, classifier=True)
    with pytest.raises(ValueError, match="weights= was given with pretrained=False"):
        hub_load("resnet50", pretrained=False, weights="x.pth")


def test_download_errors_are_one_line_and_leave_no_file(server):
    cache = os.path.join(os.environ["TORCH_HOME"], "hub", "checkpoints")
    with pytest.raises(CheckpointError) as info:
        hub_load("resnet50", weights=server.url + "missing.pth.tar")
    assert str(info.value).startswith(server.url + "missing.pth.tar: download failed (HTTP "
                                                   "Error 404")
    assert "\n" not in str(info.value)
    assert not os.path.exists(os.path.join(cache, "missing.pth.tar"))
    # an error page served with status 200 and saved under the checkpoint's name
    (server.root / "page.pth.tar").write_text("<html><body>Access denied</body></html>")
    with pytest.raises(CheckpointError, match=r"page\.pth\.tar: not a loadable weights file \(an "
                                              r"HTML/XML page.*removed from the cache\]$"):
        hub_load("resnet50", weights=server.url + "page.pth.tar")
    assert not os.path.exists(os.path.join(cache, "page.pth.tar"))


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "rn18.pth")
    with pytest.raises(CheckpointError, match=r"rn18\.pth: weights of another architecture"):
        hub_load("resnet50", weights=str(tmp_path / "rn18.pth"))


def test_wide_entries_load_heads_when_built_with_them(tmp_path, monkeypatch):
    """The wide entries' code path (our ResNet, heads loaded strictly), on a tiny stand-in."""
    hub = import_hubconf()
    monkeypatch.setitem(hub._pretrained.RELEASES, "tiny",
                        Release("resnet18", "SwAV", 1, 8, "2x32", 0.0, "tiny.pth"))
    kwargs = dict(width=8, cifar_stem=True, output_dim=16, hidden_mlp=32, nmb_prototypes=10)
    torch.manual_seed(0)
    source = randomize_bn(resnet18(**kwargs))
    torch.save(add_module_prefix(source.state_dict()), tmp_path / "tiny.pth")
    model = hub._entry("tiny", "tiny")(weights=str(tmp_path / "tiny.pth"), **kwargs)
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    backbone_only = hub._entry("tiny", "tiny")(weights=str(tmp_path / "tiny.pth"), width=8,
                                               cifar_stem=True)
    assert backbone_only.projection_head is None
    with pytest.raises(ValueError, match="no linear classifier was released for tiny"):
        hub._entry("tiny", "tiny")(pretrained=False, classifier=True, width=8)


def test_hubconf_finds_its_own_src_when_another_src_was_imported(monkeypatch):
    foreign = types.ModuleType("src")
    foreign.__file__ = "/somewhere/else/src/__init__.py"
    foreign.__path__ = ["/somewhere/else/src"]
    monkeypatch.setitem(sys.modules, "src", foreign)
    with torch.device("meta"):
        model = hub_load("resnet50w2", pretrained=False)
    assert type(model).__module__ == "_swav_hub_src.resnet50"
    assert model.num_features == 4096

import pytest
import torch
import torchvision

from src import resnet50 as R


def _meta(fn, **kw):
    with torch.device("meta"):
        return fn(**kw)


@pytest.mark.parametrize("name,widen", [("resnet50", 1), ("resnet50w2", 2), ("resnet50w4", 4),
                                        ("resnet50w5", 5)])
def test_state_dict_keys_and_shapes_match_original_layout(name, widen):
    model = _meta(getattr(R, name), normalize=True, output_dim=128, hidden_mlp=2048,
                  nmb_prototypes=3000)
    sd = model.state_dict()
    # torchvision's ResNet-50 names (minus fc) + the SwAV head: the layout of the released files
    tv_keys = {k for k in _meta(torchvision.models.resnet50).state_dict() if not k.startswith("fc.")}
    head = {"projection_head.0.weight", "projection_head.0.bias", "projection_head.1.weight",
            "projection_head.1.bias", "projection_head.1.running_mean",
            "projection_head.1.running_var", "projection_head.1.num_batches_tracked",
            "projection_head.3.weight", "projection_head.3.bias", "prototypes.weight"}
    assert set(sd) == tv_keys | head
    w = 64 * widen
    assert sd["conv1.weight"].shape == (w, 3, 7, 7)
    assert sd["layer1.0.conv1.weight"].shape == (w, w, 1, 1)
    assert sd["layer1.0.conv3.weight"].shape == (4 * w, w, 1, 1)
    assert sd["layer4.2.conv3.weight"].shape == (32 * w, 8 * w, 1, 1)
    assert sd["projection_head.0.weight"].shape == (2048, 32 * w)
    assert sd["prototypes.weight"].shape == (3000, 128)
    assert model.padding.padding == (1, 1, 1, 1) and model.conv1.padding == (2, 2)


def test_head_variants_and_multiprototypes():
    m = _meta(R.resnet50, output_dim=0)
    assert m.projection_head is None and m.prototypes is None
    m = _meta(R.resnet50, output_dim=128, hidden_mlp=0)
    assert isinstance(m.projection_head, torch.nn.Linear)
    m = _meta(R.resnet50, output_dim=128, hidden_mlp=512, nmb_prototypes=[30, 40, 50])
    keys = [k for k in m.state_dict() if "prototypes" in k]
    assert keys == ["prototypes.prototypes0.weight", "prototypes.prototypes1.weight",
                    "prototypes.prototypes2.weight"]


def test_same_outputs_as_torchvision_with_its_weights():
    tv = torchvision.models.resnet50().eval()
    ours = R.resnet50().eval()
    ours.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")},
                         strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats_tv = torch.flatten(tv.avgpool(tv.layer4(tv.layer3(tv.layer2(tv.layer1(
            tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))), 1)
        torch.testing.assert_close(ours(x), feats_tv, rtol=1e-5, atol=1e-5)


def test_multicrop_forward_groups_by_resolution_and_runs_on_cpu():
    torch.manual_seed(0)
    m = R.resnet18(normalize=True, output_dim=16, hidden_mlp=32, nmb_prototypes=10,
                   cifar_stem=True, width=8).eval()
    crops = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)]
    calls = []
    orig = m.forward_backbone
    m.forward_backbone = lambda x: (calls.append(tuple(x.shape)), orig(x))[1]
    with torch.no_grad():
        emb, out = m(crops)
    assert calls == [(8, 3, 32, 32), (4, 3, 16, 16)]  # one pass per resolution group
    assert emb.shape == (12, 16) and out.shape == (12, 10)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(12))
    with torch.no_grad():  # crop-major order: rows of crop i are [4i, 4i+4)
        emb2, _ = m(crops[2])
    torch.testing.assert_close(emb[8:], emb2, rtol=1e-5, atol=1e-5)


def test_eval_mode_returns_feature_map_and_small_nets():
    m = R.resnet50(eval_mode=True).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 224, 224)).shape == (1, 2048, 7, 7)
    small = R.resnet18(cifar_stem=True, width=16)
    assert small.num_features == 128
    assert R.resnet34().num_features == 512
    with pytest.raises(ValueError, match="unknown --arch"):
        R.build_backbone("resnet51")

"""Export a backbone to torchvision's or timm's ResNet format.

    python tools/export_backbone.py swav_800ep --download --to torchvision -o swav_rn50_tv.pth
    python tools/export_backbone.py checkpoint.pth.tar --to timm -o swav_rn50.safetensors

SOURCE is anything src.pretrained reads: our training checkpoint, a released file, its URL or
its name (swav_800ep, deepclusterv2_800ep, ...; downloaded only with --download), a torchvision
or timm state dict, a safetensors file. The head (projection head, prototypes) is dropped;
--classifier adds a linear classifier (e.g. the released swav_800ep_eval_linear.pth.tar) as `fc`.

Our stem is ConstantPad2d(1) + a 7x7 conv with padding 2, which computes exactly what a 7x7 conv
with padding 3 does and has the same parameters, so the weights are copied unchanged. Before
writing, the tool loads the result into the target class with strict=True and, unless
--no_check, compares its features with ours on a random batch.

No twin exists for SwAV's wide ResNet-50s (RN50-w2/w4/w5: the stem has 64·w channels and every
stage is w times wider): torchvision's wide_resnet50_2 widens only the bottlenecks' inner convs,
and timm's ResNet sets stage widths (`channels`) but always builds its plain 7x7 stem with 64
channels. Use hubconf's resnet50w2/w4/w5 (src.resnet50) for those. The 3x3 CIFAR stem
(--cifar_stem) has no twin either.
"""
import argparse
import json
import os
import sys
from typing import NamedTuple

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from src.checkpoint import CheckpointError, atomic_save  # noqa: E402
from src.pretrained import (HEAD_PREFIXES, load_linear_classifier,  # noqa: E402
                            read_state_dict)
from src.resnet50 import BasicBlock, Bottleneck, ResNet  # noqa: E402

# (block, layers, width_per_group) -> the builder's name, the same in torchvision and timm
NAMED = {
    ("basic", (2, 2, 2, 2), 64): "resnet18",
    ("basic", (3, 4, 6, 3), 64): "resnet34",
    ("bottleneck", (3, 4, 6, 3), 64): "resnet50",
    ("bottleneck", (3, 4, 23, 3), 64): "resnet101",
    ("bottleneck", (3, 8, 36, 3), 64): "resnet152",
    ("bottleneck", (3, 4, 6, 3), 128): "wide_resnet50_2",
    ("bottleneck", (3, 4, 23, 3), 128): "wide_resnet101_2",
}


class Layout(NamedTuple):
    block: str              # "bottleneck" or "basic"
    layers: tuple           # blocks per stage
    stem_width: int         # conv1 output channels
    stem_kernel: int        # 7: ImageNet stem; 3: CIFAR stem
    width_per_group: int    # bottleneck inner width = planes * width_per_group / 64

    def describe(self):
        name = NAMED.get((self.block, self.layers, self.width_per_group), "ResNet")
        if name == "resnet50" and self.stem_width != 64 and self.stem_width % 64 == 0:
            name = f"resnet50w{self.stem_width // 64}"  # SwAV's wide ResNet-50
        return (f"{name} layout ({self.block} blocks {list(self.layers)}, stem {self.stem_width} "
                f"channels {self.stem_kernel}x{self.stem_kernel}, features {self.num_features})")

    @property
    def num_features(self):
        return self.stem_width * 8 * (4 if self.block == "bottleneck" else 1)

    def our_model(self):
        block = Bottleneck if self.block == "bottleneck" else BasicBlock
        return ResNet(block, list(self.layers), width=self.stem_width,
                      width_per_group=self.width_per_group, cifar_stem=self.stem_kernel == 3)


def infer_layout(backbone, name):
    """The ResNet layout of a backbone state dict, checked key by key against our ResNet."""
    backbone = {k: v for k, v in backbone.items() if not k.startswith(HEAD_PREFIXES)}
    if "conv1.weight" not in backbone or backbone["conv1.weight"].ndim != 4:
        raise CheckpointError(f"{name}: no 4-d conv1.weight: not a ResNet backbone")
    stem_width, _, kernel, _ = backbone["conv1.weight"].shape
    layers = []
    for i in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in backbone if k.startswith(f"layer{i}.")}
        if not blocks:
            raise CheckpointError(f"{name}: no layer{i} keys: not a 4-stage ResNet backbone")
        layers.append(max(blocks) + 1)
    bottleneck = "layer1.0.conv3.weight" in backbone
    inner = backbone["layer1.0.conv1.weight"].shape[0]
    planes = backbone["layer1.0.conv3.weight" if bottleneck else "layer1.0.conv2.weight"].shape[0]
    planes //= 4 if bottleneck else 1
    layout = Layout("bottleneck" if bottleneck else "basic", tuple(layers), int(stem_width),
                    int(kernel), int(inner * 64 // planes))
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in layout.our_model().state_dict().items()}
    found = {k: tuple(v.shape) for k, v in backbone.items()}
    if found != expected:
        diff = sorted(set(found) ^ set(expected)) or \
            sorted(k for k in found if found[k] != expected[k])
        raise CheckpointError(f"{name}: not a ResNet of a layout this tool knows (inferred "
                              f"{layout.describe()}; first difference: {diff[0]})")
    return layout


def build_target(layout, to, num_classes, name):
    """(model, the user's one-line constructor call) of the twin of `layout` in `to`."""
    arch = NAMED.get((layout.block, layout.layers, layout.width_per_group))
    if layout.stem_kernel != 7:
        raise CheckpointError(f"{name}: a {layout.describe()}: the 3x3 CIFAR stem has no {to} twin")
    if layout.stem_width != 64:
        why = ("torchvision's ResNets have a 64-channel stem and 2048 features; its "
               "wide_resnet50_2 widens only the bottlenecks' inner convs" if to == "torchvision"
               else "timm's ResNet sets stage widths but always builds its plain 7x7 stem with "
               "64 channels (stem_width only applies to its deep stems)")
        raise CheckpointError(
            f"{name}: a {layout.describe()} has no {to} twin: {why}. SwAV's RN50-w2/w4/w5 widen "
            "every layer; use hubconf's resnet50w2/w4/w5 (src.resnet50) instead")
    classes = num_classes or 0
    if to == "torchvision":
        import torchvision
        if arch:
            model = getattr(torchvision.models, arch)(weights=None, num_classes=classes or 1000)
            call = f"model = torchvision.models.{arch}(" + \
                (f"num_classes={classes})" if classes else ")")
        else:
            block = torchvision.models.resnet.Bottleneck if layout.block == "bottleneck" \
                else torchvision.models.resnet.BasicBlock
            model = torchvision.models.resnet.ResNet(block, list(layout.layers),
                                                     num_classes=classes or 1000,
                                                     width_per_group=layout.width_per_group)
            call = (f"model = torchvision.models.resnet.ResNet({block.__name__}, "
                    f"{list(layout.layers)}, width_per_group={layout.width_per_group}, "
                    f"num_classes={classes or 1000})")
        if not classes:
            model.fc = nn.Identity()
            call += "; model.fc = torch.nn.Identity()"
        return model, call
    try:
        import timm
        from timm.models import resnet as timm_resnet
    except ImportError:
        raise CheckpointError("--to timm needs timm: pip install timm") from None
    if arch:
        model = timm.create_model(arch, num_classes=classes)
        call = f"model = timm.create_model('{arch}', num_classes={classes}, checkpoint_path=FILE)"
    else:
        block = timm_resnet.Bottleneck if layout.block == "bottleneck" else timm_resnet.BasicBlock
        model = timm_resnet.ResNet(block, list(layout.layers), num_classes=classes,
                                   base_width=layout.width_per_group)
        call = (f"model = timm.models.resnet.ResNet(timm.models.resnet.{block.__name__}, "
                f"{list(layout.layers)}, base_width={layout.width_per_group}, "
                f"num_classes={classes}); timm.models.load_checkpoint(model, FILE)")
    return model, call


def save(state, path, to, metadata):
    tmp = f"{path}.tmp{os.getpid()}"
    if to == "torchvision":
        atomic_save(state, path)
        return
    from safetensors.torch import save_file
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_exported(model, path, to):
    """Load the written file the way a user of `to` would, strictly."""
    if to == "torchvision":
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    else:
        from timm.models import load_checkpoint
        load_checkpoint(model, path, strict=True)
    return model


@torch.no_grad()
def max_feature_difference(ours, theirs, num_features, seed=0):
    """max |ours(x) - theirs(x)| / max(1, max |ours(x)|) of the pooled features, random x."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    ours.eval()
    theirs.eval()
    a = ours(x)
    b = theirs.forward_features(x) if hasattr(theirs, "forward_head") else None
    if b is not None:  # timm: pooled features without the classifier
        b = theirs.forward_head(b, pre_logits=True)
    else:
        fc, theirs.fc = theirs.fc, nn.Identity()
        b = theirs(x)
        theirs.fc = fc
    assert a.shape == b.shape == (2, num_features), (a.shape, b.shape)
    return ((a - b).abs().max() / a.abs().max().clamp(min=1)).item()


def export(source, to, output, classifier=None, download=False, check=True):
    """Write `source`'s backbone in `to`'s format to `output`; returns the constructor call."""
    state = read_state_dict(source, download=download)
    backbone = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    layout = infer_layout(backbone, source)
    fc = None
    if classifier:
        fc = load_linear_classifier(classifier, layout.num_features, download=download)
    model, call = build_target(layout, to, fc.out_features if fc else 0, source)
    out = dict(backbone)
    if fc is not None:
        out.update({"fc.weight": fc.weight.detach(), "fc.bias": fc.bias.detach()})
    expected = set(model.state_dict())
    if set(out) != expected:  # our ResNet and the twin disagree on a name: a bug, say it plainly
        raise CheckpointError(f"{source}: key sets differ from {to}'s model: "
                              f"{sorted(set(out) ^ expected)[:3]}")
    save(out, output, to, {"format": "pt", "source": str(source),
                           "layout": json.dumps(layout._asdict())})
    load_exported(model, output, to)
    if check:
        ours = layout.our_model()
        ours.load_state_dict(backbone, strict=True)
        diff = max_feature_difference(ours, model, layout.num_features)
        if diff > 1e-4:
            raise CheckpointError(f"{output}: features differ from ours by {diff:.2e}: a bug")
        print(f"check: features of {to}'s model = ours (max relative difference {diff:.1e})")
    return call.replace("FILE", repr(output))


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=True)
    parser.add_argument("source", help="weights file, URL, or released name (e.g. swav_800ep)")
    parser.add_argument("--to", required=True, choices=["torchvision", "timm"],
                        help="torchvision: a .pth state dict; timm: a .safetensors file")
    parser.add_argument("-o", "--output", required=True, help="file to write")
    parser.add_argument("--classifier", default=None,
                        help="linear-evaluation checkpoint (path or URL) to add as fc")
    parser.add_argument("--download", action="store_true",
                        help="download URLs / released names into torch.hub's cache if missing")
    parser.add_argument("--no_check", action="store_true",
                        help="skip comparing the exported model's features with ours")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    call = export(args.source, args.to, args.output, args.classifier, args.download,
                  check=not args.no_check)
    print(f"wrote {args.output}; load it with: {call}")
    if args.to == "torchvision":
        print(f"  model.load_state_dict(torch.load({args.output!r}, weights_only=True))")
    return args.output


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")

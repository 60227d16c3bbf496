"""torch.hub entry points: the released SwAV, DeepCluster-v2 and SeLa-v2 backbones.

    model = torch.hub.load("<owner>/<repo>", "resnet50")            # SwAV, 800 epochs
    model = torch.hub.load("path/to/checkout", "resnet50", source="local", pretrained=False)

One entry per checkpoint of the original README's model zoo, named after its file
(swav_800ep, swav_400ep_bs256, deepclusterv2_800ep, selav2_400ep_2x224, swav_RN50w2_400ep, ...),
plus the original hubconf's names: resnet50 (= swav_800ep), resnet50w2/w4/w5 (the 400-epoch
wide models). `torch.hub.list` shows them all; `src.pretrained.RELEASES` has their details.

What an entry returns (unlike the original, whose `fc` was silently random, swav#74):
- ResNet-50 entries: a torchvision.models.ResNet (resnet50) whose `fc` is nn.Identity, so
  model(x) is the (N, 2048) pooled feature. classifier=True puts the released linear classifier
  in `fc` (only swav_800ep / resnet50 has one; 75.3% ImageNet top-1) and model(x) gives
  (N, 1000) logits; num_classes=C instead gives a new random `fc` to fine-tune.
- Wide entries (resnet50w2/w4/w5): SwAV widens every layer (stem 64·w channels, features
  2048·w), which no torchvision class expresses, so they return src.resnet50.ResNet: model(x) is
  the (N, 2048·w) feature (a list of crops is accepted too). With output_dim, hidden_mlp and
  nmb_prototypes as in training (128, 8192, 3000) the released projection head and prototypes
  load as well.

Keywords of every entry: pretrained=True (as the original); weights="path or URL" replaces the
released URL (a local file is never copied or downloaded); classifier=True, or a path/URL of a
linear-evaluation checkpoint (eval_linear.py's, or any torchvision `fc`); progress=True; the
rest go to the model's constructor. Downloads land in torch.hub's cache,
<TORCH_HOME>/hub/checkpoints, with the original's file names, so earlier downloads are reused.
Files are read with weights_only=True. The model is returned in train mode: call .eval().
"""
import importlib
import importlib.util
import os
import sys

import torch.nn as _nn
import torchvision as _torchvision

dependencies = ["torch", "torchvision"]


def _import_src():
    """This checkout's src.resnet50, src.pretrained and src.errors, even when another package named `src`
    was imported first (a common name: torch.hub would otherwise pick that one up)."""
    here = os.path.dirname(os.path.abspath(__file__))
    ours = os.path.join(here, "src")
    other = sys.modules.get("src")
    if other is not None and os.path.dirname(os.path.abspath(getattr(other, "__file__", None)
                                                             or "/")) != ours:
        name = "_swav_hub_src"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(
                name, os.path.join(ours, "__init__.py"), submodule_search_locations=[ours])
            sys.modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules[name])
    else:
        name = "src"
        if here not in sys.path:
            sys.path.insert(0, here)
    return (importlib.import_module(f"{name}.resnet50"),
            importlib.import_module(f"{name}.pretrained"),
            importlib.import_module(f"{name}.errors"))


_models, _pretrained, _errors = _import_src()


def _build(release_name, pretrained=True, classifier=False, weights=None, progress=True,
           **kwargs):
    release = _pretrained.RELEASES[release_name]
    if weights is not None and not pretrained:
        raise _errors.UsageError("weights= was given with pretrained=False: drop one of them")
    heads = False
    if release.arch == "resnet50":
        num_classes = kwargs.pop("num_classes", None)
        if num_classes is not None and classifier:
            raise _errors.UsageError("num_classes= (a new random fc) and classifier= exclude each other")
        model = _torchvision.models.resnet50(weights=None, **kwargs)
        model.fc = _nn.Identity() if num_classes is None else _nn.Linear(2048, num_classes)
        num_features = 2048
    else:
        model = _models.build_backbone(release.arch, **kwargs)
        num_features = model.num_features
        heads = model.projection_head is not None or model.prototypes is not None
    if pretrained:
        _pretrained.load_pretrained(model, weights or release.url, strict=True,
                                    include_heads=heads, download=True, progress=progress)
    if classifier:
        if classifier is True:
            if release.linear is None:
                raise _errors.UsageError(
                    f"no linear classifier was released for {release_name} (only for "
                    "swav_800ep / resnet50); pass classifier='path or URL' of your own "
                    "(eval_linear.py's checkpoint)")
            classifier = release.linear_url
        fc = _pretrained.load_linear_classifier(classifier, num_features, download=True,
                                                progress=progress)
        if release.arch == "resnet50":
            model.fc = fc
        elif heads:
            raise _errors.UsageError("classifier= cannot be combined with a projection head "
                             "(output_dim/hidden_mlp/nmb_prototypes)")
        else:
            model.projection_head = fc  # our ResNet applies it to the pooled features
    return model


def _entry(entry_name, release_name):
    release = _pretrained.RELEASES[release_name]

    def entry(pretrained=True, **kwargs):
        return _build(release_name, pretrained, **kwargs)

    returns = ("torchvision.models.ResNet (resnet50), fc = Identity: model(x) -> (N, 2048)"
               if release.arch == "resnet50" else
               f"src.resnet50.ResNet ({release.arch}): model(x) -> (N, "
               f"{2048 * int(release.arch[-1])})")
    linear = ("classifier=True: the released linear classifier in fc." if release.linear else
              "No linear classifier was released (classifier='path or URL' loads your own).")
    entry.__name__ = entry.__qualname__ = entry_name
    entry.__doc__ = (
        f"{release.method} {release.arch}, {release.epochs} epochs, batch "
        f"{release.batch_size or '?'}, crops {release.crops}: {release.top1}% ImageNet top-1 "
        "(linear, frozen features).\n\n"
        f"Returns {returns}. {linear}\nWeights: {release.url}\n"
        "Keywords: pretrained=True, weights='path or URL', classifier=False, progress=True, "
        "and the model constructor's.")
    return entry


for _name in _pretrained.RELEASES:
    globals()[_name] = _entry(_name, _name)
for _name, _release_name in _pretrained.HUB_ALIASES.items():
    globals()[_name] = _entry(_name, _release_name)
del _name, _release_name

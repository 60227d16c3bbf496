"""Pretrained weights: the released checkpoints, and loading a backbone from any format, safely.

Formats read: our training checkpoints ({"state_dict": {"module.…"}}), the original's released
flat `module.`-prefixed files (which also hold projection_head / prototypes keys), plain
torchvision and timm ResNet state dicts (same parameter names as ours: the stem's ConstantPad2d
has no parameters), {"model": …}/{"teacher": …}-style wrappers, and safetensors files. Only
backbone keys are loaded; head keys are ignored. Pickles are read with weights_only=True
(src.checkpoint.safe_load) and safetensors hold no code, so no file can run code when loaded.

A source is a file path, a URL, or a released name ("swav_800ep"). A URL is looked up in the
torch.hub cache (<TORCH_HOME>/hub/checkpoints, where torch.hub and the original hubconf.py put
the same files) and downloaded only when asked (download=True, as the hub entries do).
"""
import logging
import os
import urllib.error
import urllib.parse
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, check_finite_state, safe_load

logger = logging.getLogger()

HEAD_PREFIXES = ("projection_head.", "prototypes.", "fc.", "linear.", "head.", "predictor.",
                 "projector.")
WRAPPER_KEYS = ("state_dict", "model", "teacher", "student", "backbone")
RELEASE_URL = "https://dl.fbaipublicfiles.com/deepcluster/"
# above this share of the backbone's tensors missing or mis-shaped in the file, an evaluation
# would mostly measure a random initialisation: refused unless allow_missing=True
MAX_MISSING_FRACTION = 0.05


class Release(NamedTuple):
    """One checkpoint of the original README's model zoo (top1: its ImageNet linear top-1)."""
    arch: str
    method: str
    epochs: int
    batch_size: Optional[int]
    crops: str
    top1: float
    file: str
    linear: Optional[str] = None  # the released linear classifier on top of it, if any

    @property
    def url(self):
        return RELEASE_URL + self.file

    @property
    def linear_url(self):
        return RELEASE_URL + self.linear if self.linear else None


def _release(arch, method, epochs, batch_size, crops, top1, name, linear=None):
    return Release(arch, method, epochs, batch_size, crops, top1, name + "_pretrain.pth.tar",
                   linear)


RELEASES = {r.file[:-len("_pretrain.pth.tar")]: r for r in [
    _release("resnet50", "SwAV", 800, 4096, "2x224+6x96", 75.3, "swav_800ep",
             "swav_800ep_eval_linear.pth.tar"),
    _release("resnet50", "SwAV", 400, 4096, "2x224+6x96", 74.6, "swav_400ep"),
    _release("resnet50", "SwAV", 200, 4096, "2x224+6x96", 73.9, "swav_200ep"),
    _release("resnet50", "SwAV", 100, 4096, "2x224+6x96", 72.1, "swav_100ep"),
    _release("resnet50", "SwAV", 200, 256, "2x224+6x96", 72.7, "swav_200ep_bs256"),
    _release("resnet50", "SwAV", 400, 256, "2x224+6x96", 74.3, "swav_400ep_bs256"),
    _release("resnet50", "SwAV", 400, 4096, "2x224", 70.1, "swav_400ep_2x224"),
    _release("resnet50", "DeepCluster-v2", 800, 4096, "2x224+6x96", 75.2, "deepclusterv2_800ep"),
    _release("resnet50", "DeepCluster-v2", 400, 4096, "2x160+4x96", 74.3, "deepclusterv2_400ep"),
    _release("resnet50", "DeepCluster-v2", 400, 4096, "2x224", 70.2, "deepclusterv2_400ep_2x224"),
    _release("resnet50", "SeLa-v2", 400, 4096, "2x160+4x96", 71.8, "selav2_400ep"),
    _release("resnet50", "SeLa-v2", 400, 4096, "2x224", 67.2, "selav2_400ep_2x224"),
    _release("resnet50w2", "SwAV", 400, 4096, "2x224+4x96", 77.3, "swav_RN50w2_400ep"),
    _release("resnet50w4", "SwAV", 400, 2560, "2x224+4x96", 77.9, "swav_RN50w4_400ep"),
    _release("resnet50w5", "SwAV", 400, None, "-", 78.5, "swav_RN50w5_400ep"),
]}
# the original hubconf.py's entry names
HUB_ALIASES = {"resnet50": "swav_800ep", "resnet50w2": "swav_RN50w2_400ep",
               "resnet50w4": "swav_RN50w4_400ep", "resnet50w5": "swav_RN50w5_400ep"}


# ----------------------------------------------------------------------------- finding the file
def is_url(source):
    return urllib.parse.urlparse(str(source)).scheme in ("http", "https", "file")


def default_cache_dir():
    """torch.hub's checkpoint cache: honours TORCH_HOME (and torch.hub.set_dir)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _resolve(source, download, cache_dir, progress):
    """(local path, whether it was just downloaded) for a path, URL or released name."""
    source = os.fsdecode(source)
    if os.path.exists(source) or not (is_url(source) or source in RELEASES):
        if not os.path.isfile(source):
            raise CheckpointError(f"{source}: no such file")
        return source, False
    url = RELEASES[source].url if source in RELEASES else source
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    if not filename:
        raise CheckpointError(f"{url}: the URL names no file")
    cache_dir = cache_dir or default_cache_dir()
    cached = os.path.join(cache_dir, filename)
    if os.path.isfile(cached):
        return cached, False
    if not download:
        raise CheckpointError(f"{url}: not downloaded (looked for {cached}); pass download=True "
                              "(--download) to fetch it, or give the path of a local copy")
    os.makedirs(cache_dir, exist_ok=True)
    logger.info(f"Downloading {url} to {cached}")
    try:
        # writes to a temporary file and renames it: an interrupted download leaves no file
        torch.hub.download_url_to_file(url, cached, progress=progress)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise CheckpointError(f"{url}: download failed ({e})") from None
    return cached, True


def resolve_weights(source, download=False, cache_dir=None, progress=True):
    """The local file for `source`: a path, a URL or a released name such as "swav_800ep"."""
    return _resolve(source, download, cache_dir, progress)[0]


def _is_safetensors(path):
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    # the format: an 8-byte little-endian header length, then the header, a JSON object
    return len(head) == 9 and head[8:9] == b"{" and \
        0 < int.from_bytes(head[:8], "little") <= os.path.getsize(path) - 8


def _load_file(path):
    if not _is_safetensors(path):
        return safe_load(path)
    from safetensors.torch import load_file
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # header or data cut short, bad JSON, ...
        reason = str(e).strip().splitlines()[0][:150] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({reason})") from None


def read_state_dict(source, download=False, cache_dir=None, progress=True):
    """The flat tensor dict of a weights file (any format above), wrapper prefixes removed."""
    path, fresh = _resolve(source, download, cache_dir, progress)
    try:
        return extract_state_dict(_load_file(path), path)
    except CheckpointError as e:
        if not fresh:
            raise
        os.remove(path)  # do not keep a bad download in the cache
        raise CheckpointError(f"{e} [downloaded from {source}; removed from the cache]") from None


# ----------------------------------------------------------------------------- reading it
def _strip(key):
    for prefix in ("module.", "backbone.", "encoder."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _has_tensors(obj):
    return isinstance(obj, dict) and any(isinstance(v, torch.Tensor) for v in obj.values())


def extract_state_dict(obj, path="<state dict>"):
    """The flat tensor dict inside a loaded file, with wrapper prefixes removed."""
    for _ in range(3):
        if not isinstance(obj, dict):
            break
        # a wrapper's tensors win over stray top-level ones (e.g. a metric saved as a tensor)
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None or (_has_tensors(obj) and not _has_tensors(inner)):
            break
        obj = inner
    if not _has_tensors(obj):
        found = type(obj).__name__ if not isinstance(obj, dict) else \
            f"a dict with keys {sorted(map(str, obj))[:5]}"
        raise CheckpointError(f"{path}: holds no state dict (expected a dict of tensors, found "
                              f"{found})")
    return {_strip(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def backbone_keys(model):
    return {k for k in model.state_dict() if not k.startswith(HEAD_PREFIXES)}


def _is_stat(key):
    return key.endswith("num_batches_tracked")


def load_pretrained(model, path_or_state, path=None, *, strict=False, include_heads=False,
                    allow_missing=False, download=False, cache_dir=None, progress=True):
    """Load the backbone weights of `path_or_state` (a path, URL, released name, or a state
    dict) into `model` (ours, or a torchvision/timm ResNet).

    Head keys (projection head, prototypes, fc, ...) are ignored unless `include_heads`. Logs
    missing, unexpected and mis-shaped keys (one summary line each); raises CheckpointError when
    the file is of another architecture (fewer than half of the model's tensors fit), when more
    than MAX_MISSING_FRACTION of the backbone's tensors are missing or mis-shaped (unless
    `allow_missing`), when a tensor to load holds NaN/inf (NonFiniteStateError), and with
    `strict` on any missing, unexpected or mis-shaped key. A URL is downloaded only with `download=True`. Returns a dict
    with the lists `loaded`, `missing`, `mismatched`, `unexpected`.
    """
    if isinstance(path_or_state, (str, bytes)) or hasattr(path_or_state, "__fspath__"):
        path = os.fsdecode(path_or_state)
        state = read_state_dict(path, download=download, cache_dir=cache_dir, progress=progress)
    else:
        path = path or "<state dict>"
        state = extract_state_dict(path_or_state, path)
    own = model.state_dict()
    wanted = set(own) if include_heads else backbone_keys(model)
    loaded, mismatched = [], []
    for k in sorted(wanted & set(state)):
        if tuple(state[k].shape) == tuple(own[k].shape):
            loaded.append(k)
        else:
            mismatched.append(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
    missing = [k for k in sorted(wanted - set(state)) if not _is_stat(k)]
    ignored = () if include_heads else HEAD_PREFIXES
    unexpected = sorted(k for k in set(state) - set(own)
                        if not _is_stat(k) and not (ignored and k.startswith(ignored)))

    # mostly not fitting, on either side, means another architecture, not a few odd keys
    n_model = sum(not _is_stat(k) for k in wanted)
    n_file = sum(not _is_stat(k) and not (ignored and k.startswith(ignored)) for k in state)
    n_fit = sum(not _is_stat(k) for k in loaded)
    if n_fit == 0 or 2 * n_fit < max(n_model, n_file):
        example = f", e.g. {mismatched[0]}" if mismatched else ""
        raise CheckpointError(
            f"{path}: weights of another architecture: {n_fit} tensors fit, of {n_model} in the "
            f"model and {n_file} in the file ({len(mismatched)} of another shape{example}; "
            f"{len(missing)} missing; {len(unexpected)} unexpected): wrong --arch, or not a "
            "ResNet checkpoint?")
    if strict and (missing or mismatched or unexpected):
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing", missing), ("of another shape", mismatched),
                  ("unexpected", unexpected)) if v]
        raise CheckpointError(f"{path}: does not match the model exactly: " + "; ".join(parts))
    not_loaded = len(missing) + len(mismatched)
    if not allow_missing and not_loaded > MAX_MISSING_FRACTION * n_model:
        example = (missing or mismatched)[0]
        raise CheckpointError(
            f"{path}: {not_loaded} of the backbone's {n_model} tensors would stay at their random "
            f"initialisation ({len(missing)} missing, {len(mismatched)} of another shape, e.g. "
            f"{example}): more than {MAX_MISSING_FRACTION:.0%}, refused (an evaluation's "
            "--allow_missing_keys true loads it anyway)")
    check_finite_state({k: state[k] for k in loaded}, path)
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    if missing:
        logger.warning(f"{path}: {len(missing)} key(s) missing, left at their initial values "
                       f"(e.g. {', '.join(missing[:3])})")
    if mismatched:
        logger.warning(f"{path}: {len(mismatched)} key(s) of another shape, not loaded "
                       f"(e.g. {mismatched[0]})")
    if unexpected:
        logger.warning(f"{path}: {len(unexpected)} keys the model does not have, ignored "
                       f"(e.g. {unexpected[0]})")
    logger.info(f"Loaded {len(loaded)} tensors from {path} ({len(missing)} missing, "
                f"{len(mismatched)} mis-shaped, {len(unexpected)} unexpected)")
    return {"loaded": loaded, "missing": missing, "mismatched": mismatched,
            "unexpected": unexpected}


def load_linear_classifier(source, in_features, download=False, cache_dir=None, progress=True):
    """An nn.Linear from a linear-evaluation checkpoint: eval_linear.py's (`linear.` keys, as in
    the released swav_800ep_eval_linear.pth.tar) or a torchvision/timm `fc`."""
    state = read_state_dict(source, download=download, cache_dir=cache_dir, progress=progress)
    name = os.fsdecode(source)
    for prefix in ("linear.", "fc.", "head.fc.", ""):
        weight, bias = state.get(prefix + "weight"), state.get(prefix + "bias")
        if weight is not None and bias is not None and weight.ndim == 2:
            break
    else:
        raise CheckpointError(f"{name}: holds no linear classifier (no linear.weight/bias or "
                              "fc.weight/bias)")
    if any(k.startswith("bn.") for k in state):
        raise CheckpointError(f"{name}: this classifier has a BatchNorm before its linear layer "
                              "(eval_linear.py --use_bn true): it is not a plain fc layer")
    if weight.shape[1] != in_features:
        raise CheckpointError(
            f"{name}: the classifier takes {weight.shape[1]} features but the backbone gives "
            f"{in_features} (trained without global pooling, or for another --arch?)")
    fc = nn.Linear(in_features, weight.shape[0])
    fc.load_state_dict({"weight": weight, "bias": bias})
    return fc

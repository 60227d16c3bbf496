"""SimSiam (Chen & He, CVPR 2021): heads, loss, collapse monitor and the two-view dataset
(its augmentation: src/transforms.py simsiam_transform).

Same math as facebookresearch/simsiam (simsiam/builder.py, main_simsiam.py). The model keeps the
ResNet under `backbone.` and the heads under `projector.`/`predictor.`, so `load_pretrained`
takes a SimSiam checkpoint's backbone like a SwAV one (it strips `module.`/`backbone.` and
ignores head keys).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UsageError
from .multicropdataset import CropsDataset
from .transforms import simsiam_spec, simsiam_transform  # (importable from here as before)

# warn when the collapse metric falls below this fraction of its no-collapse value 1/sqrt(d)
COLLAPSE_WARN_RATIO = 0.5


def projection_mlp(in_dim, hidden_dim, dim):
    """3 layers with BN; the last BN has no affine, so the output is whitened per dimension.

    The original keeps a bias on the last Linear and freezes it (`requires_grad=False`): the BN
    that follows subtracts it anyway, so here the Linear has no bias (same outputs)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, dim, bias=False), nn.BatchNorm1d(dim, affine=False),
    )


def prediction_mlp(dim, pred_dim):
    """2-layer bottleneck: dim -> pred_dim (BN, ReLU) -> dim."""
    return nn.Sequential(
        nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
        nn.Linear(pred_dim, dim),
    )


class SimSiam(nn.Module):
    """backbone (a ResNet without SwAV head) -> projector -> predictor.

    forward(x1, x2) returns (p1, p2, z1, z2); the loss applies the stop-gradient to z."""

    def __init__(self, backbone, dim=2048, pred_dim=512, proj_hidden_dim=0):
        super().__init__()
        if getattr(backbone, "projection_head", None) is not None or \
                getattr(backbone, "prototypes", None) is not None:
            raise UsageError("SimSiam needs a bare backbone (output_dim=0, nmb_prototypes=0)")
        self.backbone = backbone
        in_dim = backbone.num_features
        # the original's hidden width is the backbone's feature width (2048 for a ResNet-50)
        self.projector = projection_mlp(in_dim, proj_hidden_dim or in_dim, dim)
        self.predictor = prediction_mlp(dim, pred_dim)

    def forward(self, x1, x2):
        # one backbone pass per view, as the original: BN statistics are per view
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        return self.predictor(z1), self.predictor(z2), z1, z2


def simsiam_loss(p1, p2, z1, z2):
    """Symmetric negative cosine similarity with stop-gradient on the targets; in [-1, 1]."""
    return -0.5 * (_cosine_to_target(p1, z2) + _cosine_to_target(p2, z1))


def _cosine_to_target(p, z):
    # z.detach(): the stop-gradient that keeps SimSiam from collapsing
    return F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()


@torch.no_grad()
def normalized_std(z):
    """Collapse metric (paper, Fig. 2): mean over dimensions of the per-dimension std of the
    L2-normalised outputs. About 1/sqrt(d) for well spread outputs, 0 for collapsed ones."""
    return normalized_std_tensor(z).item()


def normalized_std_tensor(z):
    """normalized_std as a 0-d tensor on z's device (not read: no host sync)."""
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


def no_collapse_std(dim):
    return 1.0 / math.sqrt(dim)


def optimizer_groups(model, fix_pred_lr):
    """Parameters for SGD. With fix_pred_lr the predictor is a group marked `fix_lr`, which
    `step.set_lr` (src/step.py) leaves at its initial rate."""
    net = model.module if hasattr(model, "module") else model
    if not fix_pred_lr:
        return [{"params": list(net.parameters()), "fix_lr": False}]
    pred = {id(p) for p in net.predictor.parameters()}
    return [{"params": [p for p in net.parameters() if id(p) not in pred], "fix_lr": False},
            {"params": list(net.predictor.parameters()), "fix_lr": True}]


def simsiam_lr_schedule(init_lr, epochs, niter_per_ep):
    """The original's per-epoch cosine decay (no warm-up, to 0), as a per-iteration array:
    every iteration of epoch e uses init_lr * 0.5 * (1 + cos(pi * e / epochs))."""
    per_epoch = [init_lr * 0.5 * (1.0 + math.cos(math.pi * e / epochs)) for e in range(epochs)]
    return [lr for lr in per_epoch for _ in range(niter_per_ep)]


class TwoViewDataset(CropsDataset):
    """Two SimSiam views per image (src/transforms.py simsiam_transform). The multi-crop
    dataset's image loading (any layout of images, bad files skipped) and its per-sample seeding
    under a SeededSampler (exact resume); only the transform differs."""

    def __init__(self, data_path, size=224, min_scale=0.2, max_scale=1.0, blur="pil",
                 strict_data=False, augment="fast"):
        t = simsiam_transform(size, min_scale, max_scale, blur, augment)
        super().__init__(data_path, [t, t], strict_data=strict_data)
        self.crop_specs = [simsiam_spec(size, min_scale, max_scale, blur)] * 2  # (src/dali.py)

"""Clusters of a folder of images from a pre-trained network (assign_clusters.py).

- the network: a backbone, plus the projection head and prototypes when the weights file has
  them (SwAV: one set; DeepCluster-v2: several heads), their shapes read from the file;
- assignments, each with a confidence:
  - argmax: each image to its nearest prototype. As in training, the pooled feature goes through
    the projection head and is L2-normalised, the prototypes are L2-normalised (main_swav.py
    normalises them before each forward; DeepCluster-v2's are normalised centroids), and the
    score is their dot product. Confidence: the softmax of scores / the training temperature;
  - balanced: Sinkhorn-Knopp (src/sinkhorn.py) over the whole set of scores with the training
    epsilon, then argmax: near-equal cluster sizes. Confidence: the Sinkhorn probability (each
    image's row of Q sums to 1);
  - --prototype_groups K (argmax, balanced): the prototypes grouped into K clusters by
    k-means on their vectors, each weighted by the images it holds; an image goes to its
    prototype's group and keeps its prototype's confidence;
  - kmeans: spherical k-means (src/kmeans.py) on the L2-normalised pooled backbone features.
    Confidence: the cosine to the image's centroid;
- metrics against known labels (scikit-learn), the CSV, and contact sheets.
Under torchrun every rank holds all features (gathered by evaluation.extract_features), scores
its shard, and the Sinkhorn / k-means sums are all-reduced over the shards, so the result is the
one of a single process.
"""
import csv
import json
import logging
import math
import os
import re
import time
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

from . import distributed as du
from .checkpoint import safe_load
from .errors import UsageError
from .imagelist import DataError
from .kmeans import spherical_kmeans
from .pretrained import extract_state_dict, load_pretrained, read_state_dict, resolve_weights
from .resnet50 import MultiPrototypes, build_backbone
from .sinkhorn import distributed_sinkhorn

logger = logging.getLogger()

MODES = ("argmax", "balanced", "kmeans")
MULTI_PROTOTYPES_KEY = re.compile(r"prototypes\.prototypes(\d+)\.weight")


# ----------------------------------------------------------------------------- data
class ImageListDataset(torch.utils.data.Dataset):
    """(image, label or -1) for each path of a src.imagelist.ImageList. Every image must get a
    row, so an unreadable one stops the run with its name instead of being skipped."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        path = self.images.paths[index]
        try:
            with open(path, "rb") as f:
                image = Image.open(f).convert("RGB")
        except Exception as e:
            raise DataError(f"unreadable image {path}: {e}") from None
        label = -1 if self.images.labels is None else self.images.labels[index]
        return self.transform(image), label


# ----------------------------------------------------------------------------- the network
def read_weights(source):
    """(state dict, training flags) of a weights file of any format src/pretrained.py reads;
    the flags are our checkpoints' "args" ({} for other files), read in the same single load."""
    path = resolve_weights(source)
    obj = safe_load(path) if zipfile.is_zipfile(path) else None  # torch.save's format
    if obj is None:  # safetensors or an old-style pickle: no flags in them
        return read_state_dict(path), {}
    flags = obj.get("args") if isinstance(obj, dict) else None
    return extract_state_dict(obj, path), flags if isinstance(flags, dict) else {}


def head_config(state):
    """build_backbone keywords for the projection head and prototypes found in a state dict
    (keys without the `module.` prefix), or None when it has no prototypes."""
    if "prototypes.weight" in state:  # SwAV: one nn.Linear
        nmb_prototypes, output_dim = state["prototypes.weight"].shape
    else:  # DeepCluster-v2: MultiPrototypes, prototypes.prototypes{i}
        heads = {int(m.group(1)): v.shape for k, v in state.items()
                 if (m := MULTI_PROTOTYPES_KEY.fullmatch(k))}
        if not heads:
            return None
        nmb_prototypes = [heads[i][0] for i in sorted(heads)]
        output_dim = heads[min(heads)][1]
    hidden = state.get("projection_head.0.weight")  # Linear, BN, ReLU, Linear; else one Linear
    return {"output_dim": int(output_dim), "nmb_prototypes": nmb_prototypes,
            "hidden_mlp": 0 if hidden is None else int(hidden.shape[0])}


def build_network(args):
    """(ResNet in eval mode, training flags): the backbone's forward gives pooled features;
    with the file's projection head and prototypes when it has them (`.prototypes` is None
    otherwise)."""
    state, flags = read_weights(args.pretrained) if args.pretrained else ({}, {})
    heads = head_config(state) or {}
    net = build_backbone(args.arch, normalize=bool(heads), eval_mode=False,
                         cifar_stem=args.cifar_stem, width=args.width or None, **heads)
    if not args.pretrained:
        logger.warning("no --pretrained given: clustering with a randomly initialised backbone")
    else:
        load_pretrained(net, state, args.pretrained, include_heads=bool(heads),
                        allow_missing=args.allow_missing_keys)
    if heads:
        dims = [net.num_features, heads["hidden_mlp"], heads["output_dim"]]
        logger.info(f"{args.pretrained}: projection head "
                    f"{' -> '.join(str(d) for d in dims if d)}, prototypes "
                    f"{heads['nmb_prototypes']}")
    net = net.to(args.device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, flags


def prototype_weights(net, head):
    """The L2-normalised prototypes of head `head` (K x D), as training scores with them."""
    multi = isinstance(net.prototypes, MultiPrototypes)  # DeepCluster-v2: one per head
    n = net.prototypes.nmb_heads if multi else 1
    if not 0 <= head < n:
        raise UsageError(f"--head {head} out of range: the checkpoint has {n} prototype "
                         f"head(s) (0..{n - 1})")
    layer = getattr(net.prototypes, f"prototypes{head}") if multi else net.prototypes
    return F.normalize(layer.weight.float(), dim=1, p=2)


class FeatureProgress(nn.Module):
    """The backbone's pooled features, logging progress and ETA every `log_freq` batches on rank
    0 (evaluation.extract_features calls it once per batch and logs nothing itself)."""

    def __init__(self, net, nmb_batches, log_freq=50):
        super().__init__()
        self.net, self.nmb_batches, self.log_freq = net, nmb_batches, max(log_freq, 1)
        self.done, self.start = 0, time.time()

    def forward(self, x):
        out = self.net.forward_backbone(x)
        self.done += 1
        if du.get_rank() == 0 and (self.done % self.log_freq == 0 or
                                   self.done == self.nmb_batches):
            elapsed = time.time() - self.start
            eta = elapsed / self.done * max(self.nmb_batches - self.done, 0)
            logger.info(f"features: batch [{self.done}/{self.nmb_batches}]\t"
                        f"{elapsed / self.done:.3f}s/batch\tETA {eta:.0f}s")
        return out


@torch.no_grad()
def prototype_scores(net, feats, prototypes, chunk=4096):
    """Scores z . c of pooled features: projection head, L2-normalised, against the normalised
    prototypes (the training forward, in fp32, by chunks on the prototypes' device)."""
    scores = []
    for part in feats.split(chunk):
        z = part.to(prototypes.device)
        if net.projection_head is not None:
            z = net.projection_head(z)
        scores.append((F.normalize(z.float(), dim=1, p=2) @ prototypes.t()).cpu())
    return torch.cat(scores) if scores else feats.new_zeros(0, len(prototypes))


# ----------------------------------------------------------------------------- assignments
def assign_argmax(scores, temperature):
    """(cluster, softmax probability) of each row's highest score."""
    conf, cluster = F.softmax(scores.float() / temperature, dim=1).max(dim=1)
    return cluster, conf


def assign_balanced(scores, epsilon, sinkhorn_iterations):
    """(cluster, Sinkhorn probability): the argmax of Q, equipartitioned over the union of every
    rank's rows (all ranks call)."""
    conf, cluster = distributed_sinkhorn(scores, epsilon, sinkhorn_iterations).max(dim=1)
    return cluster, conf


def kmeans_plus_plus(feats, K, generator):
    """K rows of the unit-norm `feats` chosen by k-means++ (Arthur & Vassilvitskii, 2007): each
    next row drawn with probability proportional to its squared distance 2 - 2 cos to the nearest
    row chosen so far. Uniformly drawn rows (the DC-v2 training's init, src/kmeans.py) often put
    two centroids in one tight group and none in another, and 10 Lloyd iterations rarely undo it."""
    chosen = [int(torch.randint(len(feats), (1,), generator=generator))]
    dist = (2 - 2 * feats @ feats[chosen[0]]).clamp_(min=0)
    for _ in range(K - 1):
        if dist.sum() <= 0:  # fewer distinct rows than K: any remaining row
            weights = torch.ones(len(feats)).index_fill_(0, torch.tensor(chosen), 0)
        else:
            weights = dist
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        dist = torch.minimum(dist, (2 - 2 * feats @ feats[chosen[-1]]).clamp_(min=0))
    return feats[chosen]


def assign_kmeans(all_feats, local_index, K, nmb_iters, seed, device):
    """(cluster, cosine to its centroid) of the rows `local_index` of `all_feats` (the same on
    every rank): spherical k-means on the L2-normalised features, initialised by k-means++ on the
    whole set with a seeded generator, so any number of ranks starts from the same centroids
    (all ranks call)."""
    if not 1 <= K <= len(all_feats):
        raise UsageError(f"--nmb_clusters {K}: k-means needs 1 <= K <= the {len(all_feats)} "
                         "images")
    feats = F.normalize(all_feats.float(), dim=1, p=2)
    init = kmeans_plus_plus(feats, K, torch.Generator().manual_seed(seed))
    local = feats[local_index].to(device)
    centroids, cluster, _ = spherical_kmeans(local, K, nmb_iters, centroids=init.to(device))
    return cluster.cpu(), (local * centroids[cluster]).sum(dim=1).cpu()


def group_prototypes(prototypes, cluster, K, seed):
    """The group (0..K-1) of each of the normalised `prototypes` (-1 for one no image chose),
    from the images' prototypes `cluster`: scikit-learn k-means (10 k-means++ starts, `seed`) on
    the prototypes that hold images, each weighted by how many. The prototypes are finer than
    the classes (SwAV trains more of them than there are classes); grouping them gives K
    clusters without training again."""
    from sklearn.cluster import KMeans
    counts = np.bincount(cluster, minlength=len(prototypes))
    used = np.flatnonzero(counts)
    if not 1 <= K <= len(used):
        raise UsageError(f"--prototype_groups {K}: needs 1 <= K <= the {len(used)} prototypes "
                         "that hold images")
    groups = np.full(len(prototypes), -1)
    groups[used] = KMeans(n_clusters=K, n_init=10, random_state=seed).fit_predict(
        prototypes[used].double().numpy(), sample_weight=counts[used])
    return groups


def cluster_metrics(labels, clusters):
    """NMI, ARI and purity (each cluster counted as its majority class) from scikit-learn."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    from sklearn.metrics.cluster import contingency_matrix
    table = contingency_matrix(labels, clusters)
    return {"nmi": float(normalized_mutual_info_score(labels, clusters)),
            "ari": float(adjusted_rand_score(labels, clusters)),
            "purity": float(table.max(axis=0).sum() / table.sum())}


# ----------------------------------------------------------------------------- files
def write_assignments(file, images, clusters, confidence):
    """path,cluster,confidence(,label): one row per image in the order found."""
    with open(file, "w", newline="") as f:
        out = csv.writer(f)
        labelled = images.labels is not None
        out.writerow(["path", "cluster", "confidence"] + (["label"] if labelled else []))
        for i, path in enumerate(images.paths):
            row = [path, int(clusters[i]), f"{float(confidence[i]):.6f}"]
            out.writerow(row + ([images.classes[images.labels[i]]] if labelled else []))


def write_json(file, obj):
    """One key a line, each value compact (the sizes of 3000 clusters stay one line)."""
    with open(file, "w") as f:
        f.write("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in obj.items())
                + "\n}\n")


def save_features(dump_path, feats, paths):
    """features.npy (pooled backbone features, N x D float32) and features_paths.txt (its rows)."""
    np.save(os.path.join(dump_path, "features.npy"), feats.float().numpy())
    with open(os.path.join(dump_path, "features_paths.txt"), "w") as f:
        f.writelines(p + "\n" for p in paths)


def thumbnail(path, size):
    try:
        with Image.open(path) as image:
            return ImageOps.fit(image.convert("RGB"), (size, size))
    except Exception as e:  # it was readable for the features a moment ago
        logger.warning(f"contact sheet: cannot read {path} ({e})")
        return Image.new("RGB", (size, size), (128, 128, 128))


def grid(thumbs, cols, size, pad=2):
    rows = max(1, math.ceil(len(thumbs) / cols))
    sheet = Image.new("RGB", (cols * (size + pad) + pad, rows * (size + pad) + pad), "white")
    for i, t in enumerate(thumbs):
        sheet.paste(t, (pad + (i % cols) * (size + pad), pad + (i // cols) * (size + pad)))
    return sheet


def members_by_confidence(clusters, confidence):
    """{cluster: its image indices, most confident first} for each non-empty cluster."""
    order = np.lexsort((-np.asarray(confidence, dtype=np.float64), np.asarray(clusters)))
    members = {}
    for i in order:
        members.setdefault(int(clusters[i]), []).append(int(i))
    return members


def contact_sheets(folder, paths, clusters, confidence, nmb_clusters, per_sheet=36, size=96,
                   overview_clusters=20, overview_images=10):
    """folder/sheets/cluster_KKK_nSIZE.png per non-empty cluster (its `per_sheet` most
    confident images, in a grid) and folder/overview.png (a row of the `overview_images` most
    confident images of each of the `overview_clusters` largest clusters). Returns the paths."""
    os.makedirs(os.path.join(folder, "sheets"), exist_ok=True)
    digits = max(3, len(str(nmb_clusters - 1)))
    members = members_by_confidence(clusters, confidence)
    written, rows = [], []
    largest = sorted(members, key=lambda k: (-len(members[k]), k))[:overview_clusters]
    for k, idx in sorted(members.items()):
        thumbs = [thumbnail(paths[i], size) for i in idx[:per_sheet]]
        name = os.path.join(folder, "sheets", f"cluster_{k:0{digits}d}_n{len(idx)}.png")
        grid(thumbs, math.ceil(math.sqrt(len(thumbs))), size).save(name)
        written.append(name)
        if k in largest:
            rows.append((k, len(idx), thumbs[:overview_images]))
    # overview: the largest clusters first, each row labelled with its cluster and size
    rows.sort(key=lambda r: (-r[1], r[0]))
    label_w, pad = 90, 2
    overview = Image.new("RGB", (label_w + overview_images * (size + pad) + pad,
                                 max(1, len(rows)) * (size + pad) + pad), "white")
    draw = ImageDraw.Draw(overview)
    for r, (k, n, thumbs) in enumerate(rows):
        top = pad + r * (size + pad)
        draw.text((4, top + size // 2 - 10), f"cluster {k}\nn={n}", fill="black")
        for j, t in enumerate(thumbs):
            overview.paste(t, (label_w + pad + j * (size + pad), top))
    overview.save(os.path.join(folder, "overview.png"))
    written.append(os.path.join(folder, "overview.png"))
    return written

"""What the evaluations (eval_linear, eval_semisup, eval_knn) share.

- data: the original's eval transforms (sizes as flags), `train/` + `val/` ImageFolders checked
  for bad input, val labelled with train's class indices;
- a frozen backbone: a ResNet in eval mode with --pretrained loaded, or raw pixels
  (`--arch pixels`, a baseline);
- sharded validation and feature extraction where each image is counted exactly once, metrics
  all-reduced and features gathered across ranks;
- one supervised training epoch (cross-entropy, top-1/top-5) used by the linear probe and the
  fine-tuning;
- the evaluations' own checkpoint/stats names, so they can share a pre-training dump_path.

What one evaluation alone uses lives beside it: the linear head RegLog in eval_linear.py, the
k-NN classifier in src/knn.py, the labelled subsets in src/subsets.py (those two importable from
here as before).
"""
import logging
import os
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as transforms

from . import distributed as du
from .amp import autocast, make_scaler, resolve_amp, scaler_entry, scaler_to_restore
from .checkpoint import (CheckpointError, NonFiniteStateError, atomic_save, check_finite_features,
                         check_resume_flags, model_state_dict, recorded_flags,
                         restart_from_checkpoint, truncate_stats)
from .cli import add_tf32_arg
from .engine import configure_backends
from .errors import UsageError
from .imagelist import DataError, ImageList, find_images, require_labels
from .knn import knn_classify, merge_topk  # noqa: F401  (the old import path)
from .multicropdataset import SafeImageFolder
from .pretrained import load_pretrained
from .resnet50 import ARCHS, build_backbone
from .subsets import read_subset_file, stratified_subset  # noqa: F401  (the old import path)
from .tensorboard import TensorBoard
from .transforms import MEAN, STD
from .utils import AverageMeter, accuracy, bool_flag, fix_random_seeds, initialize_exp

logger = logging.getLogger()

PIXELS = "pixels"


# ----------------------------------------------------------------------------- flags
def add_eval_model_args(parser, pixels=True):
    """--arch (+ `pixels`), --pretrained, --cifar_stem, --width."""
    choices = sorted(ARCHS) + ([PIXELS] if pixels else [])
    parser.add_argument("--arch", default="resnet50", type=str, choices=choices,
                        help="convnet architecture" + (" (pixels: raw-pixel baseline)" if pixels else ""))
    parser.add_argument("--pretrained", default="", type=str,
                        help="path to pretrained weights (ours, the released files, torchvision); "
                             "empty: random weights")
    parser.add_argument("--cifar_stem", type=bool_flag, default=False,
                        help="small images: 3x3 stride-1 stem conv and no max-pool")
    parser.add_argument("--width", type=int, default=0,
                        help="stem width of the backbone (0: the arch's default, 64 x widen)")
    parser.add_argument("--allow_missing_keys", type=bool_flag, default=False,
                        help="evaluate weights that leave more than 5%% of the backbone's tensors "
                             "at their random initialisation (refused by default)")
    return parser


def add_eval_data_args(parser, train_crop=True):
    """Image sizes (the original's 224/256/224 by default) so small images can be evaluated."""
    if train_crop:
        parser.add_argument("--train_crop", type=int, default=224,
                            help="RandomResizedCrop size for training images")
        parser.add_argument("--train_min_scale", type=float, default=0.08,
                            help="smallest RandomResizedCrop scale (torchvision's default)")
    parser.add_argument("--resize", type=int, default=256,
                        help="validation images are resized to this (shorter side) ...")
    parser.add_argument("--center_crop", type=int, default=224, help="... then centre-cropped")
    return parser


def add_eval_run_args(parser, log_freq=50):
    """Device, precision of frozen forwards, memory format, TF32, TensorBoard, log frequency."""
    parser.add_argument("--device", type=str, default="auto",
                        help="auto (CUDA when available), cuda or cpu")
    parser.add_argument("--channels_last", type=bool_flag, default=True,
                        help="NHWC memory format for the convolutions (faster; same math)")
    add_tf32_arg(parser)
    parser.add_argument("--use_fp16", type=bool_flag, default=False,
                        help="mixed precision for the forward passes (fp16 on CUDA, bf16 on a CPU "
                             "with native bf16)")
    parser.add_argument("--amp_dtype", type=str, default="auto",
                        choices=["auto", "float16", "bfloat16"], help="autocast dtype under --use_fp16")
    parser.add_argument("--tensorboard", type=bool_flag, default=False,
                        help="write scalars under dump_path/tb (rank 0; needs tensorboard)")
    parser.add_argument("--log_freq", type=int, default=log_freq, help="log every this many iterations")
    return parser


# ----------------------------------------------------------------------------- data
def eval_transforms(args):
    """(train, val) transforms: RandomResizedCrop + flip / Resize + CenterCrop, std 0.228."""
    normalize = transforms.Normalize(mean=MEAN, std=STD)
    train = None
    if hasattr(args, "train_crop"):
        if not 0 < args.train_min_scale <= 1:
            raise UsageError(f"--train_min_scale must be in (0, 1], got {args.train_min_scale}")
        train = transforms.Compose([
            transforms.RandomResizedCrop(args.train_crop, scale=(args.train_min_scale, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ])
    if args.center_crop > args.resize:
        raise UsageError(f"--center_crop {args.center_crop} is larger than --resize {args.resize}")
    val = transforms.Compose([
        transforms.Resize(args.resize),
        transforms.CenterCrop(args.center_crop),
        transforms.ToTensor(),
        normalize,
    ])
    return train, val


class EvalImageFolder(SafeImageFolder):
    """(image, label) ImageFolder; unreadable files skipped with a warning; labels can be fixed by
    a given class_to_idx (val uses train's); an item may be `(index, seed)` (SeededSampler) so
    each image's augmentation depends only on its own seed. `root`: a path or an ImageList,
    which must have classes."""

    def __init__(self, root, transform=None, class_to_idx=None, strict_data=False,
                 what="--data_path"):
        images = require_labels(root if isinstance(root, ImageList) else find_images(root, what),
                                what)
        if class_to_idx is not None:
            unknown = sorted(set(images.classes) - set(class_to_idx))
            if unknown:
                raise DataError(f"class {unknown[0]!r} of {images.root} is not in the training "
                                f"set ({len(unknown)} such class(es))")
            given = sorted(class_to_idx, key=class_to_idx.get)
            images = ImageList(images.root, images.paths,
                               [class_to_idx[images.classes[i]] for i in images.labels], given,
                               images.layout)
        super().__init__(images, transform=transform, strict_data=strict_data)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        image, used = self.load_image(index)
        target = self.samples[used][1]
        if self.transform is not None:
            if seed is None:
                image = self.transform(image)
            else:
                in_main = torch.utils.data.get_worker_info() is None
                with torch.random.fork_rng(devices=[]) if in_main else nullcontext():
                    torch.default_generator.manual_seed(seed)
                    image = self.transform(image)
        return image, target


def check_train_val(data_path):
    """The (train, val) ImageLists of --data_path, each found once; one-line errors for a list
    file, a missing train/ or val/, or a split without class sub-folders (labels)."""
    if data_path and os.path.isfile(data_path):
        raise DataError(f"--data_path {data_path!r} is a list file: the evaluations train and "
                        "score a classifier on labels, so they need a folder with train/<class>/"
                        "<image> and val/<class>/<image>")
    if not data_path or not os.path.isdir(data_path):
        raise DataError(f"--data_path {data_path!r} does not exist or is not a folder")
    splits = []
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(data_path, split)):
            raise DataError(f"--data_path {data_path!r} has no {split}/ folder: the evaluations "
                            "train and score a classifier on labels, so they need "
                            f"{data_path}/train/<class>/... and {data_path}/val/<class>/...")
        what = f"{split}/ of --data_path"
        splits.append(require_labels(find_images(os.path.join(data_path, split), what), what))
    return tuple(splits)


def build_eval_datasets(data_path, train_transform, val_transform):
    train_images, val_images = check_train_val(data_path)
    train = EvalImageFolder(train_images, train_transform)
    val = EvalImageFolder(val_images, val_transform, class_to_idx=train.class_to_idx)
    logger.info(f"data: {len(train)} train and {len(val)} val images, {len(train.classes)} classes")
    return train, val


class ShardSampler(torch.utils.data.Sampler):
    """Indices rank, rank + world_size, ...: every sample on exactly one rank, no padding
    (a DistributedSampler would repeat samples to even out the shards)."""

    def __init__(self, size, rank=None, world_size=None):
        rank = du.get_rank() if rank is None else rank
        world_size = du.get_world_size() if world_size is None else world_size
        self.indices = range(rank, size, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class TensorLoader:
    """Batches of in-memory tensors (cached features) in a sampler's order: a DataLoader would
    index and collate them one sample at a time, which costs more than the linear head."""

    def __init__(self, tensors, sampler, batch_size, drop_last=False):
        self.tensors, self.sampler = tensors, sampler
        self.batch_size, self.drop_last = batch_size, drop_last

    def __iter__(self):
        order = torch.as_tensor(list(self.sampler), dtype=torch.long)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield tuple(t[idx] for t in self.tensors)

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def tensor_loaders(train, val, args):
    """(train, val) loaders over cached (features, labels): train shuffled per epoch and padded
    to equal shards (every rank runs the same number of steps), its last partial batch kept as
    the original's DataLoader does; val sharded without padding."""
    sampler = torch.utils.data.DistributedSampler(train[0], num_replicas=args.world_size,
                                                  rank=args.rank, shuffle=True, seed=args.seed)
    train_loader = TensorLoader(train, sampler, args.batch_size)
    if len(train_loader) == 0:
        raise UsageError("no training images")
    val_loader = TensorLoader(val, ShardSampler(len(val[0])), args.batch_size)
    return train_loader, val_loader


def shard_loader(dataset, args, batch_size=None):
    return torch.utils.data.DataLoader(
        dataset, sampler=ShardSampler(len(dataset)), batch_size=batch_size or args.batch_size,
        num_workers=args.workers, pin_memory=str(args.device).startswith("cuda"))


# ----------------------------------------------------------------------------- models
class PixelFeatures(nn.Module):
    """Raw pixels as a 'feature map' [N, C*H*W, 1, 1]: the baseline a method has to beat."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)

    def forward(self, x):
        return x.flatten(1)[:, :, None, None]


def load_backbone_weights(model, path, allow_missing=False):
    """--pretrained into `model` (every format src/pretrained.py reads); empty: keep random."""
    if not path:
        logger.warning("no --pretrained given: evaluating the randomly initialised backbone")
        return None
    if not os.path.isfile(path):
        raise CheckpointError(f"--pretrained {path}: no such file")
    return load_pretrained(model, path, allow_missing=allow_missing)


def build_frozen_backbone(args, image_size):
    """The feature extractor in eval mode without gradients: a ResNet (eval_mode: layer4 map) with
    --pretrained loaded, or PixelFeatures. `num_features` gives the channel count."""
    if args.arch == PIXELS:
        if args.pretrained:
            raise UsageError("--arch pixels takes no --pretrained weights")
        model = PixelFeatures(3 * image_size * image_size)
    else:
        model = build_backbone(args.arch, output_dim=0, eval_mode=True,
                               cifar_stem=args.cifar_stem, width=args.width or None)
        load_backbone_weights(model, args.pretrained, args.allow_missing_keys)
    model = model.to(args.device).eval()
    if args.channels_last:  # as engine.prepare_model: NHWC convolutions
        model = model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def forward_autocast(model, inp, args):
    """model(inp) on args.device, under autocast when --use_fp16 (bf16/fp16 by device)."""
    device = torch.device(args.device)
    dtype, _, _ = resolve_amp(args.use_fp16, args.amp_dtype, device)
    with autocast(device, dtype):
        return model(inp.to(device, non_blocking=True))


def frozen_forward(model, inp, args):
    """Frozen backbone output in fp32, no graph."""
    with torch.no_grad():
        return forward_autocast(model, inp, args).float()


# ----------------------------------------------------------------------------- features
@torch.no_grad()
def extract_features(model, dataset, args, pool=True, batch_size=None, gather=True):
    """Frozen outputs for the whole dataset: each rank computes its shard (ShardSampler: samples
    rank, rank + world_size, ...) once. gather=True: shards are all-gathered, every rank gets the
    whole dataset in dataset order; gather=False: each rank keeps its own shard (a k-NN bank).
    Returns (features float32 CPU, labels long)."""
    loader = shard_loader(dataset, args, batch_size)
    feats, labels = [], []
    for inp, target in loader:
        out = frozen_forward(model, inp, args)
        if pool:
            out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        feats.append(out.cpu())
        labels.append(target)
    if not feats:  # a rank with an empty shard still takes part in the collectives
        shape = frozen_forward(model, dataset[0][0].unsqueeze(0), args).shape[1:]
        feats = [torch.zeros((0, *shape) if not pool else (0, shape[0]))]
        labels = [torch.zeros(0, dtype=torch.long)]
    features, labels = torch.cat(feats), torch.cat(labels).long()
    if gather:
        features, labels = gather_shards(features, labels, len(dataset))
    # NaN features (e.g. inf BatchNorm statistics) would still give an "accuracy"
    return check_finite_everywhere(features, "extracted features", local=not gather), labels


def check_finite_everywhere(features, what, local=False):
    """check_finite_features on every rank together. local=True: each rank holds other
    features; the ranks agree first, so that all of them stop (one stopping alone would leave
    the others waiting in their next collective)."""
    if local and du.get_world_size() > 1:
        bad = float(features.is_floating_point() and not bool(torch.isfinite(features).all()))
        if du.all_reduce(torch.tensor([bad])).item() > 0 and not bad:
            raise NonFiniteStateError(f"{what}: feature vectors hold NaN/inf on another rank "
                                      "(non-finite weights or BatchNorm statistics?): not "
                                      "evaluating")
    return check_finite_features(features, what)


def gather_shards(local_feats, local_labels, size):
    """Undo ShardSampler: every rank gets [size, ...] with row i = sample i."""
    world = du.get_world_size()
    if world == 1:
        return local_feats, local_labels
    n_max = -(-size // world)
    pad = n_max - local_feats.shape[0]
    f = torch.cat([local_feats, local_feats.new_zeros((pad, *local_feats.shape[1:]))])
    y = torch.cat([local_labels, local_labels.new_zeros(pad)])
    feats = local_feats.new_empty((size, *local_feats.shape[1:]))
    labels = local_labels.new_empty(size)
    for r, (fr, yr) in enumerate(zip(du.all_gather(f), du.all_gather(y))):
        n = len(range(r, size, world))
        feats[r::world] = fr[:n]
        labels[r::world] = yr[:n]
    return feats, labels


# ----------------------------------------------------------------------------- train / validate
class ClassificationMeter:
    """Sums of loss, top-1 and top-5 hits and samples, kept on the outputs' device (no host
    sync per batch); `summary()` all-reduces and reads them."""

    def __init__(self):
        self.sums = None

    def update(self, loss, output, target):
        """Add a batch (`loss`: its mean, a tensor); returns its (top-1, top-5) %, unread."""
        acc1, acc5 = accuracy(output.detach().float(), target, topk=(1, 5))
        batch = torch.stack([loss.detach().double(), acc1.double() / 100, acc5.double() / 100,
                             torch.ones_like(acc1, dtype=torch.float64)]) * target.shape[0]
        self.sums = batch if self.sums is None else self.sums + batch
        return acc1, acc5

    def summary(self):
        """(loss, top-1 %, top-5 %) over every rank's samples, each counted once (a rank
        without samples takes part in the all-reduce with zeros)."""
        sums = self.sums.clone() if self.sums is not None else du.backend_tensor([0.0] * 4,
                                                                                torch.float64)
        loss, hits1, hits5, n = du.all_reduce(sums).tolist()
        n = max(n, 1)
        return loss / n, 100 * hits1 / n, 100 * hits5 / n


def eval_scaler(args):
    """A GradScaler, enabled where --use_fp16 means fp16 autocast (CUDA): without it small
    gradients of the fine-tuned network or the linear head underflow to zero."""
    _, use_scaler, _ = resolve_amp(args.use_fp16, args.amp_dtype, args.device)
    return make_scaler(use_scaler, args.device)


def train_epoch(forward, modules, loader, optimizer, epoch, args, scaler=None):
    """One epoch of cross-entropy training of `modules` on `forward(inputs) -> logits`.
    Returns (epoch, loss, prec1, prec5) over all ranks, the original's row."""
    scaler = scaler if scaler is not None else make_scaler(False, args.device)
    for m in modules:
        m.train()
    # the last partial batch is kept, as the original, unless it holds one sample per process
    # and BatchNorm layers train: one value per channel (a pooled feature, a 1x1 map) cannot be
    # normalised (an error), and one image's statistics would be noise. Every rank's shard is
    # padded to the same length, so every rank skips the same batch.
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                 for module in modules for m in module.modules())
    criterion = nn.CrossEntropyLoss()
    meter, batch_time, data_time = ClassificationMeter(), AverageMeter(), AverageMeter()
    end = time.perf_counter()
    for it, (inp, target) in enumerate(loader):
        data_time.update(time.perf_counter() - end)
        if has_bn and len(target) == 1:
            logger.info(f"Epoch[{epoch}]: the last batch (one sample per process) is skipped: "
                        "BatchNorm cannot train on it")
            continue
        target = target.to(args.device, non_blocking=True)
        output = forward(inp)
        loss = criterion(output.float(), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        acc1, _ = meter.update(loss, output, target)
        batch_time.update(time.perf_counter() - end)
        end = time.perf_counter()
        if args.rank == 0 and it % args.log_freq == 0:
            # the one host read of a log interval: this batch's loss and top-1, this rank's
            # mean loss so far
            loss_now, acc1_now, loss_sum, n = torch.cat([
                loss.detach().double().view(1), acc1.double().view(1),
                meter.sums[0::3]]).tolist()  # a slice: no index tensor to copy
            lrs = " ".join(f"{g['lr']:.4g}" for g in optimizer.param_groups)
            logger.info(f"Epoch[{epoch}] - Iter: [{it}/{len(loader)}]\t"
                        f"Time {batch_time.val:.3f} ({batch_time.avg:.3f})\t"
                        f"Data {data_time.val:.3f} ({data_time.avg:.3f})\t"
                        f"Loss {loss_now:.4f} ({loss_sum / n:.4f})\tPrec {acc1_now:.3f}\t"
                        f"LR {lrs}")
    return (epoch, *meter.summary())


@torch.no_grad()
def validate(forward, modules, loader, args):
    """(loss, top-1, top-5) on a sharded loader, all-reduced: each val image counted once."""
    for m in modules:
        m.eval()
    criterion = nn.CrossEntropyLoss()
    meter = ClassificationMeter()
    for inp, target in loader:
        target = target.to(args.device, non_blocking=True)
        output = forward(inp).float()
        meter.update(criterion(output, target), output, target)
    return meter.summary()


# ----------------------------------------------------------------------------- checkpoints
SUPERVISED_COLUMNS = ("epoch", "loss", "prec1", "prec5", "loss_val", "prec1_val", "prec5_val")


def eval_paths(args, name):
    """The evaluation's own files in dump_path, apart from a pre-training run's."""
    return {"checkpoint": os.path.join(args.dump_path, f"checkpoint_{name}.pth.tar"),
            "stats": f"stats_{name}", "log": f"{name}.log", "params": f"params_{name}.pkl",
            "lock": f".lock_{name}"}


def start_eval(args, name, columns=SUPERVISED_COLUMNS):
    """Start-up shared by the evaluations: process group, seeds, the evaluation's own log,
    params and stats files (`name`), TensorBoard. Returns (paths, stats, tensorboard)."""
    du.init_distributed_mode(args)
    fix_random_seeds(args.seed)
    paths = eval_paths(args, name)
    _, stats = initialize_exp(args, *columns, stats_name=paths["stats"], log_name=paths["log"],
                              params_name=paths["params"], lock_name=paths["lock"])
    configure_backends(args)  # cuDNN autotuning, --tf32: as the pre-trainings
    return paths, stats, TensorBoard(args, name)


def save_eval_state(path, epoch, model, optimizer, scheduler, best_acc, args, scaler=None):
    if args.rank != 0:
        return
    atomic_save({"epoch": epoch + 1, "state_dict": model_state_dict(model),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "best_acc": list(best_acc), **scaler_entry(scaler),
                 "args": recorded_flags(args)}, path)


def resume_eval_state(path, model, optimizer, scheduler, args=None, scaler=None):
    """(start epoch, best (top-1, top-5)) from `path` when it exists. Any number of processes
    resumes (the head, optimizer and per-epoch scheduler are the same on every rank); an fp16
    loss scaler continues at its scale; flag changes are logged and a change of the global
    batch refused as in pre-training."""
    to_restore = {"epoch": 0, "best_acc": [0.0, 0.0], "args": None}
    loaded = restart_from_checkpoint(path, run_variables=to_restore, state_dict=model,
                                     optimizer=optimizer, scheduler=scheduler,
                                     scaler=scaler_to_restore(scaler))
    if loaded and args is not None:
        check_resume_flags(to_restore["args"], args, loaded)
    return to_restore["epoch"], tuple(to_restore["best_acc"])


def fit(name, forward, module, loaders, optimizer, scheduler, scaler, training_stats, tb, paths,
        args, lr_names=("lr",)):
    """The supervised epochs of eval_linear / eval_semisup: resume from this evaluation's own
    checkpoint, then per epoch train, validate, log, TensorBoard, schedule, checkpoint.
    Returns {top1, top5} of the last epoch and {best_top1, best_top5}."""
    train_loader, val_loader = loaders
    start_epoch, best_acc = resume_eval_state(paths["checkpoint"], module, optimizer, scheduler,
                                              args, scaler)
    truncate_stats(training_stats, start_epoch)
    for epoch in range(start_epoch, args.epochs):
        logger.info("============ Starting epoch %i ... ============" % epoch)
        train_loader.sampler.set_epoch(epoch)
        scores = train_epoch(forward, [module], train_loader, optimizer, epoch, args, scaler)
        scores_val = validate(forward, [module], val_loader, args)
        training_stats.update(scores + scores_val)
        if scores_val[1] > best_acc[0]:
            best_acc = (scores_val[1], scores_val[2])
        logger.info(f"Test:\tLoss {scores_val[0]:.4f}\tAcc@1 {scores_val[1]:.3f}\t"
                    f"Acc@5 {scores_val[2]:.3f}\tBest Acc@1 so far {best_acc[0]:.1f}")
        lrs = {lr_name: group["lr"] for lr_name, group in zip(lr_names, optimizer.param_groups)}
        tb.scalars(epoch, name, loss=scores[1], prec1=scores[2], loss_val=scores_val[0],
                   prec1_val=scores_val[1], prec5_val=scores_val[2], **lrs)
        scheduler.step()
        save_eval_state(paths["checkpoint"], epoch, module, optimizer, scheduler, best_acc, args,
                        scaler)
    du.barrier()
    tb.close()
    last = training_stats.stats.iloc[-1] if len(training_stats.stats) else None  # resumed: done
    return {"top1": float(last["prec1_val"]) if last is not None else 0.0,
            "top5": float(last["prec5_val"]) if last is not None else 0.0,
            "best_top1": best_acc[0], "best_top5": best_acc[1]}

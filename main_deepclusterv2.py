"""DeepCluster-v2 pre-training (Caron et al., NeurIPS 2020): same flags, defaults and math as
facebookresearch/swav's main_deepclusterv2.py, with a vectorised distributed k-means
(src/kmeans.py), on native torch.amp, CPU or CUDA, one process or many."""
import argparse
import logging
import os

import torch
import torch.nn.functional as F

from src import distributed as du
from src import preemption
from src.amp import Precision
from src.checkpoint import CheckpointError, atomic_save, safe_load, unwrap
from src.cli import (add_backbone_args, add_distributed_args, add_larc_optim_args,
                     add_multicrop_args, add_run_args, check_crops_for_assign, run_main)
from src.data import build_train_data, to_device
from src.engine import build_pretraining, run_epochs
from src.errors import UsageError
from src.imagelist import check_data_path
from src.kmeans import cluster_size_stats, scatter_assignments, spherical_kmeans
from src.monitor import DEEPCLUSTER_REMEDIES, CollapseMonitor, add_collapse_args
from src.multicropdataset import MultiCropDataset
from src.progress import EpochProgress
from src.runstate import (EpochState, end_epoch, gather_to_rank0, resume_training_state,
                          this_ranks_share)
from src.step import backward, freeze_prototypes, optimizer_step, set_lr
from src.tensorboard import TensorBoard
from src.utils import bool_flag, fix_random_seeds, initialize_exp

logger = logging.getLogger()


def get_args_parser():
    parser = argparse.ArgumentParser(description="Implementation of DeepCluster-v2",
                                     add_help=False)

    #########################
    #### data parameters ####
    #########################
    add_multicrop_args(parser)

    #########################
    ## dcv2 specific params #
    #########################
    parser.add_argument("--crops_for_assign", type=int, nargs="+", default=[0, 1],
                        help="list of crops id used for computing assignments")
    parser.add_argument("--temperature", default=0.1, type=float,
                        help="temperature parameter in training loss")
    parser.add_argument("--feat_dim", default=128, type=int, help="feature dimension")
    parser.add_argument("--nmb_prototypes", default=[3000, 3000, 3000], type=int, nargs="+",
                        help="number of prototypes - it can be multihead")
    parser.add_argument("--nmb_kmeans_iters", default=10, type=int,
                        help="k-means iterations at the start of each epoch")
    parser.add_argument("--checkpoint_memory_bank", type=bool_flag, default=True,
                        help="also keep every rank's memory bank in the checkpoint, for an exact "
                             "resume from any checkpoint (ImageNet: +1.3 GB per file); off: only "
                             "in mb{rank}.pth, as the original")
    add_collapse_args(parser)  # --stop_on_collapse, --collapse_patience

    #########################
    #### optim parameters ###
    #########################
    # the prototypes are set by k-means, never trained: frozen "forever" as in the original
    add_larc_optim_args(parser, freeze_prototypes_niters=int(1e10))

    #########################
    #### dist parameters ###
    #########################
    add_distributed_args(parser)

    #########################
    #### other parameters ###
    #########################
    add_backbone_args(parser)
    # a flat 2048 for every arch, as the original (SwAV scales it with the width: its scripts pass it)
    parser.add_argument("--hidden_mlp", default=2048, type=int,
                        help="hidden layer dimension in projection head")
    add_run_args(parser)
    parser.set_defaults(use_fp16=False)  # the original trains DeepCluster-v2 in fp32
    return parser


def check_args(args):
    """One-line errors for inconsistent flags, before any work."""
    check_crops_for_assign(args)
    if not args.nmb_prototypes or min(args.nmb_prototypes) < 1:
        raise UsageError(f"--nmb_prototypes must be >= 1 each, got {args.nmb_prototypes}")
    if args.feat_dim < 1:
        raise UsageError(f"--feat_dim must be >= 1, got {args.feat_dim}")
    if args.temperature <= 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    if args.nmb_kmeans_iters < 0:
        raise UsageError(f"--nmb_kmeans_iters must be >= 0, got {args.nmb_kmeans_iters}")
    check_data_path(args.data_path)


def check_memory_size(args, niter_per_ep):
    """k-means draws its K initial centroids from one process's memory bank."""
    size_memory_per_process = niter_per_ep * args.batch_size
    if size_memory_per_process < max(args.nmb_prototypes):
        raise UsageError(
            f"--nmb_prototypes {max(args.nmb_prototypes)} is more than the {size_memory_per_process} "
            f"samples each process holds in its memory bank ({niter_per_ep} batches of "
            f"{args.batch_size}): lower --nmb_prototypes, or use more data or fewer processes")


# ----------------------------------------------------------------------------- loss
def deepcluster_loss(output, assignments, idx, nmb_crops_total, temperature):
    """Mean over heads of the cross-entropy between each crop's scores / temperature and its
    image's cluster; samples assigned -100 (not in any memory bank) are ignored."""
    loss = 0
    for h, scores in enumerate(output):
        scores = scores.float() / temperature
        targets = assignments[h][idx].repeat(nmb_crops_total).to(scores.device, non_blocking=True)
        # = cross_entropy(..., ignore_index=-100) (sum / number kept), but 0 rather than NaN
        # when a whole batch is ignored
        kept = (targets != -100).sum().clamp(min=1)
        loss += F.cross_entropy(scores, targets, ignore_index=-100, reduction="sum") / kept
    return loss / len(output)


# ----------------------------------------------------------------------------- memory bank
@torch.no_grad()
def init_memory(dataloader, model, args, *, precision=None):
    """Fill this rank's memory bank with one pass over its shard (model in its current mode,
    as the original: train mode, so BatchNorm uses batch statistics)."""
    net = unwrap(model)
    size_memory_per_process = len(dataloader) * args.batch_size
    device = next(net.parameters()).device
    precision = precision or Precision.from_args(args, device)
    local_memory_index = torch.zeros(size_memory_per_process, dtype=torch.long, device=device)
    local_memory_embeddings = torch.zeros(len(args.crops_for_assign), size_memory_per_process,
                                          args.feat_dim, device=device)
    start_idx = 0
    logger.info("Start initializing the memory banks")
    for index, inputs in dataloader:
        nmb_unique_idx = inputs[0].size(0)
        local_memory_index[start_idx: start_idx + nmb_unique_idx] = index.to(device)
        for mb_idx, crop_idx in enumerate(args.crops_for_assign):
            with precision.autocast():
                embeddings = model(to_device(inputs[crop_idx], device))[0]
            local_memory_embeddings[mb_idx][start_idx: start_idx + nmb_unique_idx] = embeddings
        start_idx += nmb_unique_idx
    logger.info("Initialization of the memory banks done.")
    return local_memory_index, local_memory_embeddings


def memory_bank_path(args):
    return os.path.join(args.dump_path, "mb" + str(args.rank) + ".pth")


def load_memory_bank(args, to_restore, size_dataset, niter_per_ep):
    """This rank's memory bank at resume: from our checkpoint (saved with it, every rank's) or
    every rank's mb{rank}.pth of the run (--checkpoint_memory_bank false), re-sharded to this
    run's processes and batch size (src/checkpoint.reshard: row block j of the global bank is
    iteration j's global batch); else from the original's mb{rank}.pth (same world size only: it
    does not record its batch size); None when there is none. Checked against the run."""
    saved = to_restore.get("args")
    banks = to_restore.get("memory_bank")
    path = os.path.join(args.dump_path, "checkpoint.pth.tar")
    if banks is None and saved is not None:  # ours, without the banks: every rank's mb file
        banks = load_memory_bank_files(args, saved.get("world_size", args.world_size))
        path = os.path.join(args.dump_path, "mb*.pth")
    rows = niter_per_ep * args.batch_size
    if banks is not None:
        old_batch = saved["batch_size"] if saved is not None else args.batch_size
        index, embeddings = reshard_memory_bank(banks, old_batch, args, rows * args.world_size,
                                                path)
    elif os.path.isfile(memory_bank_path(args)):
        path = memory_bank_path(args)
        saved_bank = safe_load(path)
        index, embeddings = saved_bank["local_memory_index"], saved_bank["local_memory_embeddings"]
    else:
        return None
    expected = (len(args.crops_for_assign), rows, args.feat_dim)
    if tuple(embeddings.shape) != expected or index.shape != expected[1:2]:
        raise CheckpointError(
            f"{path}: memory bank of shape {tuple(embeddings.shape)} does not fit this run "
            f"(expected {expected}: len(--crops_for_assign), samples per process from the "
            "dataset size, --batch_size and the number of processes, --feat_dim)")
    if len(index) and (int(index.max()) >= size_dataset or int(index.min()) < 0):
        raise CheckpointError(f"{path}: memory bank indexes images up to {int(index.max())}, "
                              f"the dataset has {size_dataset}: another dataset?")
    return index.to(args.device), embeddings.to(args.device)


def load_memory_bank_files(args, world_size):
    """{"index": [world, rows], "embeddings": [world, crops, rows, dim]} from mb0..mb{world-1}.pth
    in dump_path, or None when one is missing."""
    paths = [os.path.join(args.dump_path, f"mb{r}.pth") for r in range(world_size)]
    if not all(os.path.isfile(p) for p in paths):
        return None
    parts = [safe_load(p) for p in paths]
    return {"index": torch.stack([p["local_memory_index"] for p in parts]),
            "embeddings": torch.stack([p["local_memory_embeddings"] for p in parts])}


def reshard_memory_bank(banks, old_batch, args, rows, path):
    """This rank's (index, embeddings) from every rank's saved bank, for this run's processes
    and batch size. The global bank keeps its rows in iteration order; a bank of another size
    (another batch size, or an epoch one iteration longer or shorter when the sampler's padding
    changes with the world size) keeps its first rows, or repeats them from the start: every
    row holds a real sample, and the epoch overwrites them all (k-means needs each rank's rows
    to be real embeddings, K of them on rank 0, and scatters the assignments by index)."""
    index = banks["index"]
    old_rows = index.shape[0] * index.shape[1]
    if old_rows != rows:
        logger.warning(f"memory bank of {old_rows} samples -> {rows} (another global batch or "
                       "epoch length): " + ("the first ones are kept" if rows < old_rows else
                                            f"{rows - old_rows} samples repeated from the start"))
    share = this_ranks_share(banks, old_batch, args, rows, {"index": 0, "embeddings": 1},
                             pad="repeat", what=f"{path}: the memory bank")
    return share["index"], share["embeddings"]


def save_memory_bank(args, local_memory_index, local_memory_embeddings):
    """Every rank writes its mb{rank}.pth (the original's file); returns every rank's bank for
    the checkpoint (on rank 0; None entries elsewhere), or None with --checkpoint_memory_bank
    false (all ranks call)."""
    atomic_save({"local_memory_embeddings": local_memory_embeddings,
                 "local_memory_index": local_memory_index}, memory_bank_path(args))
    if not args.checkpoint_memory_bank:
        return None
    return {"index": gather_to_rank0(local_memory_index),
            "embeddings": gather_to_rank0(local_memory_embeddings)}


# ----------------------------------------------------------------------------- k-means
@torch.no_grad()
def cluster_memory(model, local_memory_index, local_memory_embeddings, size_dataset, args,
                   nmb_kmeans_iters=10):
    """One spherical k-means per head (head h on memory bank h mod len(crops_for_assign)); its
    centroids become prototypes{h}. Returns the [heads, size_dataset] assignments (-100: unseen)."""
    prototypes = unwrap(model).prototypes
    assignments = torch.full((len(args.nmb_prototypes), size_dataset), -100, dtype=torch.long)
    j = 0
    for i_K, K in enumerate(args.nmb_prototypes):
        centroids, local_assignments, counts = spherical_kmeans(
            local_memory_embeddings[j], K, nmb_kmeans_iters)
        getattr(prototypes, "prototypes" + str(i_K)).weight.copy_(centroids)
        assignments[i_K] = scatter_assignments(size_dataset, local_assignments, local_memory_index)
        stats = cluster_size_stats(counts)
        logger.info(f"k-means head {i_K} (K={K}, memory bank {j}): {stats['empty']} empty "
                    f"clusters, largest cluster {stats['largest_share']:.2%} of "
                    f"{stats['samples']} samples, {int((assignments[i_K] < 0).sum())} images "
                    "without assignment")
        j = (j + 1) % len(args.crops_for_assign)  # next memory bank to use
    return assignments


# ----------------------------------------------------------------------------- training
def train(loader, model, optimizer, epoch, schedule, local_memory_index, local_memory_embeddings,
          args, *, scaler=None, precision=None, monitor=None, start_iter=0, state=None):
    """One epoch: k-means on the memory bank, then cross-entropy against the clusters while the
    memory bank takes the new embeddings. Returns ((epoch, average loss), index, embeddings).

    `state` (an EpochState) keeps the epoch's assignments for a mid-epoch resume at
    `start_iter`."""
    net = unwrap(model)
    model.train()
    device = next(net.parameters()).device
    precision = precision or Precision.from_args(args, device, scaler)
    state = state if state is not None else EpochState()
    if state.assignments is None:  # a resumed epoch keeps the clusters it started with
        state.assignments = cluster_memory(model, local_memory_index, local_memory_embeddings,
                                              len(loader.dataset), args, args.nmb_kmeans_iters)
        logger.info("Clustering for epoch {} done.".format(epoch))
    assignments = state.assignments

    progress = EpochProgress(loader, epoch, args, start_iter, state=state, monitor=monitor)
    ncrops = sum(args.nmb_crops)
    start_idx = start_iter * args.batch_size  # batches are full (drop_last)
    for it, iteration, (idx, inputs) in progress:
        # update learning rate
        set_lr(optimizer, schedule[iteration])

        # ============ multi-res forward passes ... ============
        inputs = to_device(inputs, device)  # uint8 crops, normalised on the device
        with precision.autocast():
            emb, output = model(inputs)
        emb = emb.detach()
        bs = inputs[0].size(0)

        # ============ deepcluster-v2 loss ... ============
        loss = deepcluster_loss(output, assignments, idx, ncrops, args.temperature)

        # ============ backward, prototypes kept (k-means sets them), optim step ... ============
        backward(loss, optimizer, precision.scaler, iteration, progress)
        freeze_prototypes(model, iteration, args.freeze_prototypes_niters)
        optimizer_step(loss, model, optimizer, precision.scaler, iteration, progress)

        # ============ update memory banks ... ============
        local_memory_index[start_idx: start_idx + bs] = to_device(idx, local_memory_index.device)
        for i, crop_idx in enumerate(args.crops_for_assign):
            local_memory_embeddings[i][start_idx: start_idx + bs] = \
                emb[crop_idx * bs: (crop_idx + 1) * bs]
        start_idx += bs

        # ============ misc ... ============
        # the loss is read once per log interval (no host sync per step): by progress, which
        # also gives it to the collapse monitor (loss at the mean of ln(K): warns, or stops)
        if monitor is not None:
            monitor.update(None, assignments=[a[idx] for a in assignments], iteration=iteration)
        progress.update(it, loss, bs, optimizer.param_groups[0]["lr"])
    if monitor is not None:
        monitor.epoch_summary(epoch)
    return (epoch, progress.losses.avg), local_memory_index, local_memory_embeddings


def main(args):
    check_args(args)
    du.init_distributed_mode(args)
    fix_random_seeds(args.seed)
    logger_, training_stats = initialize_exp(args, "epoch", "loss")
    preemption.install()  # USR1/TERM/INT: finish the step, checkpoint mid-epoch, then exit

    # build data (with each image's dataset index, the key of the memory bank): the images of
    # --data_path in any layout, looked for once per job
    train_dataset, train_loader = build_train_data(args, lambda images: MultiCropDataset(
        images, args.size_crops, args.nmb_crops, args.min_scale_crops, args.max_scale_crops,
        return_index=True, blur=args.blur, strict_data=args.strict_data, augment=args.augment))
    check_memory_size(args, len(train_loader))

    # build model (one prototype head per k-means: --nmb_prototypes is a list) on its device
    # (DDP), with LARC + SGD, the lr schedule and the precision
    model, optimizer, lr_schedule, precision = build_pretraining(args, len(train_loader))

    # optionally resume from a checkpoint (with every rank's memory bank); a mid-epoch one
    # (preemption) resumes its epoch at state.start_iter with its assignments
    to_restore = resume_training_state(args, model, optimizer, precision.scaler, training_stats,
                                       extra_keys=["memory_bank"])
    start_epoch, state = to_restore["epoch"], to_restore["epoch_state"]

    # build the memory bank
    memory = load_memory_bank(args, to_restore, len(train_dataset), len(train_loader))
    if memory is None and start_epoch > 0:
        logger.warning(f"no memory bank in the checkpoint nor in {memory_bank_path(args)}: "
                       "filling a new one (the resumed run is not exact)")
    local_memory_index, local_memory_embeddings = memory or init_memory(train_loader, model, args,
                                                                    precision=precision)
    monitor = CollapseMonitor.from_args(args, args.nmb_prototypes, name="DeepCluster-v2",
                                        remedies=DEEPCLUSTER_REMEDIES)
    tb = TensorBoard(args)
    for epoch in run_epochs(train_loader, start_epoch, args, state.start_iter):
        scores, local_memory_index, local_memory_embeddings = train(
            train_loader, model, optimizer, epoch, lr_schedule, local_memory_index,
            local_memory_embeddings, args, precision=precision, monitor=monitor,
            start_iter=state.start_iter, state=state)

        # save checkpoints: every rank's memory bank in the checkpoint and its own mb{rank}.pth;
        # the stats row and TensorBoard (a whole epoch only); mid-epoch if a stop request cut
        # the epoch; requeue and exit
        banks = save_memory_bank(args, local_memory_index, local_memory_embeddings)
        end_epoch(args, epoch, model, optimizer, precision.scaler, training_stats, scores, state,
                  {"memory_bank": banks} if banks is not None else {}, tb=tb,
                  scalars=("deepclusterv2", dict(loss=scores[1], lr=optimizer.param_groups[0]["lr"],
                                                 clusters_in_use=monitor.share_in_use())))
        state = EpochState()
    tb.close()
    return training_stats


if __name__ == "__main__":
    run_main(main, argparse.ArgumentParser("DeepCluster-v2 pre-training",
                                           parents=[get_args_parser()]))

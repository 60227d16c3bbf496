"""SwAV pre-training (Caron et al., NeurIPS 2020): same flags, defaults and math as
facebookresearch/swav's main_swav.py, on native torch.amp, CPU or CUDA, one process or many."""
import argparse
import logging
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from src import distributed as du
from src import preemption
from src.amp import Precision
from src.checkpoint import CheckpointError, atomic_save, safe_load, unwrap
from src.cli import (add_backbone_args, add_distributed_args, add_larc_optim_args,
                     add_multicrop_args, add_run_args, check_crops_for_assign, run_main)
from src.data import build_train_data, to_device
from src.engine import build_pretraining, forward_context, run_epochs  # noqa: F401 (tests)
from src.errors import UsageError
from src.imagelist import check_data_path
from src.monitor import CollapseMonitor, add_collapse_args
from src.multicropdataset import MultiCropDataset
from src.progress import EpochProgress
from src.runstate import (EpochState, end_epoch, gather_to_rank0, resume_training_state,
                          this_ranks_share)
from src.sinkhorn import distributed_sinkhorn
from src.step import backward, freeze_prototypes, optimizer_step, set_lr
from src.tensorboard import TensorBoard
from src.utils import fix_random_seeds, initialize_exp

logger = logging.getLogger()


def get_args_parser():
    parser = argparse.ArgumentParser(description="Implementation of SwAV", add_help=False)

    #########################
    #### data parameters ####
    #########################
    add_multicrop_args(parser)

    #########################
    ## swav specific params #
    #########################
    parser.add_argument("--crops_for_assign", type=int, nargs="+", default=[0, 1],
                        help="list of crops id used for computing assignments")
    parser.add_argument("--temperature", default=0.1, type=float,
                        help="temperature parameter in training loss")
    parser.add_argument("--epsilon", default=0.05, type=float,
                        help="regularization parameter for Sinkhorn-Knopp algorithm")
    parser.add_argument("--sinkhorn_iterations", default=3, type=int,
                        help="number of iterations in Sinkhorn-Knopp algorithm")
    parser.add_argument("--feat_dim", default=128, type=int, help="feature dimension")
    parser.add_argument("--nmb_prototypes", default=3000, type=int, help="number of prototypes")
    parser.add_argument("--queue_length", type=int, default=0,
                        help="length of the queue (0 for no queue)")
    parser.add_argument("--epoch_queue_starts", type=int, default=15,
                        help="from this epoch, we start using a queue")
    add_collapse_args(parser)  # --stop_on_collapse, --collapse_patience

    #########################
    #### optim parameters ###
    #########################
    add_larc_optim_args(parser, freeze_prototypes_niters=313)

    #########################
    #### dist parameters ###
    #########################
    add_distributed_args(parser)

    #########################
    #### other parameters ###
    #########################
    add_backbone_args(parser)
    parser.add_argument("--hidden_mlp", default=2048, type=int,
                        help="hidden layer dimension in projection head")
    add_run_args(parser)
    return parser


def check_args(args):
    """One-line errors for inconsistent flags, before any work."""
    ncrops = check_crops_for_assign(args)
    if ncrops < 2:
        raise UsageError("SwAV needs at least 2 crops (--nmb_crops)")
    if args.nmb_prototypes < 1:
        raise UsageError(f"--nmb_prototypes must be >= 1, got {args.nmb_prototypes}")
    if args.feat_dim < 1:
        raise UsageError(f"--feat_dim must be >= 1, got {args.feat_dim}")
    if args.epsilon <= 0 or args.temperature <= 0:
        raise UsageError("--epsilon and --temperature must be > 0")
    check_data_path(args.data_path)


def swav_loss(output, q_per_crop, crops_for_assign, nmb_crops_total, bs, temperature):
    """Swapped prediction: each assigned crop's codes q predict every other crop's softmax."""
    loss = 0
    for crop_id, q in zip(crops_for_assign, q_per_crop):
        subloss = 0
        for v in np.delete(np.arange(nmb_crops_total), crop_id):
            x = output[bs * v: bs * (v + 1)].float() / temperature
            subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss += subloss / (nmb_crops_total - 1)
    return loss / len(crops_for_assign)


def normalize_prototypes(net):
    """L2-normalise the prototype rows in place (no gradient): the scores are cosines."""
    with torch.no_grad():
        w = net.prototypes.weight.data.clone()
        w = nn.functional.normalize(w, dim=1, p=2)
        net.prototypes.weight.copy_(w)


@torch.no_grad()
def use_and_update_queue(queue, i, out, embedding, prototypes, use_the_queue):
    """Queue i (of assigned crop i) at one iteration. Used once it is in use or full (its last
    row is non-zero): its stored embeddings, scored with the *current* prototypes, go before
    this batch's scores `out`, so Sinkhorn balances the codes over more samples than a batch.
    Then it shifts by one batch and takes this batch's `embedding` at its front (FIFO).
    Returns (the scores Sinkhorn gets, use_the_queue)."""
    bs = out.size(0)
    if use_the_queue or not torch.all(queue[i, -1, :] == 0):
        use_the_queue = True
        out = torch.cat((torch.mm(queue[i], prototypes.t()), out.float()))
    queue[i, bs:] = queue[i, :-bs].clone()
    queue[i, :bs] = embedding
    return out, use_the_queue


def train(train_loader, model, optimizer, epoch, lr_schedule, queue, args, *, scaler=None,
          precision=None, start_iter=0, state=None, monitor=None):
    """One epoch. Returns ((epoch, average loss), queue) like the original's train().

    `precision`: main's (src/amp.py Precision); without it, decided here from the flags and the
    model's device (with `scaler` when given). `state` (an EpochState) carries `use_the_queue`
    across a mid-epoch resume."""
    net = unwrap(model)
    model.train()
    device = next(net.parameters()).device
    precision = precision or Precision.from_args(args, device, scaler)
    state = state if state is not None else EpochState()
    use_the_queue = bool(state.use_the_queue)
    progress = EpochProgress(train_loader, epoch, args, start_iter, state=state, monitor=monitor)
    ncrops = int(np.sum(args.nmb_crops))

    for it, iteration, inputs in progress:
        # the rate of this iteration (linear warm-up, then cosine: one value per iteration)
        set_lr(optimizer, lr_schedule[iteration])

        # normalise the prototypes: the scores below are cosine similarities
        normalize_prototypes(net)

        # ============ multi-res forward passes ... ============
        # one backbone pass per crop resolution; uint8 crops, normalised on the device
        inputs = to_device(inputs, device)
        with precision.autocast():
            embedding, output = model(inputs)
        embedding = embedding.detach()
        bs = inputs[0].size(0)

        # ============ codes: queue, then Sinkhorn (no gradient) ... ============
        q_per_crop = []
        for i, crop_id in enumerate(args.crops_for_assign):
            with torch.no_grad():
                out = output[bs * crop_id: bs * (crop_id + 1)].detach()
                if queue is not None:
                    out, use_the_queue = use_and_update_queue(
                        queue, i, out, embedding[crop_id * bs: (crop_id + 1) * bs],
                        net.prototypes.weight, use_the_queue)
                # equipartitioned codes; the queue's rows only widen the balance: keep the batch's
                q_per_crop.append(distributed_sinkhorn(out, args.epsilon,
                                                       args.sinkhorn_iterations)[-bs:])

        # ============ swapped prediction ... ============
        loss = swav_loss(output, q_per_crop, args.crops_for_assign, ncrops, bs, args.temperature)

        # ============ backward, prototype freezing, optim step ... ============
        backward(loss, optimizer, precision.scaler, iteration, progress)
        freeze_prototypes(model, iteration, args.freeze_prototypes_niters)
        optimizer_step(loss, model, optimizer, precision.scaler, iteration, progress)

        # ============ misc ... ============
        # the loss is read once per log interval (no host sync per step): by progress, which
        # also gives it to the collapse monitor (loss at ln(K): warns, or stops every rank)
        progress.update(it, loss, bs, optimizer.param_groups[0]["lr"])
        if monitor is not None:
            monitor.update(None, codes=q_per_crop, iteration=iteration)
    if monitor is not None:
        monitor.epoch_summary(epoch)
    state.use_the_queue = use_the_queue
    return (epoch, progress.losses.avg), queue


def queue_full(queue):
    """Whether each crop's queue is full: its last (oldest) row non-zero, the test in
    use_and_update_queue."""
    return not bool((queue[:, -1, :] == 0).all(dim=-1).any())


def queue_path(args):
    return os.path.join(args.dump_path, "queue" + str(args.rank) + ".pth")


def load_queue(args, expected_shape, to_restore):
    """This rank's queue at resume. A checkpoint of ours holds every rank's queue (saved with
    it, so always consistent): on another number of processes or batch size it is re-sharded
    (src/checkpoint.reshard: the global queue keeps its rows and their age order), and a
    changed --queue_length keeps the newest rows. For a checkpoint of the original, read this
    rank's queue file (same world size only: it does not record its batch size). The queue is
    checked against the current flags."""
    saved = to_restore.get("args")
    if saved is not None:  # written by this code base
        queues = to_restore.get("queue")
        if queues is None:
            return None
        path = os.path.join(args.dump_path, "checkpoint.pth.tar")
        crops, rows, dim = expected_shape[0], expected_shape[1] * args.world_size, expected_shape[2]
        if tuple(queues.shape[1:2]) + tuple(queues.shape[3:]) != (crops, dim):
            raise CheckpointError(f"{path}: queues of shape {tuple(queues.shape[1:])} do not fit "
                                  f"this run (--crops_for_assign, --feat_dim: {crops} x {dim})")
        old_rows = queues.shape[0] * queues.shape[2]
        if old_rows != rows:
            logger.warning(f"queue length {old_rows} -> {rows}: the newest "
                           f"{min(old_rows, rows)} rows are kept" + (
                               ", the rest starts empty" if rows > old_rows else ""))
        queue = this_ranks_share({"queue": queues}, saved["batch_size"], args, rows, {"queue": 1},
                                 what=f"{path}: the queue")["queue"]
    else:
        path = queue_path(args)
        if not os.path.isfile(path):
            return None
        queue = safe_load(path)["queue"]
    if tuple(queue.shape) != tuple(expected_shape):
        raise CheckpointError(f"{path}: queue of shape {tuple(queue.shape)} does not fit this run "
                              f"(expected {tuple(expected_shape)} from --crops_for_assign, "
                              "--queue_length, --batch_size, world size and --feat_dim)")
    return queue.to(args.device)


def with_rounded_queue_length(args, global_batch):
    """The flags the run uses and records (params.pkl, the log, the checkpoint's "args" and the
    comparison on resume): a copy of `args` (left as parsed) whose --queue_length is rounded
    down to a multiple of the global batch, as the original rounds it."""
    return argparse.Namespace(**{**vars(args),
                                 "queue_length": args.queue_length - args.queue_length % global_batch})


def main(args):
    check_args(args)
    du.init_distributed_mode(args)
    global_batch = args.batch_size * args.world_size
    if 0 < args.queue_length < global_batch:
        raise UsageError(f"--queue_length {args.queue_length} is smaller than the global batch "
                         f"{global_batch} (--batch_size x processes): the queue would be empty")
    args = with_rounded_queue_length(args, global_batch)
    fix_random_seeds(args.seed)
    logger_, training_stats = initialize_exp(args, "epoch", "loss")
    preemption.install()  # USR1/TERM/INT: finish the step, checkpoint mid-epoch, then exit

    # build data: the images of --data_path in any layout, looked for once per job
    train_dataset, train_loader = build_train_data(args, lambda images: MultiCropDataset(
        images, args.size_crops, args.nmb_crops, args.min_scale_crops, args.max_scale_crops,
        blur=args.blur, strict_data=args.strict_data, augment=args.augment))

    # build model (--nmb_prototypes prototypes) on its device (DDP), with LARC + SGD, the lr
    # schedule and the precision
    model, optimizer, lr_schedule, precision = build_pretraining(args, len(train_loader))

    # optionally resume from a checkpoint; a mid-epoch one (preemption) resumes its epoch at
    # state.start_iter with its state
    to_restore = resume_training_state(args, model, optimizer, precision.scaler, training_stats,
                                       extra_keys=["queue"])
    start_epoch, state = to_restore["epoch"], to_restore["epoch_state"]

    # build the queue: this rank's share of the global queue
    queue_shape = (len(args.crops_for_assign), args.queue_length // args.world_size, args.feat_dim)
    queue = None
    if args.queue_length > 0:
        queue = load_queue(args, queue_shape, to_restore)
    if queue is not None and state.use_the_queue and not queue_full(queue):
        # a queue grown at resume (--queue_length, --allow_batch_change) has empty rows: as a new
        # queue it waits until full (the original's rule), its zero rows kept out of Sinkhorn
        logger.warning("the resumed queue has empty rows: it is used again once full")
        state.use_the_queue = False

    # the loss sits near ln(K) while the prototypes are frozen: count from their release
    monitor = CollapseMonitor.from_args(args, args.nmb_prototypes,
                                        start_iter=args.freeze_prototypes_niters)
    tb = TensorBoard(args)
    for epoch in run_epochs(train_loader, start_epoch, args, state.start_iter):
        # optionally starts a queue
        if args.queue_length > 0 and epoch >= args.epoch_queue_starts and queue is None:
            queue = torch.zeros(queue_shape, device=args.device)

        scores, queue = train(train_loader, model, optimizer, epoch, lr_schedule, queue, args,
                              precision=precision, monitor=monitor, start_iter=state.start_iter,
                              state=state)

        # save checkpoints: every rank's queue goes in the checkpoint (and, as in the
        # original, in a per-rank queue file)
        extra = {}
        if queue is not None:
            extra["queue"] = gather_to_rank0(queue)
            atomic_save({"queue": queue, "epoch": epoch + (0 if state.cut else 1)},
                        queue_path(args))
        # stats row and TensorBoard (a whole epoch only); checkpoint (mid-epoch if a stop
        # request cut the epoch); requeue and exit
        end_epoch(args, epoch, model, optimizer, precision.scaler, training_stats, scores, state,
                  extra,
                  tb=tb, scalars=("swav", dict(loss=scores[1], lr=optimizer.param_groups[0]["lr"],
                                               prototypes_in_use=monitor.share_in_use())))
        state = EpochState()
    tb.close()
    return training_stats


if __name__ == "__main__":
    run_main(main, argparse.ArgumentParser("SwAV pre-training", parents=[get_args_parser()]))

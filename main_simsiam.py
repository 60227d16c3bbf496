"""SimSiam pre-training (Chen & He, CVPR 2021) on this project's data, model, distributed,
mixed-precision, checkpoint and logging code: same math as facebookresearch/simsiam."""
import argparse
import logging

import torch

from src import distributed as du
from src import preemption
from src.amp import Precision
from src.checkpoint import unwrap
from src.cli import (add_backbone_args, add_data_backend_arg, add_distributed_args, add_run_args,
                     run_main)
from src.data import build_train_data, to_device
from src.engine import build_precision, configure_backends, prepare_model, run_epochs
from src.errors import UsageError
from src.imagelist import check_data_path
from src.multicropdataset import BLURS
from src.progress import EpochProgress
from src.resnet50 import build_backbone
from src.runstate import EpochState, end_epoch, resume_training_state
from src.simsiam import (COLLAPSE_WARN_RATIO, SimSiam, TwoViewDataset, no_collapse_std,
                         normalized_std_tensor, optimizer_groups, simsiam_loss, simsiam_lr_schedule)
from src.step import backward_and_step, set_lr
from src.tensorboard import TensorBoard
from src.utils import bool_flag, fix_random_seeds, initialize_exp

logger = logging.getLogger()


def get_args_parser():
    parser = argparse.ArgumentParser(description="Implementation of SimSiam", add_help=False)

    #########################
    #### data parameters ####
    #########################
    parser.add_argument("--data_path", type=str, default="/path/to/imagenet",
                        help="path to dataset repository")
    parser.add_argument("--size_crop", type=int, default=224, help="resolution of the two views")
    parser.add_argument("--min_scale_crop", type=float, default=0.2,
                        help="RandomResizedCrop's lower scale bound")
    parser.add_argument("--max_scale_crop", type=float, default=1.0,
                        help="RandomResizedCrop's upper scale bound")
    parser.add_argument("--blur", type=str, default="pil", choices=BLURS,
                        help="Gaussian blur: PIL radius (the original), a 23x23 kernel, or none "
                             "(small images)")
    parser.add_argument("--strict_data", type=bool_flag, default=False,
                        help="stop on an unreadable image instead of skipping it with a warning")
    parser.add_argument("--augment", type=str, default="fast", choices=["fast", "pil"],
                        help="augmentation code: fast (src/fastaugment.py, the same distribution "
                             "of views, faster) or pil (the original torchvision pipeline)")
    add_data_backend_arg(parser)

    #########################
    ## simsiam specific params
    #########################
    parser.add_argument("--dim", type=int, default=2048, help="projector output dimension")
    parser.add_argument("--pred_dim", type=int, default=512, help="predictor hidden dimension")
    parser.add_argument("--proj_hidden_dim", type=int, default=0,
                        help="projector hidden dimension (0: the backbone's feature width, as "
                             "the original)")
    parser.add_argument("--fix_pred_lr", type=bool_flag, nargs="?", const=True, default=False,
                        help="keep the predictor at the initial lr (no cosine decay)")
    parser.add_argument("--zero_init_residual", type=bool_flag, default=True,
                        help="zero-init the last BN of each residual block (the original's)")

    #########################
    #### optim parameters ###
    #########################
    parser.add_argument("--epochs", default=100, type=int, help="number of total epochs to run")
    parser.add_argument("--batch_size", default=64, type=int,
                        help="batch size per process (the original: 512 = 8 GPUs x 64)")
    parser.add_argument("--base_lr", default=0.05, type=float,
                        help="lr for a total batch of 256: lr = base_lr x total batch / 256")
    parser.add_argument("--wd", default=1e-4, type=float, help="weight decay")

    #########################
    #### dist parameters ###
    #########################
    add_distributed_args(parser)

    #########################
    #### other parameters ###
    #########################
    add_backbone_args(parser)
    add_run_args(parser)
    return parser


def check_args(args):
    """One-line errors for inconsistent flags, before any work."""
    for name in ("dim", "pred_dim", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.proj_hidden_dim < 0:
        raise UsageError(f"--proj_hidden_dim must be >= 0, got {args.proj_hidden_dim}")
    if args.base_lr <= 0:
        raise UsageError(f"--base_lr must be > 0, got {args.base_lr}")
    if not 0 < args.min_scale_crop <= args.max_scale_crop <= 1:
        raise UsageError("crop scales must satisfy 0 < --min_scale_crop <= --max_scale_crop <= 1, "
                         f"got ({args.min_scale_crop}, {args.max_scale_crop})")
    check_data_path(args.data_path)


def train(train_loader, model, optimizer, epoch, lr_schedule, args, *, scaler=None,
          precision=None, start_iter=0, state=None):
    """One epoch. Returns (epoch, average loss, average collapse metric of the projector
    outputs); `model` may be DDP-wrapped or not, the device comes from its parameters.

    `state` (an EpochState) carries the epoch's averages across a mid-epoch stop and resume."""
    net = unwrap(model)
    model.train()
    device = next(net.parameters()).device
    precision = precision or Precision.from_args(args, device, scaler)
    state = state if state is not None else EpochState()
    progress = EpochProgress(train_loader, epoch, args, start_iter, state=state)
    # the collapse metric's average, summed on the device and read once, at the end of the epoch
    z_sum, z_count = torch.zeros((), dtype=torch.float64, device=device), 0
    if start_iter > 0 and state.z_std_meter:
        avg, z_count = state.z_std_meter
        z_sum += avg * z_count

    for it, iteration, (x1, x2) in progress:
        # update learning rate (groups marked fix_lr keep theirs)
        set_lr(optimizer, lr_schedule[iteration])
        x1, x2 = to_device([x1, x2], device)  # uint8 views, normalised on the device

        # ============ two views, symmetric loss with stop-gradient ... ============
        with precision.autocast():
            p1, p2, z1, z2 = model(x1, x2)
        loss = simsiam_loss(p1, p2, z1, z2)

        # ============ backward and optim step ... ============
        backward_and_step(loss, model, optimizer, precision.scaler, iteration, progress=progress)

        # ============ misc ... ============
        bs = x1.size(0)
        z_sum += 0.5 * (normalized_std_tensor(z1).double() + normalized_std_tensor(z2).double()) * bs
        z_count += bs
        progress.update(it, loss, bs, optimizer.param_groups[0]["lr"])  # read once per log
    z_avg = z_sum.item() / max(z_count, 1)
    if progress.stopped_at is not None:  # resumed later: continue this epoch's average
        state.z_std_meter = [z_avg, z_count]
    return epoch, progress.losses.avg, z_avg


def log_collapse(z_std, dim, epoch):
    """Log the collapse metric next to its no-collapse value; warn when it heads to 0."""
    reference = no_collapse_std(dim)
    logger.info(f"Epoch {epoch}: std of normalised projector outputs {z_std:.4f} "
                f"(no collapse: 1/sqrt({dim}) = {reference:.4f}; collapse: 0)")
    if z_std < COLLAPSE_WARN_RATIO * reference:
        logger.warning(f"Epoch {epoch}: the outputs are collapsing (std {z_std:.4f} < "
                       f"{COLLAPSE_WARN_RATIO} x {reference:.4f}): lower --base_lr, or check the "
                       "stop-gradient, the predictor and the batch size")


def main(args):
    check_args(args)
    du.init_distributed_mode(args)
    fix_random_seeds(args.seed)
    logger_, training_stats = initialize_exp(args, "epoch", "loss", "z_std")
    preemption.install()  # USR1/TERM/INT: finish the step, checkpoint mid-epoch, then exit

    # build data: the images of --data_path in any layout, looked for once per job
    train_dataset, train_loader = build_train_data(args, lambda images: TwoViewDataset(
        images, args.size_crop, args.min_scale_crop, args.max_scale_crop, blur=args.blur,
        strict_data=args.strict_data, augment=args.augment))

    # build model: a bare backbone (no SwAV head) under SimSiam's projector and predictor
    configure_backends(args)  # cuDNN autotuning, --tf32, before any forward
    backbone = build_backbone(args.arch, zero_init_residual=args.zero_init_residual,
                              cifar_stem=args.cifar_stem, width=args.width or None)
    model = SimSiam(backbone, args.dim, args.pred_dim, args.proj_hidden_dim)
    model = prepare_model(model, args, args.sync_bn)
    logger.info(model)
    logger.info("Building model done.")

    # build optimizer (plain SGD, no LARC) and the per-epoch cosine schedule
    init_lr = args.base_lr * args.batch_size * args.world_size / 256
    optimizer = torch.optim.SGD(optimizer_groups(model, args.fix_pred_lr), lr=init_lr,
                                momentum=0.9, weight_decay=args.wd)
    lr_schedule = simsiam_lr_schedule(init_lr, args.epochs, len(train_loader))
    precision = build_precision(args)
    logger.info(f"Building optimizer done: lr {init_lr:g} (base_lr {args.base_lr:g} x total "
                f"batch {args.batch_size * args.world_size} / 256)"
                + (", predictor at a fixed lr" if args.fix_pred_lr else ""))

    # optionally resume from a checkpoint; a mid-epoch one (preemption) resumes its epoch at
    # state.start_iter with its state
    to_restore = resume_training_state(args, model, optimizer, precision.scaler, training_stats)
    start_epoch, state = to_restore["epoch"], to_restore["epoch_state"]

    tb = TensorBoard(args)
    for epoch in run_epochs(train_loader, start_epoch, args, state.start_iter):
        scores = train(train_loader, model, optimizer, epoch, lr_schedule, args,
                       precision=precision, start_iter=state.start_iter, state=state)
        if not state.cut and args.rank == 0:  # a whole epoch (not cut by a stop request)
            log_collapse(scores[2], args.dim, epoch)
        # stats row and TensorBoard (a whole epoch only); checkpoint (mid-epoch if cut);
        # requeue and exit after a stop request
        end_epoch(args, epoch, model, optimizer, precision.scaler, training_stats, scores, state,
                  tb=tb,
                  scalars=("simsiam", dict(loss=scores[1], lr=optimizer.param_groups[0]["lr"],
                                           z_std=scores[2],
                                           z_std_no_collapse=no_collapse_std(args.dim))))
        state = EpochState()
    tb.close()
    return training_stats


if __name__ == "__main__":
    run_main(main, argparse.ArgumentParser("SimSiam pre-training", parents=[get_args_parser()]))

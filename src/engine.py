"""What every pre-training entry point shares: loader, model wrapping, optimiser and schedule,
the AMP backward/step, per-iteration logging and the training-state checkpoint.

Each entry point keeps only its own loss and its own per-epoch state (queue, memory bank, ...).
"""
import logging
import os
import time

import torch
import torch.nn as nn

from . import distributed as du
from .amp import autocast, make_scaler, resolve_amp, scaler_state_from_apex
from .checkpoint import (atomic_copy, atomic_save, get_rng_state,
                         model_state_dict, restart_from_checkpoint, set_rng_state)
from .lars import LARC
from .multicropdataset import SeededSampler
from .utils import AverageMeter, cosine_lr_schedule

logger = logging.getLogger()


class NonFiniteLossError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- set-up
def build_loader(dataset, args, batch_size=None, seeded=True):
    """DistributedSampler (resumable, per-sample augmentation seeds) + DataLoader, drop_last."""
    batch_size = batch_size or args.batch_size
    sampler = SeededSampler(dataset, num_replicas=args.world_size, rank=args.rank,
                            seed=args.seed, batch_size=batch_size, seeded=seeded)
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=batch_size, num_workers=args.workers,
        pin_memory=str(args.device).startswith("cuda"), drop_last=True,
        persistent_workers=args.workers > 0,
    )
    if len(loader) == 0:
        raise ValueError(f"the dataset has {len(dataset)} images: fewer than one batch of "
                         f"{batch_size} per process x {args.world_size} processes "
                         "(lower --batch_size)")
    return loader


def prepare_model(model, args):
    """SyncBN, device, DDP. Returns the (possibly wrapped) model."""
    model = du.convert_sync_batchnorm(model, args)
    model = model.to(args.device)
    if args.world_size > 1:
        device_ids = [args.gpu_to_work_on] if str(args.device).startswith("cuda") else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


def build_larc_sgd(model, args):
    """SGD(momentum 0.9, weight decay on every parameter) wrapped in LARC, as the original."""
    sgd = torch.optim.SGD(model.parameters(), lr=args.base_lr, momentum=0.9, weight_decay=args.wd)
    return LARC(optimizer=sgd, trust_coefficient=0.001, clip=False)


def build_lr_schedule(args, niter_per_ep):
    return cosine_lr_schedule(args.base_lr, args.final_lr, args.epochs, niter_per_ep,
                              args.warmup_epochs, args.start_warmup)


def setup_precision(args):
    """Resolve --use_fp16/--amp_dtype for this device; log the decision. Returns the scaler."""
    dtype, use_scaler, reason = resolve_amp(args.use_fp16, getattr(args, "amp_dtype", "auto"),
                                            args.device)
    logger.info(f"precision: {reason}")
    return make_scaler(use_scaler, args.device)


# ----------------------------------------------------------------------------- the step
def precision_of(model, args):
    """(device, autocast dtype or None) from the model's parameters and the flags."""
    device = next(model.parameters()).device
    dtype, _, _ = resolve_amp(getattr(args, "use_fp16", False), getattr(args, "amp_dtype", "auto"),
                              device)
    return device, dtype


def forward_context(model, args):
    device, dtype = precision_of(model, args)
    return autocast(device, dtype)


def backward_and_step(loss, model, optimizer, scaler, iteration, freeze_prototypes_niters=0):
    """zero_grad, (scaled) backward, drop prototype grads while frozen, optimiser step.

    Raises NonFiniteLossError for a NaN/inf loss before touching the weights."""
    if not torch.isfinite(loss.detach()):
        raise NonFiniteLossError(f"loss is {loss.item()} at iteration {iteration}: stopping "
                                 "(the last checkpoint was not overwritten)")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
    else:
        loss.backward()
    if iteration < freeze_prototypes_niters:
        for name, p in model.named_parameters():
            if "prototypes" in name:
                p.grad = None
    if scaler is not None and scaler.is_enabled():
        # unscale before LARC: its trust ratio needs the true gradient norms
        scaler.unscale_(optimizer.optim if isinstance(optimizer, LARC) else optimizer)
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


class EpochProgress:
    """Iterates a loader with data/batch timers and the original's 50-iteration log line."""

    def __init__(self, loader, epoch, args, start_iter=0, log_freq=50):
        self.loader, self.epoch, self.args = loader, epoch, args
        self.start_iter, self.log_freq = start_iter, log_freq
        self.batch_time, self.data_time, self.losses = AverageMeter(), AverageMeter(), AverageMeter()
        self.niter_per_ep = start_iter + len(loader)

    def __iter__(self):
        self.end = time.time()
        for it, batch in enumerate(self.loader, start=self.start_iter):
            self.data_time.update(time.time() - self.end)
            yield it, self.epoch * self.niter_per_ep + it, batch

    def update(self, it, loss, n, lr):
        """Record this iteration's loss; log every `log_freq` iterations on rank 0."""
        self.batch_time.update(time.time() - self.end)
        self.end = time.time()
        self.losses.update(loss, n)
        if getattr(self.args, "rank", 0) == 0 and it % self.log_freq == 0:
            eta = self.batch_time.avg * (self.niter_per_ep - it - 1)
            logger.info(
                "Epoch: [{0}][{1}]\t"
                "Time {batch_time.val:.3f} ({batch_time.avg:.3f})\t"
                "Data {data_time.val:.3f} ({data_time.avg:.3f})\t"
                "Loss {loss.val:.4f} ({loss.avg:.4f})\t"
                "Lr: {lr:.4f}\tETA epoch {eta:.0f}s".format(
                    self.epoch, it, batch_time=self.batch_time, data_time=self.data_time,
                    loss=self.losses, lr=lr, eta=eta))


def set_lr(optimizer, lr):
    for param_group in optimizer.param_groups:
        param_group["lr"] = float(lr)  # a numpy scalar would not load with weights_only


# ----------------------------------------------------------------------------- state
def gather_to_rank0(tensor):
    """Stack every rank's tensor (same shape) on the CPU: [world_size, ...] (all ranks call)."""
    if du.get_world_size() == 1:
        return tensor.detach().cpu().unsqueeze(0)
    parts = [torch.empty_like(tensor) for _ in range(du.get_world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.stack(parts).cpu()


def save_training_state(args, epoch, model, optimizer, scaler, extra=None):
    """Rank 0 writes dump_path/checkpoint.pth.tar atomically (original keys, `module.` prefix)
    and copies it to checkpoints/ckp-{epoch}.pth every checkpoint_freq epochs and at the end."""
    if args.rank != 0:
        return
    save_dict = {
        "epoch": epoch + 1,
        "state_dict": model_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "rng": get_rng_state(),
        "args": {k: v for k, v in vars(args).items()
                 if isinstance(v, (int, float, str, bool, list, type(None)))},
    }
    if scaler is not None and scaler.is_enabled():
        save_dict["scaler"] = scaler.state_dict()
    save_dict.update(extra or {})
    path = os.path.join(args.dump_path, "checkpoint.pth.tar")
    atomic_save(save_dict, path)
    if epoch % args.checkpoint_freq == 0 or epoch == args.epochs - 1:
        atomic_copy(path, os.path.join(args.dump_path, "checkpoints", f"ckp-{epoch}.pth"))


def resume_training_state(args, model, optimizer, scaler, extra_keys=()):
    """Resume from dump_path/checkpoint.pth.tar when present. Returns the run variables:
    epoch, rng and the entries named in `extra_keys` (None when absent)."""
    to_restore = {"epoch": 0, "rng": None, **{k: None for k in extra_keys}}
    path = os.path.join(args.dump_path, "checkpoint.pth.tar")
    loaded = restart_from_checkpoint(
        path, run_variables=to_restore, state_dict=model, optimizer=optimizer,
        scaler=_ScalerAdapter(scaler) if scaler is not None and scaler.is_enabled() else None)
    if loaded and to_restore["rng"] is not None:
        set_rng_state(to_restore["rng"])
    return to_restore


class _ScalerAdapter:
    """Loads a GradScaler from our 'scaler' entry or from an old apex 'amp' entry."""

    def __init__(self, scaler):
        self.scaler = scaler

    def load_state_dict(self, state):
        self.scaler.load_state_dict(scaler_state_from_apex(state))

"""What every pre-training entry point shares: loader, model wrapping, optimiser and schedule,
the AMP backward/step, per-iteration logging and the training-state checkpoint.

Each entry point keeps only its own loss and its own per-epoch state (queue, memory bank, ...).
"""
import logging
import math
import os
import time

import torch
import torch.nn as nn

from . import distributed as du
from . import preemption
from .amp import autocast, make_scaler, resolve_amp, scaler_state_from_apex
from .checkpoint import (CheckpointError, atomic_copy, atomic_save, check_resume_flags,
                         checkpoint_candidates, get_rng_state, map_start_iter, model_state_dict,
                         remove_stale_tmp_files, restart_from_checkpoint, set_rng_state,
                         truncate_stats)  # noqa: F401 (the entry points import it from here)
from .errors import UsageError
from .imagelist import DataError, find_images, read_list_file, read_list_header
from .lars import LARC
from .multicropdataset import SeededSampler, normalize_crops
from .utils import AverageMeter, cosine_lr_schedule

logger = logging.getLogger()


class NonFiniteLossError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- set-up
IMAGE_LIST = "image_list.txt"


def _reusable_image_list(file, data_path):
    """The ImageList in `file` when a previous run of this dump_path made it from this data_path
    (a list file given as data_path must not have changed since), else None."""
    if not os.path.isfile(file):
        return None
    made_from = read_list_header(file).get("root")
    if made_from != os.path.abspath(data_path):
        logger.warning(f"{file} was made from {made_from}, not {os.path.abspath(data_path)}: "
                       "listing the images again")
        return None
    if os.path.isfile(data_path) and os.path.getmtime(data_path) > os.path.getmtime(file):
        return None  # the list given was edited since
    return read_list_file(file, check_exists=False)


def job_image_list(args):
    """The images of --data_path, looked for once per job (a tree of millions of files on a
    network file system takes minutes to walk): rank 0 walks it, or reuses the list a previous
    run wrote into --dump_path from the same --data_path (a resumed run walks nothing), and
    writes dump_path/image_list.txt; the other ranks wait for its verdict and read that file."""
    file = os.path.join(args.dump_path, IMAGE_LIST)
    images, error = None, None
    if args.rank == 0:
        try:
            images = _reusable_image_list(file, args.data_path)
            reused = images is not None
            if not reused:
                images = find_images(args.data_path)
                images.save(file)
            logger.info(images.describe() + (f", from the list {file} an earlier run wrote"
                                             if reused else ""))
        except DataError as e:
            error = e
        except OSError as e:  # an unreadable list file, a dump_path it cannot write to
            error = DataError(f"cannot list the images of --data_path {args.data_path!r}: {e}")
    # every rank learns rank 0's verdict (a failing rank 0 must not leave the others waiting);
    # the collective is also the barrier after which the file is complete
    failed = torch.tensor([error is not None], dtype=torch.int32)  # du moves it for nccl
    if error is not None:
        du.all_reduce(failed)
        raise error
    if du.all_reduce(failed).item():
        raise DataError(f"rank 0 could not list the images of --data_path {args.data_path!r} "
                        "(its log says why)")
    if images is not None:
        return images
    try:
        return read_list_file(file, check_exists=False)
    except OSError as e:
        raise DataError(f"rank {args.rank} cannot read the image list rank 0 wrote ({e}): "
                        "--dump_path must be on a file system every node sees") from None


def build_train_data(args, make_dataset):
    """(dataset, loader) of a pre-training entry point: `make_dataset(image_list)` builds the
    dataset from the job's image list (job_image_list), then build_loader."""
    dataset = make_dataset(job_image_list(args))
    loader = build_loader(dataset, args)
    logger.info("Building data done with {} images loaded.".format(len(dataset)))
    return dataset, loader


def build_loader(dataset, args, batch_size=None, seeded=True, drop_last=True):
    """DistributedSampler (resumable, per-sample augmentation seeds) + DataLoader. Pre-training
    drops the last partial batch (as the original); the evaluations keep it (drop_last=False,
    as the original's eval_linear / eval_semisup)."""
    batch_size = batch_size or args.batch_size
    sampler = SeededSampler(dataset, num_replicas=args.world_size, rank=args.rank,
                            seed=args.seed, batch_size=batch_size, seeded=seeded)
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=batch_size, num_workers=args.workers,
        pin_memory=str(args.device).startswith("cuda"), drop_last=drop_last,
        persistent_workers=args.workers > 0,
    )
    if len(loader) == 0:
        raise UsageError(f"the dataset has {len(dataset)} images: fewer than one batch of "
                         f"{batch_size} per process x {args.world_size} processes "
                         "(lower --batch_size)")
    return loader


def prepare_model(model, args):
    """SyncBN, device, channels_last, DDP. Returns the (possibly wrapped) model.

    channels_last (NHWC, `--channels_last`, on by default) is the layout the convolution
    libraries are fastest with (cuDNN tensor cores, oneDNN); same math, other summation order."""
    model = du.convert_sync_batchnorm(model, args)
    model = model.to(args.device)
    if getattr(args, "channels_last", True):
        model = model.to(memory_format=torch.channels_last)
    if args.world_size > 1:
        device_ids = [args.gpu_to_work_on] if str(args.device).startswith("cuda") else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


def build_pretraining(model, args, niter_per_ep):
    """SwAV / DeepCluster-v2 set-up around a built model: SyncBN, device, DDP, LARC + SGD, the
    per-iteration schedule and the precision. Returns (model, optimizer, lr_schedule, scaler)."""
    model = prepare_model(model, args)
    logger.info(model)
    logger.info("Building model done.")
    optimizer = build_larc_sgd(model, args)
    lr_schedule = build_lr_schedule(args, niter_per_ep)
    scaler = setup_precision(args)
    logger.info("Building optimizer done.")
    return model, optimizer, lr_schedule, scaler


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
    scaler = make_scaler(use_scaler, args.device)
    scaler.nonfinite_guard = NonFiniteGuard(getattr(args, "max_nonfinite_steps", 20))
    return scaler


def configure_backends(args):
    """The CUDA kernel settings of the pre-trainings and the evaluations: cuDNN autotuning (the
    input shapes are fixed, so the fastest convolution algorithm is found once per shape) and
    TF32 for fp32 matmuls and convolutions only with --tf32 (see its help). No-op on a CPU."""
    if not str(args.device).startswith("cuda"):
        return
    torch.backends.cudnn.benchmark = True
    tf32 = bool(getattr(args, "tf32", False))
    torch.backends.cuda.matmul.allow_tf32 = tf32  # the legacy API: test_gpu's fixture uses it
    torch.backends.cudnn.allow_tf32 = tf32  # (mixing it with fp32_precision raises)
    logger.info("cuDNN autotuning on; fp32 matmuls and convolutions in "
                + ("TF32 (--tf32 true)" if tf32 else "IEEE fp32 (--tf32 false)"))


# ----------------------------------------------------------------------------- the feed
def to_device(crops, device):
    """A batch from the loader (a tensor or a list of crops) on `device`, float32: each copy is
    non-blocking (from the loader's pinned memory on CUDA, so the host queues the next work while
    the bytes travel) and uint8 crops (the multi-crop transforms' output) are normalised there,
    as the original's ToTensor + Normalize would have on the host (src/multicropdataset.py
    normalize_crops). Float tensors pass through unchanged."""
    if isinstance(crops, (list, tuple)):
        return [to_device(c, device) for c in crops]
    crops = crops.to(device, non_blocking=True)
    return normalize_crops(crops) if crops.dtype == torch.uint8 else crops


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


def backward_and_step(loss, model, optimizer, scaler, iteration, freeze_prototypes_niters=0,
                      progress=None):
    """zero_grad, (scaled) backward, drop prototype grads while frozen, optimiser step.

    Without a loss scaler, a NaN/inf loss or gradient raises NonFiniteLossError. Under an fp16
    GradScaler an overflow skips the step (normal now and then); `scaler.nonfinite_guard` (see
    setup_precision) stops after too many in a row.

    progress=None: checked now, before the update (a host sync per check). Given the epoch's
    EpochProgress (the training loops), the checks are kept on the device and read with the
    losses once per log interval (no host sync per step but the scaler's own inf check): a
    non-finite loss or gradient then stops the run at that read, up to a log interval after the
    bad update, but always before the epoch ends or a mid-epoch checkpoint is written, so no
    weights updated from non-finite values are ever saved."""
    scaled = scaler is not None and scaler.is_enabled()
    if progress is None:
        loss_finite = bool(torch.isfinite(loss.detach()))
        if not loss_finite and not scaled:
            raise NonFiniteLossError(f"loss is {loss.item()} at iteration {iteration}: stopping "
                                     "(the last checkpoint was not overwritten)")
    optimizer.zero_grad(set_to_none=True)
    if scaled:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    if iteration < freeze_prototypes_niters:
        for name, p in model.named_parameters():
            if "prototypes" in name:
                p.grad = None
    if scaled:
        # unscale before LARC's trust ratio, which needs the true gradient norms. The scaler
        # keeps its unscaled/stepped state per optimizer object: unscale and step the same one
        # (unscaling LARC's inner optimizer then stepping LARC would divide by the scale twice)
        scaler.unscale_(optimizer)
        if progress is not None:
            # what the scaler's step is about to read (its own sync): inf/NaN found by unscale_
            found = sum(f.to(loss.device) for f in scaler._found_inf_per_device(optimizer).values())
            scaler.step(optimizer)
            scaler.update()
            skipped = (found > 0) | ~torch.isfinite(loss.detach())
            progress.defer_check(iteration, skipped, None, scaler._get_scale_async(), scaler)
            return
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        # the scaler backs off its scale exactly when it found an inf/NaN and skipped the step
        skipped = scaler.get_scale() < scale or not loss_finite
        nonfinite_guard(scaler).record(skipped, iteration, loss.item(), scaler.get_scale())
    elif progress is not None:
        names, grads = _named_grads(model)
        bad, first = ~torch.isfinite(loss.detach()), torch.zeros((), device=loss.device)
        if grads:
            nonfinite = ~torch.isfinite(torch.stack(torch._foreach_norm(grads)))
            bad, first = bad | nonfinite.any(), nonfinite.int().argmax()
        progress.defer_check(iteration, bad, first, None, names)
        optimizer.step()
    else:
        bad = first_nonfinite_grad(model)
        if bad is not None:
            raise NonFiniteLossError(f"non-finite gradient of {bad} at iteration {iteration} "
                                     f"(loss {loss.item():.4f}): stopping before the update (the "
                                     "last checkpoint was not overwritten)")
        optimizer.step()


def nonfinite_guard(scaler):
    guard = getattr(scaler, "nonfinite_guard", None)
    if guard is None:
        guard = scaler.nonfinite_guard = NonFiniteGuard()
    return guard


def _named_grads(model):
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    return [n for n, _ in named], [g for _, g in named]


def first_nonfinite_grad(model):
    """Name of the first parameter whose gradient holds a NaN/inf, else None (one device sync)."""
    names, grads = _named_grads(model)
    if not grads:
        return None
    finite = torch.isfinite(torch.stack(torch._foreach_norm(grads)))
    if bool(finite.all()):
        return None
    return names[int((~finite).nonzero()[0, 0])]


class NonFiniteGuard:
    """Counts optimiser steps skipped for a non-finite loss or gradient under an fp16 loss
    scaler; `max_steps` in a row mean the run diverged (the scale only keeps halving): stop."""

    def __init__(self, max_steps=20):
        if max_steps < 1:
            raise UsageError(f"--max_nonfinite_steps must be >= 1, got {max_steps}")
        self.max_steps, self.consecutive, self.total = max_steps, 0, 0

    def record(self, skipped, iteration, loss, scale):
        if not skipped:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        logger.debug(f"iteration {iteration}: non-finite values, step skipped (loss {loss}, "
                     f"loss scale now {scale:g})")
        if self.consecutive >= self.max_steps:
            raise NonFiniteLossError(
                f"{self.consecutive} consecutive steps skipped for a non-finite loss or gradient "
                f"under the fp16 loss scaler, the last at iteration {iteration} (loss {loss}, "
                f"scale now {scale:g}): stopping (--max_nonfinite_steps {self.max_steps}; the "
                "last checkpoint was not overwritten)")


STOP_CHECK_EVERY = 10  # steps between two distributed stop checks, at most


class EpochProgress:
    """Iterates a loader with data/batch timers and the original's 50-iteration log line.

    Host syncs: `update` and `backward_and_step(..., progress=self)` keep each step's loss and
    non-finite checks on the device; `flush` reads them all in one host sync once per log
    interval (the logged iterations), at a stop and at the end of the epoch, and only then
    updates the loss average, the collapse monitor (`monitor`, fed the losses in order) and the
    non-finite checks (which may raise NonFiniteLossError).

    Preemption (src/preemption.py, once installed): every rank asks whether a stop was requested
    at the same steps (after every step in one process, where it is a flag; at each log
    iteration when distributed, where it is an all-reduce read in the same sync as the losses).
    If so, and steps remain, the epoch ends early with `stopped_at` = the next iteration.
    `state` (the entry point's per-epoch dict, saved in a mid-epoch checkpoint) then gets
    "stopped_at" and "loss_meter" (every rank's [sum, count]), and a resumed epoch given that
    state continues each rank's loss average, so the epoch's stats rows equal an uninterrupted
    run's."""

    def __init__(self, loader, epoch, args, start_iter=0, log_freq=None, state=None,
                 monitor=None):
        self.loader, self.epoch, self.args = loader, epoch, args
        # the original logs every 50 iterations; --log_freq changes it (e.g. a short demo)
        self.start_iter, self.log_freq = start_iter, log_freq or getattr(args, "log_freq", 50)
        self.batch_time, self.data_time, self.losses = AverageMeter(), AverageMeter(), AverageMeter()
        self.niter_per_ep = start_iter + len(loader)
        self.state, self.stopped_at, self.monitor = state, None, monitor
        self._losses, self._checks = [], []  # per step, not read yet (see flush)
        meters = (state or {}).get("loss_meter")
        if start_iter > 0 and meters:
            if len(meters) == du.get_world_size():
                self.losses.sum, self.losses.count = meters[du.get_rank()]
            else:  # resumed on another number of processes: an equal share of every rank's
                world = du.get_world_size()
                self.losses.sum = sum(m[0] for m in meters) / world
                self.losses.count = sum(m[1] for m in meters) / world
            self.losses.avg = self.losses.sum / max(self.losses.count, 1)

    def __iter__(self):
        self.end = time.time()
        distributed = du.get_world_size() > 1
        for it, batch in enumerate(self.loader, start=self.start_iter):
            self.data_time.update(time.time() - self.end)
            yield it, self.epoch * self.niter_per_ep + it, batch
            stop = False
            log = it % self.log_freq == 0
            # distributed, the stop request is an all-reduce read in one host sync with the
            # losses: at the log iterations, and at least every STOP_CHECK_EVERY steps so that
            # a SIGTERM's checkpoint fits Slurm's 30 s grace however rarely the run logs
            if log or (distributed and it % STOP_CHECK_EVERY == 0):
                flag = preemption.stop_flag() if distributed else None
                reduced = self.flush(flag)
                if log:
                    self.log(it)
                stop = preemption.should_stop(reduced)
            elif not distributed:
                stop = preemption.should_stop()
            # a stop after the last step is an ordinary end of epoch
            if stop and it + 1 < self.niter_per_ep:
                self.stopped_at = it + 1
                self.flush()
                if self.state is not None:  # rank 0 saves it: gather every rank's meter
                    meter = torch.tensor([self.losses.sum, self.losses.count], dtype=torch.float64)
                    meters = du.all_gather(meter)
                    self.state["stopped_at"] = self.stopped_at
                    self.state["loss_meter"] = [[m[0].item(), int(m[1].item())] for m in meters]
                logger.info(f"epoch {self.epoch} stopped after iteration {it} of "
                            f"{self.niter_per_ep}")
                break
        self.flush()  # before train() returns, so before any checkpoint of this epoch
        # unreadable images were skipped (in the loader workers): say how many this epoch
        nbad = getattr(getattr(self.loader, "dataset", None), "pop_bad_images", lambda: 0)()
        if nbad:
            on_rank = f" on rank {self.args.rank}" if getattr(self.args, "world_size", 1) > 1 else ""
            logger.warning(f"epoch {self.epoch}: {nbad} unreadable image(s) skipped{on_rank}, "
                           "each replaced by the next readable one (the warnings above name "
                           "them; --strict_data stops on the first instead)")

    def update(self, it, loss, n, lr):
        """Record this iteration's loss (a tensor: read later, by flush; or a number)."""
        self.batch_time.update(time.time() - self.end)
        self.end = time.time()
        self.lr = lr
        self._losses.append((it, loss.detach() if torch.is_tensor(loss) else float(loss), n))

    def defer_check(self, iteration, bad, first_bad, scale, names_or_scaler):
        """backward_and_step's non-finite check of one step, on the device (see flush)."""
        self._checks.append((iteration, bad, first_bad, scale, names_or_scaler))

    def flush(self, extra=None):
        """Read every recorded loss and check, and `extra` (a 1-element tensor), in one host
        sync; apply the checks (may raise NonFiniteLossError), then feed the loss meter and the
        monitor in order. Returns extra's value (None without it)."""
        tensors = [loss for _, loss, _ in self._losses if torch.is_tensor(loss)]
        for _, bad, first, scale, _ in self._checks:
            tensors += [t for t in (bad, first, scale) if t is not None]
        if extra is not None:
            tensors.append(extra)
        if not tensors:
            return None
        device = tensors[0].device
        values = iter(torch.cat([t.detach().reshape(-1).to(device, torch.float64)
                                 for t in tensors]).tolist())  # the one host sync
        losses = [(it, next(values) if torch.is_tensor(v) else v, n) for it, v, n in self._losses]
        checks = [(i, next(values), None if f is None else int(next(values)),
                   None if sc is None else next(values), names)
                  for i, bad, f, sc, names in self._checks]
        reduced = next(values) if extra is not None else None
        self._losses, self._checks = [], []
        loss_at = {self.epoch * self.niter_per_ep + it: v for it, v, _ in losses}
        for iteration, bad, first, scale, names in checks:
            loss = loss_at.get(iteration, float("nan"))
            if scale is not None:  # a GradScaler skipped the step: counted by its guard
                nonfinite_guard(names).record(bool(bad), iteration, loss, scale)
            elif bad:
                self._losses = []
                if not math.isfinite(loss):
                    raise NonFiniteLossError(f"loss is {loss} at iteration {iteration}: stopping "
                                             "(the last checkpoint was not overwritten)")
                raise NonFiniteLossError(
                    f"non-finite gradient of {names[first]} at iteration {iteration} (loss "
                    f"{loss:.4f}): stopping before any checkpoint (the last checkpoint was not "
                    "overwritten)")
        for it, value, n in losses:
            self.losses.update(value, n)
            if self.monitor is not None:  # collapse: the loss at ln(K) (warns, or stops)
                self.monitor.update(value, iteration=self.epoch * self.niter_per_ep + it)
        return reduced

    def log(self, it):
        """The original's progress line, on rank 0."""
        if getattr(self.args, "rank", 0) != 0:
            return
        eta = self.batch_time.avg * (self.niter_per_ep - it - 1)
        logger.info(
            "Epoch: [{0}][{1}]\t"
            "Time {batch_time.val:.3f} ({batch_time.avg:.3f})\t"
            "Data {data_time.val:.3f} ({data_time.avg:.3f})\t"
            "Loss {loss.val:.4f} ({loss.avg:.4f})\t"
            "Lr: {lr:.4f}\tETA epoch {eta:.0f}s".format(
                self.epoch, it, batch_time=self.batch_time, data_time=self.data_time,
                loss=self.losses, lr=getattr(self, "lr", 0.0), eta=eta))


def run_epochs(train_loader, start_epoch, args, start_iter=0):
    """The frame of an entry point's epoch loop: yields start_epoch .. args.epochs - 1, each
    logged and with the sampler set to it (the first one from batch `start_iter`, for a
    mid-epoch resume; the CUDA settings of configure_backends); once the loop is done, every
    rank waits for the others and the end is logged."""
    configure_backends(args)
    for epoch in range(start_epoch, args.epochs):
        logger.info("============ Starting epoch %i ... ============" % epoch)
        train_loader.sampler.set_epoch(epoch, start_iter if epoch == start_epoch else 0)
        yield epoch
    du.barrier()
    logger.info("Training done: checkpoint at %s",
                os.path.join(args.dump_path, "checkpoint.pth.tar"))


def end_epoch(args, epoch, model, optimizer, scaler, training_stats, scores, state, extra=None):
    """After an entry point's train() (every rank calls): the epoch's stats row, unless a stop
    request cut the epoch (`state["stopped_at"]`, see EpochProgress); the checkpoint with
    `extra`, mid-epoch with the rest of `state` as "epoch_state" when cut; then, once a stop was
    requested, the requeue and exit (src/preemption.py)."""
    stopped_at = state.pop("stopped_at", None)
    if stopped_at is None:
        training_stats.update(scores)
    extra = dict(extra or {})
    if stopped_at:
        extra["epoch_state"] = state
    save_training_state(args, epoch, model, optimizer, scaler, extra, start_iter=stopped_at)
    if preemption.should_stop() and (stopped_at or epoch + 1 < args.epochs):
        preemption.exit_after_checkpoint(args)  # requeues under Slurm; raises SystemExit


def set_lr(optimizer, lr):
    """Set every group's rate, except groups marked `fix_lr` (SimSiam's --fix_pred_lr)."""
    for param_group in optimizer.param_groups:
        if param_group.get("fix_lr", False):
            continue
        param_group["lr"] = float(lr)  # a numpy scalar would not load with weights_only


# ----------------------------------------------------------------------------- state
def gather_to_rank0(tensor):
    """Every rank's tensor (same shape) stacked on rank 0's CPU: [world_size, ...]; None on
    the other ranks, which save nothing (all ranks call; only rank 0 receives the data)."""
    parts = du.gather(tensor.detach(), dst=0)
    return None if parts is None else torch.stack(parts).cpu()


def save_training_state(args, epoch, model, optimizer, scaler, extra=None, start_iter=0):
    """Rank 0 writes dump_path/checkpoint.pth.tar atomically (original keys, `module.` prefix)
    and copies it to checkpoints/ckp-{epoch}.pth every checkpoint_freq epochs and at the end.

    start_iter > 0: a mid-epoch checkpoint (preemption): "epoch" is this epoch (not the next)
    and "start_iter" the iteration to resume at; it is not copied to checkpoints/."""
    if args.rank != 0:
        return
    save_dict = {
        "epoch": epoch + 1 if not start_iter else epoch,
        "state_dict": model_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "rng": get_rng_state(),
        "args": {k: v for k, v in vars(args).items()
                 if isinstance(v, (int, float, str, bool, list, type(None)))},
    }
    if scaler is not None and scaler.is_enabled():
        save_dict["scaler"] = scaler.state_dict()
    if start_iter:
        save_dict["start_iter"] = int(start_iter)
    save_dict.update(extra or {})
    path = os.path.join(args.dump_path, "checkpoint.pth.tar")
    atomic_save(save_dict, path)
    if start_iter:
        logger.info(f"mid-epoch checkpoint: epoch {epoch} resumes at iteration {start_iter}")
    elif epoch % args.checkpoint_freq == 0 or epoch == args.epochs - 1:
        atomic_copy(path, os.path.join(args.dump_path, "checkpoints", f"ckp-{epoch}.pth"))


def resume_training_state(args, model, optimizer, scaler, extra_keys=()):
    """Resume from `--resume PATH` (must load), else from dump_path/checkpoint.pth.tar or, when
    that one is corrupt, the newest loadable checkpoints/ckp-N.pth (with a warning). Returns the
    run variables: epoch, rng, start_iter (0 unless the checkpoint was written mid-epoch),
    epoch_state (the mid-epoch per-epoch state, else None), args (the checkpoint's flags) and
    the entries named in `extra_keys` (None when absent).

    On any number of processes (check_resume_flags: flag changes logged, a change of the global
    batch refused unless --allow_batch_change): the lr schedule of this run continues at
    epoch x (its iterations per epoch) + start_iter, start_iter mapped by samples seen when the
    global batch changed (map_start_iter); the entry points re-shard their per-rank state."""
    to_restore = {"epoch": 0, "rng": None, "start_iter": 0, "epoch_state": None, "args": None,
                  **{k: None for k in extra_keys}}
    explicit = getattr(args, "resume", "") or ""
    if explicit and not os.path.isfile(explicit):
        raise CheckpointError(f"--resume {explicit}: no such file")
    if args.rank == 0:
        remove_stale_tmp_files(args.dump_path, os.path.join(args.dump_path, "checkpoints"))
    loaded = restart_from_checkpoint(
        [explicit] if explicit else checkpoint_candidates(args.dump_path), fallback=not explicit,
        run_variables=to_restore, state_dict=model, optimizer=optimizer,
        scaler=_ScalerAdapter(scaler) if scaler is not None and scaler.is_enabled() else None)
    if not loaded:
        return to_restore
    old_global = check_resume_flags(to_restore["args"], args, loaded)
    to_restore["start_iter"] = map_start_iter(to_restore["start_iter"], old_global,
                                              args.batch_size * args.world_size,
                                              to_restore["epoch"])
    if to_restore["rng"] is not None:
        set_rng_state(to_restore["rng"])
    if to_restore["start_iter"]:
        logger.info(f"resuming epoch {to_restore['epoch']} at iteration {to_restore['start_iter']} "
                    "(mid-epoch checkpoint)")
    return to_restore


class _ScalerAdapter:
    """Loads a GradScaler from our 'scaler' entry or from an old apex 'amp' entry."""

    def __init__(self, scaler):
        self.scaler = scaler

    def load_state_dict(self, state):
        self.scaler.load_state_dict(scaler_state_from_apex(state))

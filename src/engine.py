"""The pre-trainings' set-up around a built model: wrapping (SyncBN, device, DDP), LARC + SGD,
the per-iteration schedule, the precision decided once, the CUDA settings, and the frame of the
epoch loop.

The rest of what the entry points share has one module per job (re-exported here under the
names the tools, tests and benchmarks import from src.engine):
src/data.py (image list, loader, device copy), src/step.py (lr, backward, prototype freezing,
optimiser step), src/progress.py (EpochProgress), src/runstate.py (EpochState, the training
checkpoint, end of epoch), src/amp.py (Precision, the non-finite guard).
"""
import logging
import os

import torch
import torch.nn as nn

from . import distributed as du
from .amp import NonFiniteGuard, NonFiniteLossError, Precision  # noqa: F401
from .checkpoint import truncate_stats  # noqa: F401 (the entry points import it from here)
from .data import (IMAGE_LIST, build_loader, build_train_data, job_image_list,  # noqa: F401
                   to_device)
from .lars import LARC
from .progress import EpochProgress  # noqa: F401
from .resnet50 import build_backbone
from .runstate import (EpochState, end_epoch, gather_to_rank0,  # noqa: F401
                       resume_training_state, save_training_state)
from .step import (backward, backward_and_step, first_nonfinite_grad,  # noqa: F401
                   freeze_prototypes, optimizer_step, set_lr)
from .utils import cosine_lr_schedule

logger = logging.getLogger()


def prepare_model(model, args, sync_bn):
    """SyncBN (`sync_bn`: a --sync_bn mode, src/distributed.py convert_sync_batchnorm), device,
    channels_last, DDP. Returns the (possibly wrapped) model.

    channels_last (NHWC, `--channels_last`, on by default) is the layout the convolution
    libraries are fastest with (cuDNN tensor cores, oneDNN); same math, other summation order."""
    model = du.convert_sync_batchnorm(model, args, sync_bn)
    model = model.to(args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.world_size > 1:
        device_ids = [args.gpu_to_work_on] if str(args.device).startswith("cuda") else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


def build_pretraining(args, niter_per_ep):
    """SwAV / DeepCluster-v2 set-up: the backbone with its projection head and prototypes (one
    head of K, or one per K when --nmb_prototypes is a list: src/resnet50.py MultiPrototypes),
    SyncBN, device, DDP, LARC + SGD, the per-iteration schedule and the precision. Returns
    (model, optimizer, lr_schedule, precision)."""
    configure_backends(args)  # before any forward: DeepCluster-v2 fills its memory bank first
    model = build_backbone(args.arch, normalize=True, hidden_mlp=args.hidden_mlp,
                           output_dim=args.feat_dim, nmb_prototypes=args.nmb_prototypes,
                           cifar_stem=args.cifar_stem, width=args.width or None)
    model = prepare_model(model, args, args.sync_bn)
    logger.info(model)
    logger.info("Building model done.")
    optimizer = build_larc_sgd(model, args)
    lr_schedule = build_lr_schedule(args, niter_per_ep)
    precision = build_precision(args)
    logger.info("Building optimizer done.")
    return model, optimizer, lr_schedule, precision


def build_larc_sgd(model, args):
    """SGD(momentum 0.9, weight decay on every parameter) wrapped in LARC, as the original."""
    sgd = torch.optim.SGD(model.parameters(), lr=args.base_lr, momentum=0.9, weight_decay=args.wd)
    return LARC(optimizer=sgd, trust_coefficient=0.001, clip=False)


def build_lr_schedule(args, niter_per_ep):
    return cosine_lr_schedule(args.base_lr, args.final_lr, args.epochs, niter_per_ep,
                              args.warmup_epochs, args.start_warmup)


def build_precision(args):
    """The run's Precision (src/amp.py) on its device, decided once here and logged."""
    precision = Precision.from_args(args, args.device)
    logger.info(f"precision: {precision.reason}")
    return precision


def setup_precision(args):
    """build_precision's scaler (the tests and benchmarks hand it to train(scaler=...))."""
    return build_precision(args).scaler


def configure_backends(args):
    """The CUDA kernel settings of the pre-trainings and the evaluations: cuDNN autotuning (the
    input shapes are fixed, so the fastest convolution algorithm is found once per shape) and
    TF32 for fp32 matmuls and convolutions only with --tf32 (see its help). No-op on a CPU."""
    if not str(args.device).startswith("cuda"):
        return
    torch.backends.cudnn.benchmark = True
    tf32 = bool(args.tf32)
    torch.backends.cuda.matmul.allow_tf32 = tf32  # the legacy API: test_gpu's fixture uses it
    torch.backends.cudnn.allow_tf32 = tf32  # (mixing it with fp32_precision raises)
    logger.info("cuDNN autotuning on; fp32 matmuls and convolutions in "
                + ("TF32 (--tf32 true)" if tf32 else "IEEE fp32 (--tf32 false)"))


def device_of(model):
    """The device of a (possibly DDP-wrapped) model's parameters."""
    return next(model.parameters()).device


def forward_context(model, args):
    """Autocast for one forward of `model` under the flags, for code outside the training loops
    (tests, tools); the loops use the Precision their entry point decided once."""
    return Precision.from_args(args, device_of(model)).autocast()


def run_epochs(train_loader, start_epoch, args, start_iter=0):
    """The frame of an entry point's epoch loop: yields start_epoch .. args.epochs - 1, each
    logged and with the sampler set to it (the first one from batch `start_iter`, for a
    mid-epoch resume); once the loop is done, every rank waits for the others and the end is
    logged. (configure_backends ran at the set-up: build_pretraining, main_simsiam.)"""
    for epoch in range(start_epoch, args.epochs):
        logger.info("============ Starting epoch %i ... ============" % epoch)
        train_loader.sampler.set_epoch(epoch, start_iter if epoch == start_epoch else 0)
        yield epoch
    du.barrier()
    logger.info("Training done: checkpoint at %s",
                os.path.join(args.dump_path, "checkpoint.pth.tar"))

"""Small helpers: flags, meters, accuracy, seeds, schedules, experiment set-up."""
import argparse
import logging
import math
import os
import pickle
import random
import subprocess

import numpy as np
import torch

from .lock import PRETRAINING_LOCK, lock_dump_path
from .logger import PD_Stats, create_logger

FALSY_STRINGS = {"off", "false", "0"}
TRUTHY_STRINGS = {"on", "true", "1"}

logger = logging.getLogger()


def bool_flag(s):
    """Parse on/off/true/false/1/0 (any case) into a bool, as the original's flags do."""
    if isinstance(s, bool):
        return s
    if s.lower() in FALSY_STRINGS:
        return False
    if s.lower() in TRUTHY_STRINGS:
        return True
    raise argparse.ArgumentTypeError("invalid value for a boolean flag: %r" % s)


class AverageMeter:
    """Keeps the latest value and the running average."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.val = 0.0
        self.avg = 0.0
        self.sum = 0.0
        self.count = 0

    def update(self, val, n=1):
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count


def accuracy(output, target, topk=(1,)):
    """Top-k precision in percent for each k."""
    with torch.no_grad():
        maxk = min(max(topk), output.shape[1])
        batch_size = target.size(0)
        _, pred = output.topk(maxk, 1, True, True)
        pred = pred.t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        # reshape, not view: the slice is not contiguous (the original's .view fails on new torch)
        return [correct[:min(k, maxk)].reshape(-1).float().sum(0).mul_(100.0 / batch_size)
                for k in topk]


def fix_random_seeds(seed=31):
    """Seed torch (CPU and CUDA), numpy and python's random."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    np.random.seed(seed)
    random.seed(seed)


def cosine_lr_schedule(base_lr, final_lr, epochs, niter_per_ep, warmup_epochs=0, start_warmup=0):
    """Per-iteration rates: linear warm-up from start_warmup to base_lr, then cosine to final_lr."""
    warmup = np.linspace(start_warmup, base_lr, niter_per_ep * warmup_epochs)
    total = niter_per_ep * (epochs - warmup_epochs)
    t = np.arange(total)
    cosine = final_lr + 0.5 * (base_lr - final_lr) * (1 + np.cos(math.pi * t / max(total, 1)))
    return np.concatenate((warmup, cosine))


def git_sha():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                                       stderr=subprocess.DEVNULL).decode().strip()
    except Exception:
        return "unknown"


def initialize_exp(params, *stat_columns, stats_name="stats", log_name="train.log",
                   params_name="params.pkl", lock_name=PRETRAINING_LOCK):
    """Lock the dump path, dump params, create the checkpoint folder, the logger and the stats
    frame of this rank.

    Returns (logger, PD_Stats). Files: params.pkl, train.log[-rank], {stats_name}{rank}.pkl
    (the evaluations pass their own names so they can share a pre-training run's dump_path),
    and the lock file `lock_name` (src/lock.py): a second run on the same files refuses.
    """
    lock_dump_path(params, lock_name)  # before anything in the folder is read or written
    params.dump_checkpoints = os.path.join(params.dump_path, "checkpoints")
    if params.rank == 0:
        os.makedirs(params.dump_checkpoints, exist_ok=True)
        with open(os.path.join(params.dump_path, params_name), "wb") as f:
            pickle.dump(params, f)
    training_stats = PD_Stats(
        os.path.join(params.dump_path, stats_name + str(params.rank) + ".pkl"), stat_columns)
    log = create_logger(os.path.join(params.dump_path, log_name), rank=params.rank)
    log.info("============ Initialized logger ============")
    log.info("git: %s", git_sha())
    log.info("\n".join("%s: %s" % (k, str(v)) for k, v in sorted(dict(vars(params)).items())))
    log.info("The experiment will be stored in %s\n" % params.dump_path)
    return log, training_stats

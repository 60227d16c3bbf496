"""Collapse monitor for clustering-based self-supervision (SwAV, DeepCluster-v2).

A collapsed run gives every sample the same (or a uniform) assignment; the network's predicted
distribution over the K prototypes becomes uniform and the loss stays at ln(K) (8.006 for K=3000:
swav#12, #56, #62, #69, #76, #113). The monitor watches the loss every iteration and warns once
(or, with --stop_on_collapse, stops every rank cleanly) when it has stayed within a tolerance of
ln(K) for `patience` iterations; once per epoch it logs the mean entropy of the assignments, how
many prototypes were used and the loss relative to ln(K).

Use (every rank calls both methods, the same number of times):
    monitor = CollapseMonitor.from_args(args, args.nmb_prototypes, start_iter=...)
    monitor.update(loss, codes=q)              # per iteration; or assignments=hard ids
    monitor.epoch_summary(epoch)               # all-reduces, logs, returns a dict
"""
import logging
import math

import torch

from . import distributed as du
from .errors import UsageError
from .utils import bool_flag

logger = logging.getLogger()

# the original README's "common issues" section and its issue tracker
SWAV_REMEDIES = (
    "lower --epsilon (e.g. 0.03 instead of 0.05): sharper codes",
    "freeze the prototypes longer (--freeze_prototypes_niters, e.g. one or more epochs)",
    "start the queue later or make it shorter (--epoch_queue_starts, --queue_length)",
    "lower the learning rate or warm up longer (--base_lr, --warmup_epochs)",
    "fewer or easier crops / softer augmentation",
)
DEEPCLUSTER_REMEDIES = (
    "lower the learning rate or warm up longer (--base_lr, --warmup_epochs)",
    "fewer prototypes per head (--nmb_prototypes) or a larger dataset per k-means",
    "fewer or easier crops / softer augmentation",
)


class CollapseError(RuntimeError):
    """Raised on every rank by a monitor built with stop=True once the run has collapsed."""


def add_collapse_args(parser):
    parser.add_argument("--stop_on_collapse", type=bool_flag, default=False,
                        help="stop (exit status 1) instead of only warning when the loss sits at "
                             "ln(nmb_prototypes)")
    parser.add_argument("--collapse_patience", type=int, default=200,
                        help="iterations the loss must stay within 1%% of ln(K) (counted after "
                             "the prototypes are unfrozen) before the collapse warning; 0: off")
    return parser


def _entropy_rows(p):
    """Entropy (nats) of each row of a B x K probability matrix, summed over rows."""
    p = p.detach().float()
    return -(p * torch.log(p.clamp_min(1e-12))).sum()


class CollapseMonitor:
    """nmb_prototypes: K, or a list with one K per head (DeepCluster-v2): the collapsed loss is
    then the mean of ln(K_h), as the loss is the mean over heads.

    patience: consecutive iterations within `tolerance` (relative) of ln(K) that count as a
    collapse; 0 disables the warning (the epoch summary is still logged). start_iter: iterations
    before it are not counted (SwAV: the prototypes are frozen and the loss sits near ln(K)).
    stop: raise CollapseError on every rank (all-reduces a flag each iteration when distributed).
    """

    def __init__(self, nmb_prototypes, *, patience=200, tolerance=0.01, start_iter=0, stop=False,
                 remedies=SWAV_REMEDIES, name="SwAV"):
        ks = list(nmb_prototypes) if isinstance(nmb_prototypes, (list, tuple)) else [nmb_prototypes]
        if not ks or min(ks) < 2:
            raise UsageError(f"collapse monitor: need K >= 2 prototypes per head, got {ks}")
        self.ks = [int(k) for k in ks]
        self.ln_k = sum(math.log(k) for k in self.ks) / len(self.ks)
        self.patience, self.tolerance, self.start_iter = patience, tolerance, start_iter
        self.stop, self.remedies, self.name = stop, tuple(remedies), name
        self.run_length = 0          # consecutive iterations at ln(K)
        self.device = torch.device("cpu")  # where the statistics live (the collectives' device)
        self.collapsed_at = None     # iteration of the first detection on this rank
        self.warned = False
        self.last_summary = None     # the last epoch_summary() (TensorBoard reads it)
        self._reset_epoch()

    @classmethod
    def from_args(cls, args, nmb_prototypes, start_iter=0, **kw):
        return cls(nmb_prototypes, patience=args.collapse_patience, stop=args.stop_on_collapse,
                   start_iter=start_iter, **kw)

    def _reset_epoch(self):
        self.loss_sum, self.loss_n = 0.0, 0
        self.entropy_sum, self.entropy_n = None, 0
        self.usage = [None] * len(self.ks)  # per head: assignment counts over the prototypes

    # ------------------------------------------------------------------ per iteration
    def update(self, loss, codes=None, assignments=None, iteration=None, agree=True):
        """Record one iteration.

        loss: a float or a 0-d tensor. codes: soft assignments (B x K, rows sum to 1), or a list
        of them (SwAV: one per assigned crop; with several heads: one per head, in head order).
        assignments: hard prototype ids (B,), or a list per head; negative ids (DeepCluster-v2's
        -100 for unassigned samples) are ignored. Nothing here synchronises the device except
        reading the loss (and, when stop=True and distributed, the ranks' agreement: one
        scalar all-reduce per call with agree=True; EpochProgress, which gives a log interval's
        losses at once, asks it for the last one only, so once per log interval, every rank
        at the same value). loss None: only the codes/assignments (no sync); the training loops
        give the losses later, as numbers (src/progress.py EpochProgress reads them once per log
        interval).
        """
        for i, q in enumerate(_as_list(codes)):
            h = i if len(self.ks) > 1 else 0
            e = _entropy_rows(q)
            self.entropy_sum = e if self.entropy_sum is None else self.entropy_sum + e
            self.entropy_n += q.shape[0]
            self._count(h, q.detach().argmax(dim=1), q.shape[1])
        for i, a in enumerate(_as_list(assignments)):
            h = i if len(self.ks) > 1 else 0
            self._count(h, a.detach(), self.ks[h])
        if loss is None:
            return
        loss_value = float(loss)
        self.loss_sum += loss_value
        self.loss_n += 1
        if torch.is_tensor(loss):
            self.device = loss.device

        at_ln_k = abs(loss_value - self.ln_k) <= self.tolerance * self.ln_k
        counting = iteration is None or iteration >= self.start_iter
        self.run_length = self.run_length + 1 if (at_ln_k and counting) else 0
        if self.patience > 0 and self.run_length >= self.patience and self.collapsed_at is None:
            self.collapsed_at = iteration
            if du.is_main_process():
                logger.warning(self.warning_text(iteration))
            self.warned = True
        if self.stop and self.patience > 0 and agree:
            self._maybe_stop(iteration)

    def _count(self, h, ids, k):
        # index_add_, not bincount or a boolean mask: no device sync
        ids = ids.long()
        self.device = ids.device
        counts = torch.zeros(k, device=ids.device).index_add_(0, ids.clamp(0, k - 1),
                                                              (ids >= 0).float())
        self.usage[h] = counts if self.usage[h] is None else self.usage[h] + counts

    def _maybe_stop(self, iteration):
        collapsed = self.collapsed_at is not None
        if du.get_world_size() > 1:
            # every rank stops at the same iteration, else the others would hang in a collective
            flag = du.all_reduce(du.backend_tensor([float(collapsed)]),
                                 op=torch.distributed.ReduceOp.MAX)
            collapsed = bool(flag.item() > 0)
        if collapsed:
            where = "" if self.collapsed_at is not None else " (detected on another rank)"
            raise CollapseError(
                f"{self.name} collapsed{where}: the loss stayed within {self.tolerance:.0%} of "
                f"ln(K) = {self.ln_k:.3f} for {self.patience} iterations (iteration "
                f"{iteration}); stopped by --stop_on_collapse. Try: " + "; ".join(self.remedies))

    def warning_text(self, iteration=None):
        at = f" at iteration {iteration}" if iteration is not None else ""
        return (f"{self.name} looks collapsed{at}: the loss has stayed within "
                f"{self.tolerance:.0%} of ln(K) = {self.ln_k:.3f} (K = "
                f"{'/'.join(map(str, self.ks))}) for {self.run_length} iterations, i.e. the "
                "network predicts a uniform distribution over the prototypes. Likely remedies:\n"
                + "\n".join(f"  - {r}" for r in self.remedies))

    # ------------------------------------------------------------------ per epoch
    def epoch_summary(self, epoch=None):
        """All-reduce the epoch's statistics over ranks, log one line on rank 0, reset, and
        return {"loss_over_ln_k", "assignment_entropy", "entropy_over_ln_k",
        "prototypes_used": [per head], "effective_prototypes": [per head], "collapsed"}."""
        device = self.device
        usage = [u if u is not None else torch.zeros(k, device=device)
                 for u, k in zip(self.usage, self.ks)]
        ent = self.entropy_sum if self.entropy_sum is not None else torch.zeros((), device=device)
        head = torch.stack([ent.to(device).float(), torch.tensor(float(self.entropy_n), device=device),
                            torch.tensor(self.loss_sum, device=device),
                            torch.tensor(float(self.loss_n), device=device)])
        packed = du.all_reduce(torch.cat([head] + [u.to(device) for u in usage]))
        ent_sum, ent_n, loss_sum, loss_n = packed[:4].tolist()
        usage = torch.split(packed[4:].cpu(), self.ks)

        summary = {"loss_over_ln_k": (loss_sum / loss_n) / self.ln_k if loss_n else float("nan"),
                   "assignment_entropy": ent_sum / ent_n if ent_n else float("nan"),
                   "prototypes_used": [int((u > 0).sum()) for u in usage],
                   "effective_prototypes": [_effective_number(u) for u in usage],
                   "collapsed": self.collapsed_at is not None}
        summary["entropy_over_ln_k"] = summary["assignment_entropy"] / self.ln_k
        if du.is_main_process():
            ep = f", epoch {epoch}" if epoch is not None else ""
            ent_txt = ("" if not ent_n else
                       f"mean assignment entropy {summary['assignment_entropy']:.3f} nats = "
                       f"{summary['entropy_over_ln_k']:.2f} ln(K); ")
            used = ", ".join(f"{n}/{k} (effective {e:.1f})" for n, k, e in zip(
                summary["prototypes_used"], self.ks, summary["effective_prototypes"]))
            logger.info(f"collapse monitor{ep}: loss = {summary['loss_over_ln_k']:.3f} ln(K) "
                        f"(ln K = {self.ln_k:.3f}); {ent_txt}prototypes used {used}")
        self._reset_epoch()
        self.last_summary = summary  # for TensorBoard (--tensorboard)
        return summary

    def share_in_use(self):
        """Share of the (first head's) prototypes used in the last summarised epoch, or None."""
        summary = self.last_summary
        return summary["prototypes_used"][0] / self.ks[0] if summary else None


def _as_list(x):
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _effective_number(counts):
    """exp(entropy) of the usage histogram: K when balanced, 1 when every sample takes one."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts / total
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))

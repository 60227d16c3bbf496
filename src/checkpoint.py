"""Checkpoints: atomic saves, keyword resume, RNG state, and loading weights safely.

Every file is written to a temporary name then renamed (os.replace is atomic on POSIX), so a
process killed during a save leaves the previous file intact. Every load uses
weights_only=True: our checkpoints hold only tensors, numbers, strings, lists and dicts; the
original's also hold numpy float64 learning rates, so exactly the numpy scalar and dtype types
are allowed too (they rebuild a number from raw bytes and run no code).
"""
import contextlib
import errno
import logging
import os
import pickle
import random
import re
import shutil

import numpy as np
import torch

from .errors import CheckpointError

logger = logging.getLogger()


class NonFiniteStateError(CheckpointError):
    """A NaN/inf in a model's state: not saved over the last good checkpoint, not evaluated."""


def first_nonfinite(tensors):
    """Name of the first floating-point tensor of `tensors` ({name: tensor}) holding a NaN or
    inf, else None. One device sync for all of them."""
    named = [(k, v) for k, v in tensors.items()
             if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())
             and v.numel()]
    if not named:
        return None
    # the norm of a tensor with an inf or NaN is not finite (an overflow of a huge finite one
    # is too, and is as unusable)
    norms = torch.stack([n.float() for n in torch._foreach_norm([v.detach() for _, v in named])])
    finite = torch.isfinite(norms)
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0, 0])][0]


def check_finite_state(state_dict, what):
    """Raise NonFiniteStateError naming the first parameter or buffer of `state_dict` (e.g. a
    BatchNorm running_var) that holds a NaN/inf. `what`: the file or run it belongs to."""
    bad = first_nonfinite(state_dict)
    if bad is not None:
        raise NonFiniteStateError(f"{what}: non-finite values (NaN/inf) in {bad}")


def check_finite_features(features, what="features"):
    """`features` (a tensor), or NonFiniteStateError when they hold a NaN/inf: an accuracy
    computed from them would be meaningless (e.g. k-NN below chance), not a result."""
    if features.is_floating_point() and not bool(torch.isfinite(features).all()):
        bad = int((~torch.isfinite(features)).flatten(1).any(1).sum()) if features.ndim > 1 else 1
        raise NonFiniteStateError(f"{what}: {bad} of {len(features)} feature vectors hold NaN/inf "
                                  "(non-finite weights or BatchNorm statistics?): not evaluating")
    return features


def _nbytes(obj):
    """About how many bytes torch.save writes for `obj` (its tensors' data)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _disk_full(error, path, needed):
    """Whether `error` (a failed write of `needed` bytes to `path`) came from a full disk: the
    ENOSPC of a plain write, or torch.save's zip writer ("unexpected pos") with too little
    space left."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    except OSError:
        return False
    return free < needed + (1 << 20)


@contextlib.contextmanager
def _writing(path, tmp, needed):
    """Remove `tmp` whatever happens; a full disk ends in one line naming `path` and the size."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)  # first: frees the space the check below looks at
        if _disk_full(e, path, needed):
            raise CheckpointError(f"no space left on device writing {path} (needs about "
                                  f"{max(1, round(needed / 2**20))} MB); the previous file is "
                                  "kept") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with _writing(path, tmp, _nbytes(obj)):
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


def atomic_copy(src, dst):
    tmp = f"{dst}.tmp{os.getpid()}"
    with _writing(dst, tmp, os.path.getsize(src)):
        shutil.copyfile(src, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)


def _numpy_safe_globals():
    """The numpy types an original checkpoint's float64 learning rates unpickle with: the scalar
    constructor (under numpy 1's and numpy 2's module names), np.dtype and its numeric dtype
    classes. Nothing else: no object arrays, no callables that run code."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    allowed = [np.dtype, scalar, (scalar, "numpy.core.multiarray.scalar"),
               (scalar, "numpy._core.multiarray.scalar")]
    for name in dir(getattr(np, "dtypes", None)):  # numpy >= 1.25 may pickle these classes
        cls = getattr(np.dtypes, name)
        if isinstance(cls, type) and issubclass(cls, np.dtype) and \
                issubclass(getattr(cls, "type", object), (np.number, np.bool_)):
            allowed.append(cls)
    return allowed


NUMPY_SAFE_GLOBALS = _numpy_safe_globals()


def safe_load(path, map_location="cpu"):
    """torch.load with weights_only=True (numpy scalars allowed: the original's checkpoints hold
    them) and a one-line error naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt, truncated, HTML page, pickle with code, ...
        raise CheckpointError(f"{path}: not a loadable weights file "
                              f"({describe_load_error(path, e)})") from None


def describe_load_error(path, error):
    """One short reason for a failed torch.load; its own message is often paragraphs long."""
    text = str(error)
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        head = b"?"
    if not head:
        return "empty file: an interrupted download?"
    if head.lstrip()[:1] == b"<":
        return ("an HTML/XML page, not weights: a failed download or an error page saved as "
                "the file?")
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsafe and unsafe.group(1).startswith("torch."):  # e.g. a name cut short by truncation
        return ("corrupt or truncated, or holds a torch object that is not weights "
                f"({unsafe.group(1)})")
    if unsafe:
        return (f"refused to unpickle {unsafe.group(1)}: the file holds Python objects, not only "
                "tensors, and loading them could run code")
    if "central directory" in text or "PytorchStreamReader" in text:
        return "corrupt or truncated zip archive"
    if isinstance(error, (EOFError, pickle.UnpicklingError)) or "WeightsUnpickler" in text:
        detail = re.search(r"WeightsUnpickler error: \s*(.+)", text)
        return "corrupt, truncated or not a PyTorch file" + (
            f" ({detail.group(1).strip()[:100]})" if detail else "")
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return first[:200]


# ----------------------------------------------------------------------------- RNG state
def get_rng_state():
    """RNG states of torch (CPU, CUDA), numpy and python as weights_only-loadable values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ----------------------------------------------------------------------------- resume
def add_module_prefix(state_dict):
    """Keys as a DDP-wrapped model has them (`module.`), as the original's checkpoints do."""
    return {k if k.startswith("module.") else "module." + k: v for k, v in state_dict.items()}


def strip_module_prefix(state_dict):
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def model_state_dict(model, check_finite=True):
    """The model's state to save: `module.` keys, contiguous tensors. With `check_finite`, a
    NaN/inf in any parameter or buffer (BatchNorm statistics too: in training mode the loss can
    stay finite with an inf running_var) raises NonFiniteStateError naming it, before the file
    that would replace the last good checkpoint is written."""
    # contiguous: a channels_last model saves the original's NCHW layout (safetensors and
    # other tools reject strided tensors); values are unchanged
    state = add_module_prefix({k: v.contiguous() for k, v in unwrap(model).state_dict().items()})
    if check_finite:
        check_finite_state(state, "model state not saved (the last checkpoint is kept)")
    return state


def load_model_state(model, state_dict, path):
    """Strict load of a training checkpoint's weights into a (possibly DDP-wrapped) model."""
    target = unwrap(model)
    state_dict = strip_module_prefix(state_dict)
    own = target.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} keys of another shape (e.g. {k}: "
                         f"{tuple(state_dict[k].shape)} vs {tuple(own[k].shape)})")
        raise CheckpointError(f"{path}: does not fit this model: " + "; ".join(parts)
                              + " (different --arch / --feat_dim / --nmb_prototypes / --hidden_mlp?)")
    target.load_state_dict(state_dict)


def checkpoint_candidates(dump_path):
    """Where a run in `dump_path` resumes from, best first: checkpoint.pth.tar, then the
    periodic copies checkpoints/ckp-N.pth, newest first."""
    folder = os.path.join(dump_path, "checkpoints")
    numbered = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            m = re.fullmatch(r"ckp-(\d+)\.pth", name)
            if m:
                numbered.append((int(m.group(1)), os.path.join(folder, name)))
    return [os.path.join(dump_path, "checkpoint.pth.tar")] + [p for _, p in sorted(numbered)[::-1]]


def load_first_good(paths):
    """(path, checkpoint) of the first existing file in `paths` that loads. A file that exists
    but does not load is skipped with a warning naming it. (None, None) when none exists; a
    CheckpointError when some exist and none loads: never a silent start from scratch."""
    existing = [p for p in paths if os.path.isfile(p)]
    failures = []
    for path in existing:
        try:
            checkpoint = safe_load(path)
            if not isinstance(checkpoint, dict):
                raise CheckpointError(f"{path}: holds a {type(checkpoint).__name__}, not a dict")
        except CheckpointError as e:
            failures.append(str(e))
            logger.warning(f"cannot resume from {e}; trying the previous checkpoint")
            continue
        if failures:
            logger.warning(f"resuming from {path} (epoch {checkpoint.get('epoch', '?')}), the "
                           f"newest loadable checkpoint: later epochs are trained again")
        elif path != paths[0]:
            logger.warning(f"{paths[0]} is missing: resuming from {path}")
        return path, checkpoint
    if failures:
        raise CheckpointError(f"no loadable checkpoint among {len(existing)} file(s): "
                              f"{failures[0]} (move them away to start from scratch)")
    return None, None


def remove_stale_tmp_files(*folders):
    """Remove the temporary files of saves interrupted by a crash (atomic_save's `.tmp<pid>`)."""
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if re.search(r"\.tmp\d+$", name):
                logger.info(f"removing {name}: left by an interrupted save")
                os.remove(os.path.join(folder, name))


def restart_from_checkpoint(ckp_paths, run_variables=None, fallback=False, **kwargs):
    """Load the first existing checkpoint in `ckp_paths` into the objects given by keyword.

    Each keyword names a checkpoint entry; its object is loaded with `load_state_dict` (a model:
    strictly, `module.` prefix tolerated). Entries in `run_variables` are copied back into it.
    With fallback=True, a file that does not load is skipped (warning) for the next one.
    Returns the path loaded, or None when no checkpoint exists.
    """
    if isinstance(ckp_paths, str):
        ckp_paths = [ckp_paths]
    if fallback:
        path, checkpoint = load_first_good(ckp_paths)
        if path is None:
            return None
    else:
        path = next((p for p in ckp_paths if os.path.isfile(p)), None)
        if path is None:
            return None
        checkpoint = safe_load(path)
    logger.info("Found checkpoint at {}".format(path))
    for key, value in kwargs.items():
        if value is None:
            continue
        # a GradScaler state is saved as "scaler"; the original's apex state as "amp"
        alias = {"amp": "scaler", "scaler": "amp"}.get(key)
        if key not in checkpoint and alias in checkpoint:
            key = alias
        if key not in checkpoint:
            logger.warning("=> key '{}' not found in checkpoint '{}'".format(key, path))
            continue
        if isinstance(value, torch.nn.Module):
            load_model_state(value, checkpoint[key], path)
        else:
            try:
                value.load_state_dict(checkpoint[key])
            except (ValueError, KeyError, RuntimeError) as e:
                raise CheckpointError(f"{path}: cannot restore '{key}': {e}") from None
        logger.info("=> loaded '{}' from checkpoint '{}'".format(key, path))
    if run_variables is not None:
        for var_name in run_variables:
            if var_name in checkpoint:
                run_variables[var_name] = checkpoint[var_name]
    return path


# ----------------------------------------------------------------------------- elastic resume
# Per-rank state whose rows follow the iterations (SwAV's queue, DeepCluster-v2's memory bank)
# is re-sharded when a run resumes on another number of processes. Its global order: rank r
# fills rows [j*B, (j+1)*B) of its shard with its part of global batch j (queue: j batches ago;
# memory bank: iteration j of the epoch), so global row block j (B x world size rows) is
# rank 0's block j, then rank 1's, ...: the rows of global batch j. Splitting that order again
# keeps every row's age (queue) or iteration (memory bank), whatever the world size.
def merge_shards(shards, batch_size, dim=0):
    """The global tensor of every rank's shard (rows along `dim`), in the order above."""
    shards = [s.movedim(dim, 0) for s in shards]
    rows, rest = shards[0].shape[0], tuple(shards[0].shape[1:])
    if rows % batch_size or any(s.shape != shards[0].shape for s in shards):
        raise CheckpointError(f"per-process shards of shapes {[tuple(s.shape) for s in shards]} "
                              f"are not whole batches of {batch_size} rows")
    x = torch.stack(shards).reshape(len(shards), rows // batch_size, batch_size, *rest)
    return x.transpose(0, 1).reshape(-1, *rest).movedim(0, dim)


def split_shards(rows, world_size, batch_size, dim=0, what="rows"):
    """Every rank's shard of the global `rows` (the inverse of merge_shards): the row count must
    be a multiple of the global batch, as the original's rule for --queue_length."""
    x = rows.movedim(dim, 0)
    n, rest, global_batch = x.shape[0], tuple(x.shape[1:]), batch_size * world_size
    if n % global_batch:
        raise CheckpointError(f"{what}: {n} rows are not a multiple of the global batch "
                              f"{global_batch} (--batch_size {batch_size} x {world_size} "
                              "processes), which each process's share must be made of")
    x = x.reshape(n // global_batch, world_size, batch_size, *rest).transpose(0, 1)
    return [s.reshape(-1, *rest).movedim(0, dim) for s in x]


def reshard(shards, old_batch, world_size, batch_size, dim=0, rows=None, pad="zeros",
            what="rows"):
    """Re-shard per-rank `shards` (batches of `old_batch` rows) for `world_size` ranks with
    batches of `batch_size`. `rows`: the new global row count (default: unchanged); fewer keep
    the first rows; more append zero rows (pad="zeros": the queue's empty rows) or the first rows
    again (pad="repeat": the memory bank's rows must be real samples). Returns the new shards."""
    merged = merge_shards(shards, old_batch, dim).movedim(dim, 0)
    rows = len(merged) if rows is None else rows
    if rows <= len(merged):
        merged = merged[:rows]
    else:
        extra = merged[torch.arange(rows - len(merged)) % len(merged)]
        merged = torch.cat([merged, torch.zeros_like(extra) if pad == "zeros" else extra])
    return split_shards(merged.movedim(0, dim), world_size, batch_size, dim, what)


# set per process (rank 1's device is cuda:1, the checkpoint holds rank 0's) or describing where
# the run is, not what it computes: not compared on resume (the world size has its own line)
RUNTIME_FLAGS = {"rank", "local_rank", "world_size", "gpu_to_work_on", "device",
                 "dump_checkpoints", "dump_path", "resume", "dist_url", "allow_batch_change"}


# the flag values a checkpoint's "args" entry records (they load with weights_only=True)
RECORDED_TYPES = (int, float, str, bool, list, type(None))


def recorded_flags(args):
    """The "args" entry of a checkpoint: this run's flags of the RECORDED_TYPES."""
    return {k: v for k, v in vars(args).items() if isinstance(v, RECORDED_TYPES)}


def _processes(n):
    return f"{n} process" if n == 1 else f"{n} processes"


def check_resume_flags(saved, args, path):
    """Compare the flags recorded in checkpoint `path` (its "args" entry: the run that wrote it)
    with this run's: one log line per difference (old -> new), one for a change of world size.
    A change of the global batch (--batch_size x processes) is refused with a one-line error
    unless --allow_batch_change. Returns the checkpoint's global batch, or None when it records
    no flags (a checkpoint of the original)."""
    if not saved:
        logger.warning(f"{path} records no flags (a checkpoint of the original?): flags and world "
                       "size are not compared with this run's")
        return None
    new = vars(args)
    for k in sorted(set(saved) & set(new) - RUNTIME_FLAGS):
        old_v, new_v = saved[k], new[k]
        if isinstance(new_v, tuple):
            new_v = list(new_v)
        if old_v != new_v:
            logger.warning(f"resuming with --{k} {old_v!r} -> {new_v!r} (the checkpoint's run "
                           "had the first)")
    unrecorded = sorted(k for k in set(new) - set(saved) - RUNTIME_FLAGS
                        if isinstance(new[k], RECORDED_TYPES))
    if unrecorded:
        logger.info(f"{path} does not record --{' --'.join(unrecorded)} (an older version)")
    old_bs, old_ws = saved.get("batch_size"), saved.get("world_size")
    if old_bs is None or old_ws is None:
        return None
    old_global, new_global = old_bs * old_ws, args.batch_size * args.world_size
    if old_ws != args.world_size:
        logger.warning(f"resuming on {_processes(args.world_size)}, the checkpoint's run had "
                       f"{old_ws}: per-process batch {old_bs} -> {args.batch_size}, global "
                       f"batch {old_global} -> {new_global}")
    if old_global != new_global:
        same = (f"--batch_size {old_global // args.world_size} on {_processes(args.world_size)}"
                if old_global % args.world_size == 0 else _processes(old_ws))
        if not args.allow_batch_change:
            raise CheckpointError(
                f"{path}: the global batch would change from {old_global} (--batch_size {old_bs} "
                f"x {_processes(old_ws)}) to {new_global} (--batch_size {args.batch_size} x "
                f"{_processes(args.world_size)}): resume with {same}, or pass "
                "--allow_batch_change true (the schedule is then mapped by epochs done)")
        logger.warning(f"--allow_batch_change: global batch {old_global} -> {new_global}; the "
                       "learning-rate schedule continues from the epochs done (its "
                       "per-iteration steps are this run's)")
    return old_global


def truncate_stats(training_stats, start_epoch):
    """Keep the stats rows of the epochs before `start_epoch`. By the epoch column, not the row
    count: the stats file of a rank that did not exist for some epochs (a run resumed on fewer
    processes, then more again) lacks their rows."""
    stats = training_stats.stats
    if len(stats.index) and "epoch" in stats.columns:
        training_stats.stats = stats[stats["epoch"] < start_epoch].reset_index(drop=True)
    else:
        training_stats.truncate(start_epoch)


def map_start_iter(start_iter, old_global, new_global, epoch):
    """The iteration a mid-epoch resume continues at when the global batch changed: after the
    samples already seen this epoch (start_iter x old_global, rounded down to whole new
    batches: the rest is seen again, none is skipped). Every world size sees the same global
    sample order (DistributedSampler: global batch j is positions [j*G, (j+1)*G) of the epoch's
    permutation), so with an unchanged global batch the iteration is unchanged."""
    if not start_iter or old_global is None or old_global == new_global:
        return start_iter
    seen = start_iter * old_global
    new_iter = seen // new_global
    logger.warning(f"epoch {epoch}: {seen} samples were seen in batches of {old_global}; "
                   f"resuming at iteration {new_iter} of batches of {new_global} "
                   f"({seen - new_iter * new_global} samples seen again)")
    return new_iter

"""Process-group set-up for one process, torchrun / torch.distributed.launch, and Slurm srun.

`init_distributed_mode(args)` sets args.rank, args.world_size, args.local_rank, args.gpu_to_work_on
and args.device, and initialises the default process group when there is more than one process
(nccl on CUDA, gloo on CPU). Helpers below fall back to one process when no group exists.
"""
import datetime
import logging
import os
import subprocess

import torch
import torch.distributed as dist

from .errors import UsageError

logger = logging.getLogger()


def _slurm_master_addr():
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:
        out = subprocess.check_output(["scontrol", "show", "hostnames", nodelist], text=True)
        return out.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return None


def _one_node_master_addr():
    """This host when the job has one node; else an error: the other nodes would wait on a
    rendezvous at their own 127.0.0.1 that never comes."""
    nodes = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES")
    if nodes == "1":
        return "127.0.0.1"
    raise UsageError(f"cannot find the first node of the Slurm job ({nodes or 'an unknown number of'}"
                     " nodes): `scontrol show hostnames` failed or is not on the PATH; set "
                     "MASTER_ADDR to the first node's host name")


def _launcher_env():
    """(rank, world_size, local_rank, launcher) from the environment; rank None without one."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, torch.distributed.launch
        local_rank = int(env.get("LOCAL_RANK", 0))
        return int(env["RANK"]), int(env["WORLD_SIZE"]), local_rank, "torchrun"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and env.get("SLURM_STEP_ID") is not None:
        return (int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                int(env.get("SLURM_LOCALID", 0)), "slurm")
    return None, 1, 0, "none"


def init_distributed_mode(args):
    rank, world_size, local_rank, launcher = _launcher_env()
    if args.local_rank and launcher == "none":
        local_rank = args.local_rank  # legacy `--local_rank` with a hand-made environment
    want = args.device or "auto"  # `--device ""`: a script's unset variable, as auto
    use_cuda = torch.cuda.is_available() if want == "auto" else want.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available")

    if launcher == "none" or world_size == 1:
        args.rank, args.world_size = 0, 1
    else:
        args.rank, args.world_size = rank, world_size
    args.local_rank = local_rank

    if use_cuda:
        ngpus = torch.cuda.device_count()
        # one visible GPU is this task's own (Slurm --gpus-per-task, a bound CUDA_VISIBLE_DEVICES):
        # it is cuda:0 whatever the local rank
        gpu = 0 if ngpus == 1 else local_rank
        if gpu >= ngpus:
            raise UsageError(f"local rank {local_rank} has no GPU: this node has {ngpus} "
                             f"GPU(s); start at most {ngpus} tasks per node")
        args.gpu_to_work_on = gpu
        torch.cuda.set_device(gpu)
        args.device = f"cuda:{gpu}"
    else:
        args.gpu_to_work_on = None
        args.device = "cpu"

    # under torchrun a group is made for one process too: its collectives then run on one rank
    # (nccl on a GPU), as in a multi-GPU job, instead of being skipped
    if args.world_size > 1 or launcher == "torchrun":
        if launcher == "slurm":
            if "MASTER_ADDR" not in os.environ:
                os.environ["MASTER_ADDR"] = _slurm_master_addr() or _one_node_master_addr()
            os.environ.setdefault("MASTER_PORT", "29500")
        timeout = datetime.timedelta(minutes=args.dist_timeout_min)
        if use_cuda:
            # a failed or timed-out NCCL collective aborts the process instead of hanging it
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method=args.dist_url,
                                world_size=args.world_size, rank=args.rank, timeout=timeout)
    return args


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def get_rank():
    return dist.get_rank() if is_dist() else 0


def is_main_process():
    return get_rank() == 0


# ----------------------------------------------------------------------------- collectives
# Every collective of the project goes through the helpers below: NCCL takes CUDA tensors only and
# gloo CPU ones, while callers hold statistics wherever they were computed (k-means assignments and
# the collapse monitor's counts on the CPU, losses on the GPU). Each helper moves a tensor to the
# backend's device when it is elsewhere, runs the collective and gives the result back on the
# caller's device. A no-op without a process group; with one, it runs even for a single rank (a
# one-process nccl run then exercises the same collectives as a multi-GPU one).
def backend_device():
    """Where the default group's collectives need their tensors: the current CUDA device under
    nccl, else (gloo, or no group) the CPU."""
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _move(tensor, device):
    """`tensor` on `device`: itself when it is there already (tests swap this to emulate a GPU)."""
    return tensor if tensor.device == device else tensor.to(device)


def _make(values, dtype, device):
    """A 1-d tensor of `values` on `device`, made there by fills (tests swap this with _move)."""
    return torch.cat([torch.full((1,), v, dtype=dtype, device=device) for v in values])


def backend_tensor(values, dtype=torch.float32):
    """A small tensor of `values` for a collective, made on the backend's device: on a GPU by
    fill kernels, not by a host-to-device copy (a blocking copy waits for every queued kernel)."""
    return _make(values, dtype, backend_device())


def _on_backend(tensor):
    """(tensor on the backend device, contiguous: the collectives need both; whether it moved)."""
    moved = _move(tensor, backend_device()).contiguous()
    return moved, moved is not tensor


def all_reduce(tensor, op=None):
    """In-place all-reduce (sum by default) of `tensor`, wherever it lives; returns it."""
    if is_dist():
        work, copied = _on_backend(tensor)
        dist.all_reduce(work, op=op or dist.ReduceOp.SUM)
        if copied:
            tensor.copy_(_move(work, tensor.device))
    return tensor


def broadcast(tensor, src=0):
    """In-place broadcast of rank `src`'s `tensor` to every rank; returns it."""
    if is_dist():
        work, copied = _on_backend(tensor)
        dist.broadcast(work, src)
        if copied:
            tensor.copy_(_move(work, tensor.device))
    return tensor


def all_gather(tensor):
    """Every rank's tensor (same shape on each rank) as a list in rank order, on every rank, on
    the caller's device."""
    if not is_dist():
        return [tensor]
    work, _ = _on_backend(tensor)
    parts = [torch.empty_like(work) for _ in range(get_world_size())]
    dist.all_gather(parts, work)
    return [_move(p, tensor.device) for p in parts]


def gather(tensor, dst=0):
    """Every rank's tensor (same shape on each rank) as a list in rank order on rank `dst`, on
    the caller's device; None on the other ranks. gloo and nccl (PyTorch >= 1.11) both gather:
    only `dst` receives the data, not world_size copies as with all_gather."""
    if not is_dist():
        return [tensor]
    work, _ = _on_backend(tensor)
    parts = [torch.empty_like(work) for _ in range(get_world_size())] if get_rank() == dst else None
    dist.gather(work, parts, dst=dst)
    return None if parts is None else [_move(p, tensor.device) for p in parts]


def broadcast_object(obj, src=0):
    """Rank `src`'s picklable `obj` on every rank (a verdict, a message); `obj` in one process."""
    if get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier():
    if get_world_size() > 1:
        dist.barrier()


def destroy():
    if is_dist():
        dist.destroy_process_group()


def convert_sync_batchnorm(model, args, mode):
    """SyncBN as the original's --sync_bn `mode`: 'pytorch' (one global group) or 'apex' (groups
    of --syncbn_process_group_size ranks, apex's grouping, done with native SyncBatchNorm).
    The caller gives the mode: eval_linear has no --sync_bn flag and always converts, as the
    original. Falls back to plain BatchNorm in one process or on the CPU (SyncBN refuses CPU
    tensors)."""
    if mode in (None, "", "none") or get_world_size() == 1:
        return model
    if not str(args.device).startswith("cuda"):
        logger.warning("SyncBatchNorm needs CUDA: using per-process BatchNorm on the CPU")
        return model
    process_group = None
    if mode == "apex":
        size = args.syncbn_process_group_size
        if args.world_size % size:
            raise UsageError(f"--syncbn_process_group_size {size} does not divide the world "
                             f"size {args.world_size}")
        # every rank must create every group, in the same order
        groups = [dist.new_group(list(range(g * size, (g + 1) * size)))
                  for g in range(args.world_size // size)]
        process_group = groups[args.rank // size]
    elif mode != "pytorch":
        raise UsageError(f"--sync_bn must be pytorch, apex or none, got {mode!r}")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)

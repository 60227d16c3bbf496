"""The pre-trainings' data: the job's image list (walked once per job) and the loader, and the
batches' copy to the device (where the uint8 crops are normalised)."""
import logging
import os

import torch

from . import distributed as du
from .dali import DaliLoader, check_backend
from .errors import UsageError
from .imagelist import DataError, find_images, read_list_file, read_list_header
from .multicropdataset import SeededSampler, normalize_crops

logger = logging.getLogger()

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
    dataset from the job's image list (job_image_list), then build_loader, or with
    --data_backend dali a DaliLoader (src/dali.py: decoding and augmentation on the GPU)."""
    dali = check_backend(args)  # before any work: DALI installed, a GPU
    dataset = make_dataset(job_image_list(args))
    if dali is None:
        loader = build_loader(dataset, args)
    else:
        loader = check_batches(DaliLoader(dataset, args), dataset, args.batch_size, args)
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
    return check_batches(loader, dataset, batch_size, args)


def check_batches(loader, dataset, batch_size, args):
    if len(loader) == 0:
        raise UsageError(f"the dataset has {len(dataset)} images: fewer than one batch of "
                         f"{batch_size} per process x {args.world_size} processes "
                         "(lower --batch_size)")
    return loader


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

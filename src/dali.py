"""--data_backend dali: the pre-trainings' crops decoded and augmented on the GPU by NVIDIA DALI,
for nodes whose CPU cores cannot feed their GPUs (an optional extra: requirements-dali.txt).

**Written without a GPU: untested on one.** The CPU tests (tests/test_dali.py) check the
parameters handed to DALI's operators, the batches' order and the flag errors, and, where DALI is
installed, run the pipeline with DALI's CPU operators.

The same as the pytorch backend (src/data.py build_loader):
- the images and their order: each rank's batches are those of a SeededSampler (the
  DistributedSampler's permutation of the dataset for --seed and the epoch, this rank's share,
  padded; `set_epoch(epoch, start_iter)` for a mid-epoch resume), so `len()`, `sampler.set_epoch`
  and DeepCluster-v2's image indices are the DataLoader's;
- each crop's distribution, read from the dataset's CropSpecs (src/transforms.py, the numbers the
  torchvision pipeline is built from): area range, aspect-ratio range, flip, jitter strengths
  and probability, greyscale, blur probability and sigma range;
- the output: a list of uint8 N x 3 x H x W crop batches on the GPU, which src/data.py to_device
  normalises, as it does the DataLoader's;
- unreadable files are skipped (or stop the run with --strict_data), as by the dataset.
Different (DALI's operators, not PIL's): the pixels and draws are not the pytorch backend's for a
seed, and a resumed run does not redraw the crops the interrupted one would have; DALI draws the
aspect ratio uniformly over W/H or H/W (torchvision: log-uniform) and falls back to the central
square after 10 attempts; colour_twist applies its four jitters in one fixed order (torchvision: a
random order), contrast about mid-grey (torchvision: about the crop's mean grey) and hue in YIQ;
the blur is a true Gaussian (PIL's radius blur approximates one with box filters); a file that
reads but does not decode stops the run.
"""
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import torch

from .errors import DataError, UsageError
from .multicropdataset import SeededSampler

logger = logging.getLogger()

BACKENDS = ("pytorch", "dali")
INSTALL = ("pip install -r requirements-dali.txt (nvidia-dali-cuda120, from the index "
           "https://pypi.nvidia.com)")
CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop's


def check_backend(args):
    """One-line errors for --data_backend dali where it cannot run: --device cpu, DALI not
    installed, no CUDA GPU. Returns DALI's modules (None for the pytorch backend)."""
    if args.data_backend != "dali":
        return None
    if str(args.device).startswith("cpu"):
        raise UsageError("--data_backend dali decodes and augments on the GPU: it cannot run with "
                         "--device cpu (use --data_backend pytorch)")
    modules = require_dali()
    if not torch.cuda.is_available():
        raise UsageError("--data_backend dali needs a CUDA GPU and torch sees none (use "
                         "--data_backend pytorch)")
    return modules


def require_dali():
    """DALI's modules the pipeline uses, or a one-line error saying how to install them."""
    try:
        from nvidia.dali import Pipeline, fn, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except (ImportError, OSError) as e:  # OSError: a CUDA library it needs is missing
        raise UsageError(f"--data_backend dali needs NVIDIA DALI, which does not import here "
                         f"({e}): {INSTALL}; or use --data_backend pytorch") from None
    return SimpleNamespace(Pipeline=Pipeline, fn=fn, types=types, Iterator=DALIGenericIterator)


def blur_window(spec):
    """Taps of the blur's kernel: the spec's fixed one (OpenCV's 23), or, for PIL's radius blur
    (no fixed kernel), 2 ceil(3 sigma_max) + 1: the Gaussian to 3 sigma, DALI's own rule."""
    return spec.blur_kernel or 2 * math.ceil(3 * spec.blur_sigma[1]) + 1


def augment_crop(dali, images, spec, device="gpu"):
    """One crop of each decoded image (HWC, uint8, on `device`), drawn from `spec` (a CropSpec):
    DALI's graph for RandomResizedCrop -> colour jitter (p) -> greyscale (p) -> blur (p) -> flip,
    uint8 CHW out. The random draws are per-sample arguments (made on the host). An operator
    applied "with probability p" gets a per-sample coin that turns its parameters into the
    identity's, so each sample gets either the op or exactly nothing."""
    fn, types = dali.fn, dali.types

    def coin(p):
        return fn.random.coin_flip(probability=p)

    def uniform(lo, hi):
        return fn.random.uniform(range=[lo, hi])

    x = fn.random_resized_crop(images, device=device, size=[spec.size, spec.size],
                               random_area=list(spec.scale), random_aspect_ratio=list(spec.ratio),
                               num_attempts=CROP_ATTEMPTS, interp_type=types.INTERP_LINEAR,
                               antialias=True)
    # ColorJitter's factors: brightness, contrast, saturation ~ U[max(0, 1 - s), 1 + s], hue
    # ~ U[-h, h] of a turn (DALI: degrees); coin 0 gives 1 (and hue 0), the identity
    jitter = coin(spec.jitter_p)
    brightness, contrast, saturation, hue = spec.jitter

    def factor(strength):
        return jitter * (uniform(max(0.0, 1.0 - strength), 1.0 + strength) - 1.0) + 1.0

    # greyscale after the jitter: saturation 0. One color_twist does both: its hue and
    # saturation act on the chroma only, so this is the greyscale of the jittered crop
    keep_colour = 1 - coin(spec.gray_p)
    x = fn.color_twist(x, device=device, brightness=factor(brightness), contrast=factor(contrast),
                       saturation=factor(saturation) * keep_colour,
                       hue=jitter * uniform(-360.0 * hue, 360.0 * hue))
    if spec.blur_prob > 0:
        # sigma ~ U[blur_sigma]; a crop not blurred gets a 1-tap kernel (the identity)
        window = coin(spec.blur_prob) * (blur_window(spec) - 1) + 1
        x = fn.gaussian_blur(x, device=device, sigma=uniform(*spec.blur_sigma),
                             window_size=window)
    # the flip last: it commutes with the per-pixel colour ops and the symmetric blur
    return fn.crop_mirror_normalize(x, device=device, dtype=types.UINT8, output_layout="CHW",
                                    mirror=coin(spec.flip_p))


def build_pipeline(dali, specs, source, batch_size, num_threads, device_id, seed):
    """The DALI pipeline: encoded files and their dataset indices from `source` (one batch per
    call), decoded on the GPU (nvJPEG: device "mixed"; DALI's CPU decoder when device_id is
    None). Outputs: one crop batch per spec, then the indices (on the host)."""
    pipe = dali.Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                         seed=seed, prefetch_queue_depth=2)
    with pipe:
        # cycle="raise": StopIteration ends the epoch, and the pipeline's reset starts the next
        encoded, index = dali.fn.external_source(source=source, num_outputs=2, batch=True,
                                                 cycle="raise",
                                                 dtype=[dali.types.UINT8, dali.types.INT64])
        images = dali.fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed",
                                        output_type=dali.types.RGB)
        device = "cpu" if device_id is None else "gpu"
        pipe.set_outputs(*[augment_crop(dali, images, spec, device) for spec in specs], index)
    return pipe


class EpochSource:
    """DALI's external source: the encoded files of the loader's batches for this epoch and their
    dataset indices, one batch per call. DALI calls iter() as soon as an epoch has ended (not
    at the reset that starts the next), so the epoch's batches are taken at the first call
    after it, which comes after the loader's reset, after sampler.set_epoch."""

    def __init__(self, loader):
        self.loader = loader
        self.batches = None

    def __iter__(self):
        self.batches = None
        return self

    def __next__(self):
        if self.batches is None:
            self.batches = iter(self.loader.epoch_batches)
        indices = next(self.batches)  # StopIteration: the end of the epoch
        files = self.loader.pool.map(self.loader.dataset.load_bytes, indices)
        return ([np.frombuffer(data, dtype=np.uint8) for data, _ in files],
                [np.array([i], dtype=np.int64) for i in indices])


class DaliLoader:
    """The DataLoader of a crops dataset (src/multicropdataset.py MultiCropDataset,
    src/simsiam.py TwoViewDataset: its images and `crop_specs`) with DALI doing the decoding
    and the augmentation on the GPU. What train() uses of a DataLoader: `len()`, `.sampler`
    (set_epoch, for the epoch's order and a mid-epoch resume), `.dataset`, iteration giving the
    list of crop batches (with return_index: (indices, crops)). Files are read by --workers
    threads (I/O only; DALI decodes); `cpu=True` runs DALI's CPU operators (the tests)."""

    def __init__(self, dataset, args, batch_size=None, cpu=False):
        self.dali = require_dali()
        self.dataset, self.batch_size = dataset, batch_size or args.batch_size
        self.specs, self.return_index = dataset.crop_specs, dataset.return_index
        self.sampler = SeededSampler(dataset, num_replicas=args.world_size, rank=args.rank,
                                     seed=args.seed, batch_size=self.batch_size, seeded=False)
        self.device_id = None if cpu else args.gpu_to_work_on
        self.num_threads = max(1, args.workers)
        self.seed, self.rank = args.seed, args.rank
        self.pool = ThreadPoolExecutor(self.num_threads)
        self.names = [f"crop{i}" for i in range(len(self.specs))] + ["index"]
        self.epoch_batches, self.iterator, self.finished = [], None, False
        logger.info(f"data: DALI decodes and augments {len(self.specs)} crops per image on "
                    + ("the CPU (cpu=True)" if cpu else f"GPU {self.device_id}")
                    + " (--augment is the pytorch backend's)")

    def __len__(self):
        return len(self.sampler) // self.batch_size  # full batches only (drop_last)

    def __iter__(self):
        order = list(self.sampler)
        bs = self.batch_size
        self.epoch_batches = [order[k * bs: (k + 1) * bs] for k in range(len(self))]
        if self.iterator is None or not self.finished:
            # first epoch, or the last one was left before its end: DALI cannot restart an
            # epoch midway, so a new pipeline (its draws seeded by seed, rank, epoch, start)
            self.iterator = self.dali.Iterator(
                [self._pipeline()], output_map=self.names, auto_reset=False,
                prepare_first_batch=False)
        else:
            self.iterator.reset()  # calls EpochSource.__iter__: this epoch's batches
        self.finished = False
        try:
            for outputs in self.iterator:
                crops = [outputs[0][name] for name in self.names[:-1]]
                index = outputs[0]["index"].reshape(-1)  # the images these crops are of
                yield (index, crops) if self.return_index else crops
        except RuntimeError as e:  # DALI's errors: an image its decoder refuses, above all
            raise DataError(f"DALI failed on a batch ({str(e).strip().splitlines()[0][:300]}); "
                            "--data_backend pytorch skips files it cannot decode") from e
        self.finished = True

    def _pipeline(self):
        seed = (self.seed * 1_000_003 + self.rank * 10_007 + self.sampler.epoch * 101
                + self.sampler.start_iter) % (2 ** 31)
        return build_pipeline(self.dali, self.specs, EpochSource(self), self.batch_size,
                              self.num_threads, self.device_id, seed)

"""Multi-crop dataset: for each image, nmb_crops[i] random crops at resolution size_crops[i].

Augmentations as the original: RandomResizedCrop -> flip -> colour distortion (jitter 0.8 with
p 0.8, grayscale p 0.2) -> Gaussian blur (p 0.5, sigma ~ U[0.1, 2]) -> ToTensor -> Normalize
(std 0.228, not torchvision's 0.229: kept as in the original). The crops leave the loader as
uint8 (a quarter of float32's bytes across PCIe, and no float work in the loader workers):
`normalize_crops` (called on the device by src/engine.py `to_device`) does ToTensor's /255 and
Normalize there, with the same float32 operations, so the values are the original's.

Randomness comes from torch's RNG only (the original drew the blur coin from numpy, which repeats
across DataLoader workers). With a `SeededSampler` each sample is augmented from its own seed,
a function of (seed, epoch, index): the crops do not depend on the number of workers, and a
resumed run (even mid-epoch) sees exactly the crops an uninterrupted run would have seen.
"""
import functools
import logging
from contextlib import nullcontext

import torch
import torch.nn.functional as F
import torchvision.datasets as datasets
import torchvision.transforms as transforms
from PIL import Image, ImageFilter

from .errors import UsageError
# IMG_EXTENSIONS, DataError: importable from here as before
from .imagelist import IMG_EXTENSIONS, DataError, ImageList, class_counts, find_images  # noqa: F401

logger = logging.getLogger()

MEAN = [0.485, 0.456, 0.406]
STD = [0.228, 0.224, 0.225]
BAD_COUNT_SLOTS = 64  # per-worker counters of unreadable images (worker id modulo this)


def check_image_folder(path, what="--data_path"):
    """Images per class of a labelled folder (the evaluations'): one-line errors for a missing
    path, no image at all, or no class sub-folders; warnings for ignored files and empty class
    folders (src/imagelist.py)."""
    return class_counts(path, what)


class SafeImageFolder(datasets.VisionDataset):
    """The images of a --data_path in any layout (an ImageList, or a path given to find_images),
    as torchvision's ImageFolder shows them: .samples / .imgs (path, target), .targets, .classes,
    .class_to_idx, .root; the target is the class index, 0 for images without classes.
    Unreadable files are skipped with a warning naming them (or, with strict_data, stop the run
    with the path)."""

    def __init__(self, root, transform=None, strict_data=False):
        images = root if isinstance(root, ImageList) else find_images(root)
        super().__init__(images.root, transform=transform)
        self.images = images
        self.classes = list(images.classes or [])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = list(zip(images.paths, images.labels or [0] * len(images)))
        self.imgs = self.samples
        self.targets = [s[1] for s in self.samples]
        self.strict_data = strict_data
        # DataLoader workers hold copies of the dataset: each counts its bad files in its own
        # slot of a shared-memory tensor (shared under fork and spawn alike, no lock needed)
        self._nmb_bad = torch.zeros(1 + BAD_COUNT_SLOTS, dtype=torch.int64).share_memory_()
        self._nmb_bad_reported = 0

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        image, used = self.load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.samples[used][1]

    @property
    def nmb_bad_images(self):
        """Unreadable files met so far, by this process and every DataLoader worker."""
        return int(self._nmb_bad.sum())

    def pop_bad_images(self):
        """Unreadable files met since the previous call (call it in the main process)."""
        total = self.nmb_bad_images
        new, self._nmb_bad_reported = total - self._nmb_bad_reported, total
        return new

    def load_image(self, index):
        """(PIL image, index actually used): a bad file is replaced by the next good one."""
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            path = self.samples[i][0]
            try:
                with open(path, "rb") as f:
                    img = Image.open(f)
                    img.load()
                    return img.convert("RGB"), i
            except Exception as e:
                if self.strict_data:
                    raise DataError(f"unreadable image {path}: {e}") from None
                worker = torch.utils.data.get_worker_info()
                self._nmb_bad[0 if worker is None else 1 + worker.id % BAD_COUNT_SLOTS] += 1
                logger.warning(f"skipping unreadable image {path}: {e}")
        raise DataError(f"no readable image in {self.root}")


class PILRandomGaussianBlur:
    """With probability p, PIL Gaussian blur with radius ~ U[radius_min, radius_max]."""

    def __init__(self, p=0.5, radius_min=0.1, radius_max=2.0):
        self.prob, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img):
        if torch.rand(()).item() >= self.prob:
            return img
        radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


class KernelGaussianBlur:
    """The blur behind the published numbers: OpenCV's GaussianBlur with a fixed 23x23 kernel,
    sigma ~ U[0.1, 2], reflect-101 border, done here in torch (no OpenCV dependency)."""

    def __init__(self, p=0.5, kernel_size=23, sigma_min=0.1, sigma_max=2.0):
        self.prob, self.kernel_size = p, kernel_size
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, img):
        if torch.rand(()).item() >= self.prob:
            return img
        sigma = self.sigma_min + (self.sigma_max - self.sigma_min) * torch.rand(()).item()
        x = transforms.functional.pil_to_tensor(img).float().unsqueeze(0)  # 1 x C x H x W
        half = self.kernel_size // 2
        t = torch.arange(-half, half + 1, dtype=torch.float32)
        k = torch.exp(-t ** 2 / (2 * sigma ** 2))
        k = k / k.sum()
        c = x.shape[1]
        pad_h, pad_w = min(half, x.shape[2] - 1), min(half, x.shape[3] - 1)
        x = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
        # images smaller than the kernel: truncate it (and renormalise) to what reflect allows
        kw = k[half - pad_w: half + pad_w + 1]
        kh = k[half - pad_h: half + pad_h + 1]
        kw, kh = kw / kw.sum(), kh / kh.sum()
        x = F.conv2d(x, kw.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
        x = F.conv2d(x, kh.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
        x = x.round_().clamp_(0, 255).to(torch.uint8)[0]
        return transforms.functional.to_pil_image(x)


BLURS = ("pil", "opencv", "none")


def make_blur(blur, p=0.5):
    """--blur: PIL's radius blur (the final original code), the 23x23-kernel blur of the published
    runs, or none (small images, where a sigma-2 blur wipes out a 32x32 crop; SimCLR's CIFAR
    setting). `none` is the PIL blur with probability 0: same random draws, image untouched."""
    if blur not in BLURS:
        raise UsageError(f"--blur must be one of {', '.join(BLURS)}, got {blur!r}")
    if blur == "opencv":
        return KernelGaussianBlur(p=p)
    return PILRandomGaussianBlur(p=p if blur == "pil" else 0.0)


def get_color_distortion(s=1.0):
    color_jitter = transforms.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
    rnd_color_jitter = transforms.RandomApply([color_jitter], p=0.8)
    rnd_gray = transforms.RandomGrayscale(p=0.2)
    return transforms.Compose([rnd_color_jitter, rnd_gray])


def normalize_crops(x, mean=MEAN, std=STD):
    """uint8 C x H x W (or N x C x H x W) crops -> float32 Normalize(ToTensor(crop)): the same
    float32 operations in the same order as those two transforms (so equal to float rounding,
    bit for bit on the CPU). Run it where the crops are: on the GPU for training."""
    x = x.to(torch.float32).div_(255)
    m, s = _channel_stats(x.device, tuple(mean), tuple(std))
    return x.sub_(m).div_(s)


@functools.lru_cache(maxsize=None)
def _channel_stats(device, mean, std):
    # made once per device: a copy of a Python list to the GPU would wait for the GPU each step
    return tuple(torch.tensor(v, dtype=torch.float32).view(-1, 1, 1).to(device)
                 for v in (mean, std))


def to_tensor(host_normalize=False):
    """The pipelines' last step(s): uint8 crops (PILToTensor), or the original's float32
    ToTensor + Normalize on the host."""
    if host_normalize:
        return [transforms.ToTensor(), transforms.Normalize(mean=MEAN, std=STD)]
    return [transforms.PILToTensor()]


def multicrop_transforms(size_crops, nmb_crops, min_scale_crops, max_scale_crops, blur="pil",
                         augment="fast", host_normalize=False):
    """The list of per-crop transforms, crops of resolution 0 first.

    augment="fast" (default): src/fastaugment.py, which draws the same random numbers and
    returns the same tensors as the torchvision/PIL pipeline ("pil"), in less time; it falls
    back to "pil" when numba is not installed. Each crop is a uint8 3 x H x W tensor (normalised
    on the device: `normalize_crops`); host_normalize=True ends with the original's ToTensor +
    Normalize on the host instead (float32; benchmarks and tests of the two paths)."""
    if not (len(size_crops) == len(nmb_crops) == len(min_scale_crops) == len(max_scale_crops)):
        raise UsageError(
            "--size_crops, --nmb_crops, --min_scale_crops and --max_scale_crops must have the same "
            f"length, got {len(size_crops)}, {len(nmb_crops)}, {len(min_scale_crops)}, "
            f"{len(max_scale_crops)}")
    for lo, hi in zip(min_scale_crops, max_scale_crops):
        if not 0 < lo <= hi <= 1:
            raise UsageError(f"crop scales must satisfy 0 < min <= max <= 1, got ({lo}, {hi})")
    blur_t = make_blur(blur)
    if augment not in ("fast", "pil"):
        raise UsageError(f"--augment must be fast or pil, got {augment!r}")
    if augment == "fast":
        from . import fastaugment
        if fastaugment.available():
            fastaugment.warm_up()
            trans = []
            for i in range(len(size_crops)):
                t = fastaugment.FastCropTransform(
                    size_crops[i], (min_scale_crops[i], max_scale_crops[i]), blur_t,
                    *((MEAN, STD) if host_normalize else ()))
                trans.extend([t] * nmb_crops[i])
            return trans
        logger.warning("numba is not installed: using the (slower) PIL augmentation pipeline")
    trans = []
    for i in range(len(size_crops)):
        t = transforms.Compose([
            transforms.RandomResizedCrop(size_crops[i], scale=(min_scale_crops[i], max_scale_crops[i])),
            transforms.RandomHorizontalFlip(p=0.5),
            get_color_distortion(),
            blur_t,
            *to_tensor(host_normalize),
        ])
        trans.extend([t] * nmb_crops[i])
    return trans


class MultiCropDataset(SafeImageFolder):
    """`data_path`: an ImageList, or a path in any layout (src/imagelist.py find_images)."""

    def __init__(self, data_path, size_crops, nmb_crops, min_scale_crops, max_scale_crops,
                 size_dataset=-1, return_index=False, blur="pil", strict_data=False,
                 augment="fast"):
        self.trans = multicrop_transforms(size_crops, nmb_crops, min_scale_crops,
                                          max_scale_crops, blur, augment)
        super().__init__(data_path, strict_data=strict_data)
        if size_dataset >= 0:
            self.samples = self.samples[:size_dataset]
            self.imgs = self.samples
            self.targets = [s[1] for s in self.samples]
        self.return_index = return_index

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        image, _ = self.load_image(index)
        if seed is None:
            multi_crops = [t(image) for t in self.trans]
        else:
            # in the main process (workers=0) the global RNG must not be disturbed
            in_main = torch.utils.data.get_worker_info() is None
            with torch.random.fork_rng(devices=[]) if in_main else nullcontext():
                torch.default_generator.manual_seed(seed)
                multi_crops = [t(image) for t in self.trans]
        if self.return_index:
            return index, multi_crops
        return multi_crops


class SeededSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that (a) can start an epoch at a given batch, for mid-epoch resume,
    and (b) optionally yields (index, seed) so each sample has its own augmentation seed."""

    def __init__(self, dataset, num_replicas=1, rank=0, seed=0, batch_size=1, seeded=True,
                 shuffle=True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, seed=seed, shuffle=shuffle)
        self.batch_size = batch_size
        self.seeded = seeded
        self.start_iter = 0

    def set_epoch(self, epoch, start_iter=0):
        super().set_epoch(epoch)
        self.start_iter = start_iter

    def __iter__(self):
        indices = list(super().__iter__())[self.start_iter * self.batch_size:]
        if not self.seeded:
            return iter(indices)
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        return iter((i, (base + i) % (2 ** 63)) for i in indices)

    def __len__(self):
        return max(0, self.num_samples - self.start_iter * self.batch_size)

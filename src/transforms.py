"""The pre-trainings' augmentations, in one place: SwAV's / DeepCluster-v2's multi-crop and
SimSiam's two views, the Gaussian blurs, the colour distortion and the normalisation.

Multi-crop, as the original: RandomResizedCrop -> flip -> colour distortion (jitter 0.8 with
p 0.8, grayscale p 0.2) -> Gaussian blur (p 0.5, sigma ~ U[0.1, 2]) -> ToTensor -> Normalize
(std 0.228, not torchvision's 0.229: kept as in the original). The crops leave the loader as
uint8 (a quarter of float32's bytes across PCIe, and no float work in the loader workers):
`normalize_crops` (called on the device by src/data.py `to_device`) does ToTensor's /255 and
Normalize there, with the same float32 operations, so the values are the original's.

Randomness comes from torch's RNG only (the original drew the blur coin from numpy, which repeats
across DataLoader workers). `--augment fast` runs each crop through src/fastaugment.py, which
draws the same random numbers and returns the same tensors; that module imports nothing from
here (the blurs tell it their draws through `draw` / `apply`), so the imports go one way.
Each crop's numbers (scales, ratio, probabilities, strengths) are in one CropSpec, which the
torchvision, fast and DALI (src/dali.py, --data_backend dali) pipelines are all built from.
"""
import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms as transforms
from PIL import ImageFilter

from . import fastaugment
from .errors import UsageError

logger = logging.getLogger()

MEAN = [0.485, 0.456, 0.406]
STD = [0.228, 0.224, 0.225]
BLURS = ("pil", "opencv", "none")
AUGMENTS = ("fast", "pil")
BLUR_SIGMA = (0.1, 2.0)  # the blurs' strength range (PIL radius or OpenCV sigma)
OPENCV_KERNEL = 23  # the published runs' fixed kernel


@dataclass(frozen=True)
class CropSpec:
    """One crop's random distribution, the one source of truth of its numbers: the torchvision
    and fast pipelines below and the DALI pipeline (src/dali.py) are all built from it, so they
    cannot drift apart (tests/test_dali.py checks the built objects against it).

    RandomResizedCrop(size, scale, ratio) -> flip p flip_p -> ColorJitter(0.8 s, 0.8 s, 0.8 s,
    0.2 s) with p jitter_p -> greyscale p gray_p -> `blur` with p blur_p, strength ~ U[blur_sigma]
    (SwAV / DeepCluster-v2: s = 1; SimSiam: s = 0.5, i.e. MoCo v2's 0.4, 0.4, 0.4, 0.1)."""
    size: int
    scale: tuple
    ratio: tuple = (3. / 4., 4. / 3.)
    flip_p: float = 0.5
    jitter_strength: float = 1.0
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur: str = "pil"
    blur_p: float = 0.5
    blur_sigma: tuple = BLUR_SIGMA

    @property
    def jitter(self):
        """ColorJitter's (brightness, contrast, saturation, hue) strengths."""
        s = self.jitter_strength
        return (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)

    @property
    def blur_prob(self):
        """The probability that a crop is blurred (--blur none: never)."""
        return 0.0 if self.blur == "none" else self.blur_p

    @property
    def blur_kernel(self):
        """The blur's fixed kernel width (OpenCV's), or 0: PIL's radius blur (no fixed kernel)."""
        return OPENCV_KERNEL if self.blur == "opencv" else 0


class RandomGaussianBlur:
    """With probability p, a Gaussian blur of strength ~ U[lo, hi] (PIL image in and out).
    `draw` is the one place the coin and the strength are drawn (torch's RNG, in this order):
    the PIL pipeline (`__call__`) and src/fastaugment.py both go through it."""
    rgbx = False  # whether `apply` takes src/fastaugment.py's RGBX image as it is

    def __init__(self, p, lo, hi):
        self.prob, self.lo, self.hi = p, lo, hi

    def draw(self):
        """The strength of this image's blur, or None: not blurred."""
        if torch.rand(()).item() >= self.prob:
            return None
        return self.lo + (self.hi - self.lo) * torch.rand(()).item()

    def apply(self, img, strength):
        raise NotImplementedError

    def __call__(self, img):
        strength = self.draw()
        return img if strength is None else self.apply(img, strength)


class PILRandomGaussianBlur(RandomGaussianBlur):
    """With probability p, PIL Gaussian blur with radius ~ U[radius_min, radius_max]."""
    rgbx = True  # PIL blurs every band alike: the padding byte changes nothing

    def __init__(self, p=0.5, radius_min=BLUR_SIGMA[0], radius_max=BLUR_SIGMA[1]):
        super().__init__(p, radius_min, radius_max)
        self.radius_min, self.radius_max = radius_min, radius_max

    def apply(self, img, radius):
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


class KernelGaussianBlur(RandomGaussianBlur):
    """The blur behind the published numbers: OpenCV's GaussianBlur with a fixed 23x23 kernel,
    sigma ~ U[0.1, 2], reflect-101 border, done here in torch (no OpenCV dependency)."""

    def __init__(self, p=0.5, kernel_size=OPENCV_KERNEL, sigma_min=BLUR_SIGMA[0],
                 sigma_max=BLUR_SIGMA[1]):
        super().__init__(p, sigma_min, sigma_max)
        self.kernel_size, self.sigma_min, self.sigma_max = kernel_size, sigma_min, sigma_max

    def apply(self, img, sigma):
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


def check_blur(blur):
    if blur not in BLURS:
        raise UsageError(f"--blur must be one of {', '.join(BLURS)}, got {blur!r}")


def make_blur(blur, p=0.5, sigma=BLUR_SIGMA):
    """--blur: PIL's radius blur (the final original code), the 23x23-kernel blur of the published
    runs, or none (small images, where a sigma-2 blur wipes out a 32x32 crop; SimCLR's CIFAR
    setting). `none` is the PIL blur with probability 0: same random draws, image untouched."""
    check_blur(blur)
    if blur == "opencv":
        return KernelGaussianBlur(p=p, sigma_min=sigma[0], sigma_max=sigma[1])
    return PILRandomGaussianBlur(p=p if blur == "pil" else 0.0, radius_min=sigma[0],
                                 radius_max=sigma[1])


def spec_blur(spec):
    """The blur transform of a CropSpec (--blur none: the PIL blur with probability 0)."""
    return make_blur(spec.blur, spec.blur_prob, spec.blur_sigma)


def color_distortion(spec):
    """A CropSpec's colour jitter (applied with p jitter_p) then greyscale (p gray_p)."""
    rnd_color_jitter = transforms.RandomApply([transforms.ColorJitter(*spec.jitter)],
                                              p=spec.jitter_p)
    rnd_gray = transforms.RandomGrayscale(p=spec.gray_p)
    return transforms.Compose([rnd_color_jitter, rnd_gray])


def get_color_distortion(s=1.0):
    """The original's function: jitter 0.8 s (hue 0.2 s) with p 0.8, greyscale p 0.2."""
    return color_distortion(CropSpec(size=0, scale=(1.0, 1.0), jitter_strength=s))


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


def check_crop_scales(min_scales, max_scales):
    for lo, hi in zip(min_scales, max_scales):
        if not 0 < lo <= hi <= 1:
            raise UsageError(f"crop scales must satisfy 0 < min <= max <= 1, got ({lo}, {hi})")


def use_fast(augment):
    """Whether --augment runs src/fastaugment.py: `fast` with numba installed (its kernels
    compiled here, once, before the loader workers fork); `fast` without numba warns and keeps
    the PIL pipeline."""
    if augment not in AUGMENTS:
        raise UsageError(f"--augment must be fast or pil, got {augment!r}")
    if augment == "fast":
        if fastaugment.available():
            fastaugment.warm_up()
            return True
        logger.warning("numba is not installed: using the (slower) PIL augmentation pipeline")
    return False


def _fast_crop(spec, host_normalize):
    stats = (MEAN, STD) if host_normalize else (None, None)
    return fastaugment.FastCropTransform(spec.size, spec.scale, spec_blur(spec), *stats,
                                         jitter_strength=spec.jitter_strength,
                                         p_jitter=spec.jitter_p, p_gray=spec.gray_p,
                                         p_flip=spec.flip_p)


def multicrop_specs(size_crops, nmb_crops, min_scale_crops, max_scale_crops, blur="pil"):
    """One CropSpec per crop (nmb_crops[i] copies of resolution i's, crops of resolution 0
    first), after the flags' checks."""
    if not (len(size_crops) == len(nmb_crops) == len(min_scale_crops) == len(max_scale_crops)):
        raise UsageError(
            "--size_crops, --nmb_crops, --min_scale_crops and --max_scale_crops must have the same "
            f"length, got {len(size_crops)}, {len(nmb_crops)}, {len(min_scale_crops)}, "
            f"{len(max_scale_crops)}")
    check_crop_scales(min_scale_crops, max_scale_crops)
    check_blur(blur)
    return [CropSpec(size, (lo, hi), blur=blur)
            for size, n, lo, hi in zip(size_crops, nmb_crops, min_scale_crops, max_scale_crops)
            for _ in range(n)]


def simsiam_spec(size=224, min_scale=0.2, max_scale=1.0, blur="pil"):
    """SimSiam's (= MoCo v2's) view: half of SwAV's jitter strength (0.4, 0.4, 0.4, 0.1)."""
    check_crop_scales([min_scale], [max_scale])
    check_blur(blur)
    return CropSpec(size, (min_scale, max_scale), jitter_strength=0.5, blur=blur)


def multicrop_transforms(size_crops, nmb_crops, min_scale_crops, max_scale_crops, blur="pil",
                         augment="fast", host_normalize=False):
    """The list of per-crop transforms, crops of resolution 0 first (multicrop_specs).

    augment="fast" (default): src/fastaugment.py, which draws the same random numbers and
    returns the same tensors as the torchvision/PIL pipeline ("pil"), in less time; it falls
    back to "pil" when numba is not installed. Each crop is a uint8 3 x H x W tensor (normalised
    on the device: `normalize_crops`); host_normalize=True ends with the original's ToTensor +
    Normalize on the host instead (float32; benchmarks and tests of the two paths)."""
    specs = multicrop_specs(size_crops, nmb_crops, min_scale_crops, max_scale_crops, blur)
    fast = use_fast(augment)
    trans, built = [], {}
    for spec in specs:  # one transform per resolution, shared by its crops
        if spec not in built:
            built[spec] = _fast_crop(spec, host_normalize) if fast else transforms.Compose([
                transforms.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio),
                transforms.RandomHorizontalFlip(p=spec.flip_p),
                color_distortion(spec),
                spec_blur(spec),
                *to_tensor(host_normalize),
            ])
        trans.append(built[spec])
    return trans


def simsiam_transform(size=224, min_scale=0.2, max_scale=1.0, blur="pil", augment="fast",
                      host_normalize=False):
    """SimSiam's (= MoCo v2's) augmentation (simsiam_spec): crop, jitter 0.4/0.4/0.4/0.1 with
    p 0.8, grayscale p 0.2, blur p 0.5, flip, then uint8 out (normalised with this project's
    mean/std on the device, src/data.py to_device), or host_normalize=True: ToTensor + Normalize
    here.

    augment="pil": the original's torchvision pipeline, in its order. "fast" (default):
    src/fastaugment.py with half of SwAV's jitter strength, i.e. the same jitter; it draws the
    flip right after the crop instead of last, which gives the same distribution (a flip
    commutes with per-pixel colour changes and a symmetric blur) but other views for a seed."""
    spec = simsiam_spec(size, min_scale, max_scale, blur)
    if use_fast(augment):
        return _fast_crop(spec, host_normalize)
    return transforms.Compose([
        transforms.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio),
        *color_distortion(spec).transforms,
        spec_blur(spec),
        transforms.RandomHorizontalFlip(p=spec.flip_p),
        *to_tensor(host_normalize),
    ])

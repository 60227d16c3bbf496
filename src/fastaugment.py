"""Fast multi-crop augmentation: the original's transforms, random draws and pixels, in less time.

`FastCropTransform` replaces one crop's torchvision pipeline of `multicropdataset.multicrop_transforms`
(RandomResizedCrop -> flip -> ColorJitter(0.8, 0.8, 0.8, 0.2) with p 0.8 -> grayscale p 0.2 -> blur
-> ToTensor -> Normalize). It draws the same random numbers from torch's RNG in the same order
(torchvision's own `get_params`), so under a given seed it picks the same crop, flip, jitter
order and factors, grayscale and blur as the original. The pixels are the same too: decoding,
crop+resize and blur are PIL's own calls, and the kernels below redo PIL's arithmetic for the
rest (tests/test_fastaugment.py checks the output tensors are equal bit for bit). Where the time
goes instead:
- colour jitter and grayscale run in place on the uint8 crop (numba); PIL makes a new image per
  operation and its RGB <-> HSV conversions for the hue shift are slow;
- ToTensor + Normalize become one pass through a per-channel 256-entry table that holds exactly
  the float32 values those two transforms compute.
Without numba, `available()` is False and the dataset keeps the PIL pipeline.
"""
import math

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

try:
    import numba
except ImportError:  # the dataset falls back to the PIL pipeline
    numba = None


def available():
    return numba is not None


def _njit(fn):
    # no fastmath: float32/float64 rounding must be exactly PIL's (no FMA contraction);
    # error_model numpy: no Python division checks, so the loops vectorise (no division by 0 here)
    if numba is None:
        return fn
    return numba.njit(cache=True, nogil=True, error_model="numpy")(fn)


# ----------------------------------------------------------------------------- PIL's arithmetic
# Each kernel works in place on the three colour planes of a crop (1-D uint8 arrays R, G, B):
# branch-free loops over contiguous arrays, which LLVM vectorises.
@_njit
def _blend(d, v, alpha):
    """Image.blend(degenerate d, image v, alpha) for one 8-bit value: float32, truncated, clipped."""
    t = np.float32(d) + alpha * np.float32(v - d)
    return np.int32(min(max(t, np.float32(0)), np.float32(255)))


@_njit
def _luma(r, g, b):
    """PIL's RGB -> L (ITU-R 601-2 in 16-bit fixed point)."""
    return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


@_njit
def _blend_table(d, alpha):
    lut = np.empty(256, np.uint8)
    for v in range(256):
        lut[v] = _blend(np.int32(d), np.int32(v), alpha)
    return lut


@_njit
def _apply_table(R, G, B, lut):
    for k in range(R.shape[0]):
        R[k] = lut[R[k]]
        G[k] = lut[G[k]]
        B[k] = lut[B[k]]


@_njit
def brightness_(R, G, B, alpha):
    """ImageEnhance.Brightness(img).enhance(alpha): blend with black."""
    _apply_table(R, G, B, _blend_table(0, alpha))


@_njit
def contrast_(R, G, B, alpha):
    """ImageEnhance.Contrast: blend with the mean grey level (of L, rounded) of the image."""
    total = np.int64(0)
    for k in range(R.shape[0]):
        total += _luma(np.int32(R[k]), np.int32(G[k]), np.int32(B[k]))
    mean = int(total / R.shape[0] + 0.5)
    _apply_table(R, G, B, _blend_table(mean, alpha))


@_njit
def saturation_(R, G, B, alpha):
    """ImageEnhance.Color: blend each pixel with its own grey level."""
    for k in range(R.shape[0]):
        r, g, b = np.int32(R[k]), np.int32(G[k]), np.int32(B[k])
        lum = _luma(r, g, b)
        R[k] = _blend(lum, r, alpha)
        G[k] = _blend(lum, g, alpha)
        B[k] = _blend(lum, b, alpha)


@_njit
def grayscale_(R, G, B):
    """RandomGrayscale on a PIL image: L replicated to 3 channels."""
    for k in range(R.shape[0]):
        lum = _luma(np.int32(R[k]), np.int32(G[k]), np.int32(B[k]))
        R[k] = lum
        G[k] = lum
        B[k] = lum


@_njit
def _round_half_away(x):  # C round() for x >= 0
    f = math.floor(x)
    return np.int32(f) + np.int32(x - f >= 0.5)


@_njit
def hue_(R, G, B, shift):
    """torchvision's adjust_hue on a PIL image: PIL's 8-bit HSV (its float32 and float64 steps
    in its order), hue byte + shift modulo 256, back to RGB with PIL's rounding."""
    for k in range(R.shape[0]):
        r, g, b = np.int32(R[k]), np.int32(G[k]), np.int32(B[k])
        # RGB -> HSV
        maxc = max(r, max(g, b))
        minc = min(r, min(g, b))
        crv = maxc - minc
        cr = np.float32(crv if crv > 0 else 1)
        s = cr / np.float32(maxc if maxc > 0 else 1)
        rc = np.float32(maxc - r) / cr
        gc = np.float32(maxc - g) / cr
        bc = np.float32(maxc - b) / cr
        h_r = bc - gc
        h_g = np.float32(2.0 + np.float64(rc) - np.float64(bc))
        h_b = np.float32(4.0 + np.float64(gc) - np.float64(rc))
        hh = h_r if r == maxc else (h_g if g == maxc else h_b)
        x = np.float64(hh) / 6.0 + 1.0
        hh = np.float32(x - math.floor(x))  # = fmod(x, 1): x is in (0.8, 2)
        uh = min(max(np.int32(np.float64(hh) * 255.0), 0), 255)
        us = min(max(np.int32(np.float64(s) * 255.0), 0), 255)
        # shift the hue byte (wraps around)
        uh = (uh + shift) & 255
        # HSV -> RGB
        hf = np.float64(np.float32(uh)) * 6.0 / 255.0
        i = np.int32(math.floor(hf))
        f = np.float32(hf - np.float64(np.float32(i)))
        i = i - 6 if i >= 6 else i
        fs = np.float32(np.float64(np.float32(us)) / 255.0)
        vf = np.float64(np.float32(maxc))
        p = _round_half_away(vf * (1.0 - np.float64(fs)))
        q = _round_half_away(vf * (1.0 - np.float64(fs * f)))
        t = _round_half_away(vf * (1.0 - np.float64(fs) * (1.0 - np.float64(f))))
        v = maxc
        ro = v if (i == 0 or i == 5) else (q if i == 1 else (p if (i == 2 or i == 3) else t))
        go = t if i == 0 else (v if (i == 1 or i == 2) else (q if i == 3 else p))
        bo = p if (i == 0 or i == 1) else (t if i == 2 else (v if (i == 3 or i == 4) else q))
        unchanged = crv == 0  # grey pixel: no hue
        grey = us == 0
        R[k] = r if unchanged else (v if grey else ro)
        G[k] = g if unchanged else (v if grey else go)
        B[k] = b if unchanged else (v if grey else bo)


@_njit
def interleave(R, G, B, out):
    """Planes -> H x W x 3 pixels (out: N x 3 uint8), for PIL's blur."""
    for k in range(R.shape[0]):
        out[k, 0] = R[k]
        out[k, 1] = G[k]
        out[k, 2] = B[k]


@_njit
def normalize_(R, G, B, lut, out):
    """out[c, k] = lut[c, plane_c[k]]: ToTensor + Normalize in one pass."""
    for k in range(R.shape[0]):
        out[0, k] = lut[0, R[k]]
        out[1, k] = lut[1, G[k]]
        out[2, k] = lut[2, B[k]]


def normalize_table(mean, std):
    """[3, 256] float32: Normalize(ToTensor(v)) for every 8-bit value, computed by the same
    float32 operations as those transforms (so the table lookup is exact)."""
    v = torch.arange(256, dtype=torch.uint8).view(1, 256).expand(3, 256).contiguous()
    x = v.to(dtype=torch.get_default_dtype()).div(255)
    m = torch.as_tensor(mean, dtype=x.dtype).view(3, 1)
    s = torch.as_tensor(std, dtype=x.dtype).view(3, 1)
    return x.sub_(m).div_(s).numpy().astype(np.float32)


# ----------------------------------------------------------------------------- the transform
class FastCropTransform:
    """One crop of the multi-crop pipeline; same draws, same order, same pixels as the original:

        RandomResizedCrop(size, scale) -> RandomHorizontalFlip(0.5)
        -> RandomApply([ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8) -> RandomGrayscale(0.2)
        -> blur (the given callable, PIL image in and out) -> ToTensor -> Normalize(mean, std)
    """

    def __init__(self, size, scale, blur, mean, std, jitter_strength=1.0, p_jitter=0.8,
                 p_gray=0.2, p_flip=0.5):
        self.size = size
        self.rrc = T.RandomResizedCrop(size, scale=tuple(scale))
        s = jitter_strength
        self.jitter = T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        self.p_jitter, self.p_gray, self.p_flip = p_jitter, p_gray, p_flip
        self.blur = blur
        from .multicropdataset import PILRandomGaussianBlur  # here: that module imports this one
        self._pil_blur = type(blur) is PILRandomGaussianBlur
        self.lut = normalize_table(mean, std)

    def draw_jitter(self):
        """(apply?, order, brightness, contrast, saturation, hue) exactly as RandomApply and
        ColorJitter draw them."""
        if self.p_jitter < torch.rand(1):
            return False, None
        return True, self.jitter.get_params(self.jitter.brightness, self.jitter.contrast,
                                            self.jitter.saturation, self.jitter.hue)

    def __call__(self, img):
        planes = self.crop(img)
        self.colour(planes)
        planes = self.blur_planes(planes)
        return self.to_tensor(planes)

    def crop(self, img):
        """RandomResizedCrop + flip (PIL's resampling): the crop as 3 x H x W uint8 planes."""
        i, j, h, w = self.rrc.get_params(img, self.rrc.scale, self.rrc.ratio)
        crop = img.crop((j, i, j + w, i + h)).resize(self.rrc.size[::-1], Image.BILINEAR)
        if torch.rand(1) < self.p_flip:
            crop = TF.hflip(crop)
        return np.ascontiguousarray(np.asarray(crop).transpose(2, 0, 1))

    def colour(self, planes):
        """Colour jitter (p 0.8, random order) then grayscale (p 0.2), in place."""
        R, G, B = planes.reshape(3, -1)
        apply, params = self.draw_jitter()
        if apply:
            order, bri, con, sat, hue = params
            for fn_id in order.tolist():
                if fn_id == 0:
                    brightness_(R, G, B, np.float32(bri))
                elif fn_id == 1:
                    contrast_(R, G, B, np.float32(con))
                elif fn_id == 2:
                    saturation_(R, G, B, np.float32(sat))
                else:  # the hue byte shift of torchvision's adjust_hue
                    hue_(R, G, B, int(np.int32(hue * 255).astype(np.uint8)))
        if torch.rand(1) < self.p_gray:
            grayscale_(R, G, B)

    def blur_planes(self, planes):
        """The blur on a PIL image of the crop. For the default blur (PILRandomGaussianBlur) the
        coin and radius are drawn here as its __call__ draws them, so that the half of the crops
        left unblurred skip the conversion to PIL; any other blur callable gets a PIL image and
        draws its own."""
        if self._pil_blur:
            b = self.blur
            if torch.rand(()).item() >= b.prob:
                return planes
            radius = b.radius_min + (b.radius_max - b.radius_min) * torch.rand(()).item()
            blurred = self._to_pil(planes).filter(ImageFilter.GaussianBlur(radius=radius))
        else:
            pil = self._to_pil(planes)
            blurred = self.blur(pil)
            if blurred is pil:
                return planes
        return np.ascontiguousarray(np.asarray(blurred).transpose(2, 0, 1))

    @staticmethod
    def _to_pil(planes):
        _, height, width = planes.shape
        hwc = np.empty((height, width, 3), np.uint8)
        interleave(*planes.reshape(3, -1), hwc.reshape(-1, 3))
        return Image.fromarray(hwc)

    def to_tensor(self, planes):
        """ToTensor + Normalize: float32 3 x H x W."""
        _, height, width = planes.shape
        R, G, B = planes.reshape(3, -1)
        out = np.empty((3, height * width), np.float32)
        normalize_(R, G, B, self.lut, out)
        return torch.from_numpy(out).view(3, height, width)

    def __repr__(self):
        return (f"FastCropTransform(size={self.size}, scale={self.rrc.scale}, jitter="
                f"{self.jitter}, p_jitter={self.p_jitter}, p_gray={self.p_gray}, blur={self.blur})")


def warm_up():
    """Compile (or load from numba's cache) every kernel once, in the calling process, so
    DataLoader workers forked from it do not each compile them."""
    if numba is None:
        return
    R, G, B = np.array([[10, 200, 30], [5, 5, 5], [250, 3, 90]], np.uint8)
    brightness_(R, G, B, np.float32(1.1))
    contrast_(R, G, B, np.float32(0.9))
    saturation_(R, G, B, np.float32(1.2))
    hue_(R, G, B, 7)
    grayscale_(R, G, B)
    normalize_(R, G, B, np.zeros((3, 256), np.float32), np.empty((3, 3), np.float32))
    interleave(R, G, B, np.empty((3, 3), np.uint8))

"""Fast multi-crop augmentation: the original's transforms, random draws and pixels, in less time.

`FastCropTransform` replaces one crop's torchvision pipeline of `transforms.multicrop_transforms`
(RandomResizedCrop -> flip -> ColorJitter(0.8, 0.8, 0.8, 0.2) with p 0.8 -> grayscale p 0.2 -> blur
-> ToTensor -> Normalize). It draws the same random numbers from torch's RNG in the same order
(torchvision's own `get_params`), so under a given seed it picks the same crop, flip, jitter
order and factors, grayscale and blur as the original. The pixels are the same too: decoding,
crop+resize and blur are PIL's own calls, and the kernels below redo PIL's arithmetic for the
rest (tests/test_fastaugment.py checks the output tensors are equal bit for bit). Where the time
goes instead:
- colour jitter and grayscale run in place on the crop's pixels (numba); PIL makes a new image per
  operation and its RGB <-> HSV conversions for the hue shift are slow;
- the flip happens in the copy that takes the crop out of PIL, and the crop leaves as uint8
  channel planes in one pass (the training feed: normalised on the device, see
  transforms.normalize_crops); with mean/std given, ToTensor + Normalize are done on the
  host instead, in one pass through a per-channel 256-entry table that holds exactly the float32
  values those two transforms compute.
Without numba, `available()` is False and the dataset keeps the PIL pipeline. This module
imports nothing of the project's: src/transforms.py builds it and hands it the blur.
"""
import math

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

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
    try:  # compiled once per machine, kept in __pycache__ (or numba's user cache directory)
        return numba.njit(cache=True, nogil=True, error_model="numpy")(fn)
    except RuntimeError:  # no writable cache location: compile in each process
        return numba.njit(cache=False, nogil=True, error_model="numpy")(fn)


# ----------------------------------------------------------------------------- PIL's arithmetic
# A crop is held as PIL holds an RGB image: one 32-bit word per pixel, bytes R, G, B, X (PIL's
# "RGBX" raw layout), so going to and from PIL images is a plain copy. Each kernel is a
# branch-free loop over those words, in place, which LLVM vectorises.
_X = np.uint32(0xFF000000)


@_njit
def _unpack(w):
    return np.int32(w & 0xFF), np.int32((w >> 8) & 0xFF), np.int32((w >> 16) & 0xFF)


@_njit
def _pack(r, g, b):
    return np.uint32(r) | (np.uint32(g) << 8) | (np.uint32(b) << 16) | _X


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
    lut = np.empty(256, np.int32)
    for v in range(256):
        lut[v] = _blend(np.int32(d), np.int32(v), alpha)
    return lut


@_njit
def _apply_table(px, lut):
    for k in range(px.shape[0]):
        r, g, b = _unpack(px[k])
        px[k] = _pack(lut[r], lut[g], lut[b])


@_njit
def brightness_(px, alpha):
    """ImageEnhance.Brightness(img).enhance(alpha): blend with black."""
    _apply_table(px, _blend_table(0, alpha))


@_njit
def contrast_(px, alpha):
    """ImageEnhance.Contrast: blend with the mean grey level (of L, rounded) of the image."""
    total = np.int64(0)
    for k in range(px.shape[0]):
        r, g, b = _unpack(px[k])
        total += _luma(r, g, b)
    mean = int(total / px.shape[0] + 0.5)
    _apply_table(px, _blend_table(mean, alpha))


@_njit
def saturation_(px, alpha):
    """ImageEnhance.Color: blend each pixel with its own grey level."""
    for k in range(px.shape[0]):
        r, g, b = _unpack(px[k])
        lum = _luma(r, g, b)
        px[k] = _pack(_blend(lum, r, alpha), _blend(lum, g, alpha), _blend(lum, b, alpha))


@_njit
def grayscale_(px):
    """RandomGrayscale on a PIL image: L replicated to 3 channels."""
    for k in range(px.shape[0]):
        r, g, b = _unpack(px[k])
        lum = _luma(r, g, b)
        px[k] = _pack(lum, lum, lum)


@_njit
def _round_half_away(x):  # C round() for x >= 0
    f = math.floor(x)
    return np.int32(f) + np.int32(x - f >= 0.5)


def _hue_tables():
    """PIL's RGB -> HSV hue and saturation bytes, tabulated (numpy float32/float64 arithmetic is
    C's, step for step). With d_c = max(r, g, b) - c, PIL's hue depends on which channel is the
    maximum (r first, then g) and on the two other d's; the saturation on (max, max - min)."""
    a = np.arange(256, dtype=np.float32)
    A, B = np.meshgrid(a, a, indexing="ij")  # the two d's, in the order named below
    cr = np.maximum(np.maximum(A, B), 1)
    f64 = np.float64
    with np.errstate(invalid="ignore", divide="ignore"):
        h_r = (B / cr - A / cr).astype(f64)                                  # (d_g, d_b)
        h_g = (2.0 + (A / cr).astype(f64) - (B / cr).astype(f64)).astype(np.float32).astype(f64)
        h_b = (4.0 + (B / cr).astype(f64) - (A / cr).astype(f64)).astype(np.float32).astype(f64)
        hue = np.stack([h_r, h_g, h_b]) / 6.0 + 1.0                           # (d_r, d_b), (d_r, d_g)
        hue = (hue - np.floor(hue)).astype(np.float32)  # fmod(x, 1) for x in (0.8, 2)
        uh = np.clip((hue.astype(f64) * 255.0).astype(np.int32), 0, 255).reshape(-1)
        s = (np.minimum(B, A) / np.maximum(A, 1))  # [max, max - min]: cr / max in float32
        us = np.clip((s.astype(np.float32).astype(f64) * 255.0).astype(np.int32), 0, 255)
    return uh.astype(np.int32), us.reshape(-1).astype(np.int32)


_HUE, _SATURATION = _hue_tables()
# HSV -> RGB steps that depend on one byte, tabulated likewise: hue byte -> sector i (mod 6) and
# fraction f; saturation byte -> s / 255
_HF = np.arange(256).astype(np.float32).astype(np.float64) * 6.0 / 255.0
_SECTOR = np.floor(_HF).astype(np.int32)
_FRACTION = (_HF - _SECTOR.astype(np.float32).astype(np.float64)).astype(np.float32)
_SECTOR = _SECTOR % 6
_SAT = (np.arange(256).astype(np.float32).astype(np.float64) / 255.0).astype(np.float32)


@_njit
def hue_(px, shift):
    """torchvision's adjust_hue on a PIL image: PIL's 8-bit HSV (its float32 and float64 steps
    in its order), hue byte + shift modulo 256, back to RGB with PIL's rounding."""
    for k in range(px.shape[0]):
        r, g, b = _unpack(px[k])
        # RGB -> HSV (bytes, from the tables)
        maxc = max(r, max(g, b))
        crv = maxc - min(r, min(g, b))
        dr, dg, db = maxc - r, maxc - g, maxc - b
        branch = 0 if r == maxc else (1 if g == maxc else 2)
        first = dg if branch == 0 else dr
        second = dg if branch == 2 else db
        uh = _HUE[(branch << 16) + (first << 8) + second]
        us = _SATURATION[(maxc << 8) + crv]
        # shift the hue byte (wraps around)
        uh = (uh + shift) & 255
        # HSV -> RGB
        i = _SECTOR[uh]
        f = _FRACTION[uh]
        fs = _SAT[us]
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
        px[k] = _pack(r if unchanged else (v if grey else ro),
                      g if unchanged else (v if grey else go),
                      b if unchanged else (v if grey else bo))


@_njit
def colour_(px, order, factors, hue_shift, gray):
    """ColorJitter's operations in the drawn order (order empty: not applied), then grayscale:
    one call per crop."""
    for fn_id in order:
        if fn_id == 0:
            brightness_(px, factors[0])
        elif fn_id == 1:
            contrast_(px, factors[1])
        elif fn_id == 2:
            saturation_(px, factors[2])
        else:
            hue_(px, hue_shift)
    if gray:
        grayscale_(px)


@_njit
def planes_(px, out):
    """out[c, k] = channel c of pixel k (uint8): PILToTensor's C x H x W layout in one pass."""
    for k in range(px.shape[0]):
        r, g, b = _unpack(px[k])
        out[0, k] = r
        out[1, k] = g
        out[2, k] = b


@_njit
def normalize_(px, lut, out):
    """out[c, k] = lut[c, channel c of pixel k]: ToTensor + Normalize in one pass."""
    for k in range(px.shape[0]):
        r, g, b = _unpack(px[k])
        out[0, k] = lut[0, r]
        out[1, k] = lut[1, g]
        out[2, k] = lut[2, b]


def to_words(img, flip=False, writable=True):
    """A PIL RGB image as an H x W uint32 array of RGBX words, optionally mirrored left-right
    (the same pixels as a PIL transpose, in the copy that makes the array writable)."""
    if img.mode not in ("RGB", "RGBX"):
        img = img.convert("RGB")
    w, h = img.size
    words = np.frombuffer(img.tobytes("raw", "RGBX"), np.uint32).reshape(h, w)
    if flip:
        return words[:, ::-1].copy()
    return words.copy() if writable else words


def to_image(words):
    """An "RGBX" PIL image sharing the words' memory (PIL's filters treat it as RGB + padding)."""
    h, w = words.shape
    return Image.frombuffer("RGBX", (w, h), words, "raw", "RGBX", 0, 1)


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
        -> blur (the given callable, PIL image in and out) -> PILToTensor (uint8), or, with
        mean and std given, -> ToTensor -> Normalize(mean, std) (float32)
    """

    def __init__(self, size, scale, blur, mean=None, std=None, jitter_strength=1.0, p_jitter=0.8,
                 p_gray=0.2, p_flip=0.5):
        self.size = size
        self.rrc = T.RandomResizedCrop(size, scale=tuple(scale))
        s = jitter_strength
        self.jitter = T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        self.p_jitter, self.p_gray, self.p_flip = p_jitter, p_gray, p_flip
        self.blur = blur
        self.lut = None if mean is None else normalize_table(mean, std)
        self._no_jitter, self._no_factors = np.zeros(0, np.int64), np.ones(3, np.float32)

    def draw_jitter(self):
        """(apply?, order, brightness, contrast, saturation, hue) exactly as RandomApply and
        ColorJitter draw them."""
        if self.p_jitter < torch.rand(1):
            return False, None
        return True, self.jitter.get_params(self.jitter.brightness, self.jitter.contrast,
                                            self.jitter.saturation, self.jitter.hue)

    def __call__(self, img):
        words = self.crop(img)
        self.colour(words)
        words = self.blur_words(words)
        return self.to_tensor(words)

    def crop(self, img):
        """RandomResizedCrop + flip (PIL's resampling): the crop as H x W RGBX words."""
        i, j, h, w = self.rrc.get_params(img, self.rrc.scale, self.rrc.ratio)
        crop = img.crop((j, i, j + w, i + h)).resize(self.rrc.size[::-1], Image.BILINEAR)
        return to_words(crop, flip=bool(torch.rand(1) < self.p_flip))

    def colour(self, words):
        """Colour jitter (p 0.8, random order) then grayscale (p 0.2), in place."""
        apply, params = self.draw_jitter()
        if apply:
            order, bri, con, sat, hue = params
            order = order.numpy()
            factors = np.array([bri, con, sat], np.float32)
            shift = int(np.int32(hue * 255).astype(np.uint8))  # adjust_hue's hue byte shift
        else:
            order, factors, shift = self._no_jitter, self._no_factors, 0
        gray = bool(torch.rand(1) < self.p_gray)
        colour_(words.reshape(-1), order, factors, shift, gray)

    def blur_words(self, words):
        """The blur on a PIL image of the crop. A blur of src/transforms.py draws its coin and
        strength through its own `draw` (the same draws as its __call__), so the crops left
        unblurred skip the PIL image, and one that takes RGBX (`rgbx`) skips the RGB copy; any
        other blur callable gets an RGB PIL image and draws its own."""
        draw = getattr(self.blur, "draw", None)
        if draw is None:
            pil = to_image(words).convert("RGB")
            blurred = self.blur(pil)
            return words if blurred is pil else to_words(blurred, writable=False)
        strength = draw()
        if strength is None:
            return words
        image = to_image(words)
        blurred = self.blur.apply(image if self.blur.rgbx else image.convert("RGB"), strength)
        return to_words(blurred, writable=False)

    def to_tensor(self, words):
        """uint8 3 x H x W (PILToTensor), or float32 ToTensor + Normalize with mean/std."""
        height, width = words.shape
        if self.lut is None:
            out = np.empty((3, height * width), np.uint8)
            planes_(words.reshape(-1), out)
        else:
            out = np.empty((3, height * width), np.float32)
            normalize_(words.reshape(-1), self.lut, out)
        return torch.from_numpy(out).view(3, height, width)

    def __repr__(self):
        return (f"FastCropTransform(size={self.size}, scale={self.rrc.scale}, jitter="
                f"{self.jitter}, p_jitter={self.p_jitter}, p_gray={self.p_gray}, blur={self.blur})")


def warm_up():
    """Compile (or load from numba's cache) every kernel once, in the calling process, so
    DataLoader workers forked from it do not each compile them."""
    if numba is None:
        return
    px = to_words(Image.new("RGB", (3, 1), (10, 200, 30))).reshape(-1)
    brightness_(px, np.float32(1.1))
    contrast_(px, np.float32(0.9))
    saturation_(px, np.float32(1.2))
    hue_(px, 7)
    grayscale_(px)
    colour_(px, np.arange(4), np.ones(3, np.float32), 3, True)
    normalize_(px, np.zeros((3, 256), np.float32), np.empty((3, 3), np.float32))
    planes_(px, np.empty((3, 3), np.uint8))

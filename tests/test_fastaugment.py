"""The fast augmentation pipeline computes the original's transforms: same pixels for the same
parameters, same random draws for the same seed, same parameter distributions."""
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

from src import fastaugment as fa
from src.multicropdataset import MultiCropDataset, multicrop_transforms

pytestmark = pytest.mark.skipif(not fa.available(), reason="numba is not installed")


def textured(seed, w=60, h=45):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(h // 5 + 1, w // 5 + 1, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(np.int16)
    img = img + rng.integers(-20, 21, size=img.shape)  # grain
    img[: h // 3, : w // 3] = img[: h // 3, : w // 3, :1]  # grey pixels (hue must keep them)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def pixels(img):
    """The kernels' layout: one RGBX word per pixel, flat."""
    return fa.to_words(img).reshape(-1)


def rgb(px, img):
    return np.asarray(fa.to_image(px.reshape(img.size[1], img.size[0])).convert("RGB"))


@pytest.mark.parametrize("factor", [0.2, 0.55, 1.0, 1.37, 1.8])
def test_blend_kernels_equal_pil(factor):
    img = textured(1)
    for kernel, reference in [(fa.brightness_, TF.adjust_brightness),
                              (fa.contrast_, TF.adjust_contrast),
                              (fa.saturation_, TF.adjust_saturation)]:
        px = pixels(img)
        kernel(px, np.float32(factor))
        np.testing.assert_array_equal(rgb(px, img), np.asarray(reference(img, factor)),
                                      err_msg=kernel.__name__)


def test_hue_and_grayscale_kernels_equal_pil():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))  # all hues
    for hue in [-0.5, -0.2, -0.137, 0.0, 0.004, 0.11, 0.2, 0.5]:
        px = pixels(img)
        fa.hue_(px, int(np.int32(hue * 255).astype(np.uint8)))
        np.testing.assert_array_equal(rgb(px, img), np.asarray(TF.adjust_hue(img, hue)),
                                      err_msg=str(hue))
    px = pixels(img)
    fa.grayscale_(px)
    np.testing.assert_array_equal(rgb(px, img), np.asarray(TF.rgb_to_grayscale(img, 3)))


def test_normalize_table_equals_to_tensor_normalize():
    img = Image.fromarray((np.arange(256 * 3) % 256).astype(np.uint8).reshape(16, 16, 3))
    mean, std = [0.485, 0.456, 0.406], [0.228, 0.224, 0.225]
    out = np.empty((3, 256), np.float32)
    fa.normalize_(pixels(img), fa.normalize_table(mean, std), out)
    expected = TF.normalize(TF.to_tensor(img), mean, std)
    assert torch.equal(torch.from_numpy(out).view(3, 16, 16), expected)


@pytest.mark.parametrize("blur", ["pil", "opencv"])
def test_same_seed_same_tensors_and_same_draws(blur):
    args = ([32, 16], [2, 3], [0.14, 0.05], [1.0, 0.14])
    original = multicrop_transforms(*args, blur=blur, augment="pil")
    fast = multicrop_transforms(*args, blur=blur, augment="fast")
    assert isinstance(fast[0], fa.FastCropTransform)
    for seed in range(12):
        img = textured(100 + seed)
        torch.manual_seed(seed)
        a = [t(img) for t in original]
        state_a = torch.get_rng_state()
        torch.manual_seed(seed)
        b = [t(img) for t in fast]
        for x, y in zip(a, b):
            assert x.dtype == y.dtype == torch.uint8 and torch.equal(x, y)  # normalised later
        # the same number of random draws: the stream continues identically
        assert torch.equal(state_a, torch.get_rng_state())


class _Spy:
    """Records the parameters both pipelines draw, through the library calls they share."""

    def __init__(self, monkeypatch):
        import torchvision.transforms as T
        self.reset()
        rrc_params, cj_params = T.RandomResizedCrop.get_params, T.ColorJitter.get_params
        hflip, gray, colour_, to_words = TF.hflip, TF.rgb_to_grayscale, fa.colour_, fa.to_words
        spy = self

        def rrc(img, scale, ratio):
            i, j, h, w = rrc_params(img, scale, ratio)
            width, height = img.size
            spy.crops.append((h * w / (width * height), math.log(w / h)))
            return i, j, h, w

        def cj(*a):
            out = cj_params(*a)
            spy.jitters.append((out[0].tolist(),) + tuple(out[1:]))
            return out

        def flip(img):  # the original's flip
            spy.flips += 1
            return hflip(img)

        def words_fast(img, flip=False, writable=True):  # ours flips while copying the pixels
            spy.flips += bool(flip)
            return to_words(img, flip, writable)

        def to_gray(img, num_output_channels=1):  # the original's grayscale
            spy.grays += 1
            return gray(img, num_output_channels)

        def colour_fast(px, order, factors, shift, to_gray):  # ours: jitter + grayscale
            spy.grays += bool(to_gray)
            return colour_(px, order, factors, shift, to_gray)

        class Blur(ImageFilter.GaussianBlur):
            def __init__(self, radius=2):
                spy.radii.append(radius)
                super().__init__(radius)

        monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(rrc))
        monkeypatch.setattr(T.ColorJitter, "get_params", staticmethod(cj))
        monkeypatch.setattr(TF, "hflip", flip)
        monkeypatch.setattr(TF, "rgb_to_grayscale", to_gray)
        monkeypatch.setattr(fa, "colour_", colour_fast)
        monkeypatch.setattr(fa, "to_words", words_fast)
        monkeypatch.setattr(ImageFilter, "GaussianBlur", Blur)

    def reset(self):
        self.crops, self.jitters, self.flips, self.grays, self.radii = [], [], 0, 0, []


def test_parameter_distributions_match_the_original(monkeypatch):
    """Independent seeds for the two pipelines: the crop scales and aspect ratios, the jitter
    factors, orders and probabilities and the blur radii follow the same distributions
    (two-sample KS tests) at the nominal probabilities (binomial, 4.5 sigma)."""
    from scipy import stats
    spy = _Spy(monkeypatch)
    args = ([12, 8], [1, 1], [0.14, 0.05], [1.0, 0.14])
    img = textured(7, 160, 120)
    draws = {}
    for name, seed in [("pil", 0), ("fast", 1)]:
        trans = multicrop_transforms(*args, augment=name)
        spy.reset()
        torch.manual_seed(seed)
        n = 1500
        for _ in range(n):
            for t in trans:
                t(img)
        draws[name] = dict(crops=np.array(spy.crops), jitters=spy.jitters, flips=spy.flips,
                           grays=spy.grays, radii=np.array(spy.radii), n=n * len(trans))
    a, b = draws["pil"], draws["fast"]
    assert a["n"] == b["n"]
    n = a["n"]
    # crop area fraction and log aspect ratio (two resolutions pooled, same mix in both)
    for k in range(2):
        assert stats.ks_2samp(a["crops"][:, k], b["crops"][:, k]).pvalue > 1e-3
    # jitter: probability 0.8, uniform factors, uniform order
    for d in (a, b):
        for count, p in [(len(d["jitters"]), 0.8), (d["flips"], 0.5), (d["grays"], 0.2),
                         (len(d["radii"]), 0.5)]:
            assert abs(count - n * p) < 4.5 * math.sqrt(n * p * (1 - p)), (count, n * p)
    for k, (lo, hi) in zip(range(1, 5), [(0.2, 1.8)] * 3 + [(-0.2, 0.2)]):
        fa_, fb = np.array([j[k] for j in a["jitters"]]), np.array([j[k] for j in b["jitters"]])
        assert fb.min() >= lo and fb.max() <= hi
        assert stats.ks_2samp(fa_, fb).pvalue > 1e-3
        assert stats.kstest((fb - lo) / (hi - lo), "uniform").pvalue > 1e-3
    first_op = np.bincount([j[0][0] for j in b["jitters"]], minlength=4)
    assert stats.chisquare(first_op).pvalue > 1e-3
    # blur radius ~ U[0.1, 2]
    assert stats.ks_2samp(a["radii"], b["radii"]).pvalue > 1e-3
    assert b["radii"].min() >= 0.1 and b["radii"].max() <= 2.0


def test_dataset_default_is_fast_and_pil_stays_available(image_folder, monkeypatch):
    args = (image_folder, [16, 8], [1, 2], [0.3, 0.1], [1.0, 0.3])
    fast = MultiCropDataset(*args)
    pil = MultiCropDataset(*args, augment="pil")
    assert isinstance(fast.trans[0], fa.FastCropTransform)
    assert not isinstance(pil.trans[0], fa.FastCropTransform)
    x, y = fast[(3, 1234)], pil[(3, 1234)]  # (index, seed) as SeededSampler yields
    assert len(x) == 3 and all(torch.equal(a, b) for a, b in zip(x, y))
    with pytest.raises(ValueError, match="augment"):
        MultiCropDataset(*args, augment="gpu")
    # without numba: the PIL pipeline, with a warning
    monkeypatch.setattr(fa, "numba", None)
    assert not isinstance(MultiCropDataset(*args).trans[0], fa.FastCropTransform)


def test_hue_kernel_equals_pil_on_every_colour():
    """All 2^24 RGB colours (a 4096 x 4096 image), one negative and one positive shift."""
    v = np.arange(2 ** 24, dtype=np.uint32)
    img = Image.fromarray(np.stack([v >> 16, (v >> 8) & 255, v & 255], -1)
                          .astype(np.uint8).reshape(4096, 4096, 3))
    for hue in (-0.13, 0.2):
        px = pixels(img)
        fa.hue_(px, int(np.int32(hue * 255).astype(np.uint8)))
        assert np.array_equal(rgb(px, img), np.asarray(TF.adjust_hue(img, hue)))

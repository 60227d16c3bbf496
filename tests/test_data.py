import os
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from src.multicropdataset import (STD, DataError, KernelGaussianBlur, MultiCropDataset,
                                  SeededSampler)

KW = dict(size_crops=[32, 16], nmb_crops=[2, 3], min_scale_crops=[0.3, 0.1],
          max_scale_crops=[1, 0.3])


def test_multicrop_shapes_order_and_index(image_folder):
    ds = MultiCropDataset(image_folder, **KW)
    assert len(ds) == 24 and len(ds.classes) == 3
    crops = ds[0]
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    ds = MultiCropDataset(image_folder, **KW, size_dataset=10, return_index=True)
    assert len(ds) == 10
    idx, crops = ds[7]
    assert idx == 7 and len(crops) == 5
    assert STD == [0.228, 0.224, 0.225]


def test_inconsistent_crop_lists_and_bad_folders(tmp_path, image_folder):
    with pytest.raises(ValueError, match="same length"):
        MultiCropDataset(image_folder, [32, 16], [2], [0.3, 0.1], [1, 0.3])
    with pytest.raises(DataError, match="does not exist"):
        MultiCropDataset(str(tmp_path / "nope"), **KW)
    (tmp_path / "empty").mkdir()  # pre-training takes any layout: only "no image" is refused
    with pytest.raises(DataError, match="contains no images"):
        MultiCropDataset(str(tmp_path / "empty"), **KW)
    (tmp_path / "empty" / "a").mkdir()
    (tmp_path / "empty" / "a" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        MultiCropDataset(str(tmp_path / "empty"), **KW)


def test_per_sample_seeds_make_crops_independent_of_workers_and_resume(image_folder):
    ds = MultiCropDataset(image_folder, **KW)

    def epoch_crops(workers, start_iter=0):
        sampler = SeededSampler(ds, seed=5, batch_size=4)
        sampler.set_epoch(1, start_iter)
        loader = torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=4, num_workers=workers)
        return [b[0] for b in loader]

    a, b = epoch_crops(0), epoch_crops(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # mid-epoch resume sees the same crops as the uninterrupted epoch
    c = epoch_crops(0, start_iter=2)
    assert len(c) == len(a) - 2 and all(torch.equal(x, y) for x, y in zip(a[2:], c))
    # a seeded sample in the main process (workers=0) does not disturb the global RNG
    torch.manual_seed(0)
    ref = torch.rand(3)
    torch.manual_seed(0)
    first = ds[(3, 1234)]
    assert torch.equal(torch.rand(3), ref)
    assert all(torch.equal(x, y) for x, y in zip(first, ds[(3, 1234)]))
    # and different epochs give different crops
    sampler = SeededSampler(ds, seed=5, batch_size=4)
    sampler.set_epoch(2)
    other = next(iter(torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=4)))[0]
    assert not torch.equal(other, a[0])


def test_kernel_blur_is_normalised_gaussian():
    img = Image.fromarray(np.full((40, 30, 3), 200, np.uint8))
    blur = KernelGaussianBlur(p=1.0)
    torch.manual_seed(0)
    out = np.asarray(blur(img))
    assert out.shape == (40, 30, 3) and np.all(out == 200)  # a flat image stays flat
    tiny = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    assert np.asarray(blur(tiny)).shape == (8, 8, 3)  # smaller than the 23x23 kernel


def test_corrupt_image_skipped_or_strict(image_folder, tmp_path):
    bad = f"{image_folder}/class_0/img_0.jpg"
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = MultiCropDataset(image_folder, **KW)
    assert len(ds[0]) == 5 and ds.nmb_bad_images == 1
    strict = MultiCropDataset(image_folder, **KW, strict_data=True)
    with pytest.raises(DataError, match="img_0.jpg"):
        strict[0]


def test_threads_reading_files_count_every_unreadable_one(image_folder, monkeypatch):
    """The DALI loader's reader threads (src/dali.py) count bad files in the same slot: a
    counter whose read and write are apart (as a tensor's += may be, the GIL released between)
    must still end at one count per file."""
    class SlowCounter:  # a read-modify-write that lets other threads in between
        def __init__(self, n):
            self.values = [0] * n

        def __getitem__(self, i):
            value = self.values[i]
            time.sleep(0.02)
            return value

        def __setitem__(self, i, value):
            self.values[i] = value

        def sum(self):
            return sum(self.values)

    ds = MultiCropDataset(image_folder, **KW)
    ds._nmb_bad = SlowCounter(len(ds._nmb_bad))
    missing = list(range(0, 12, 2))  # each followed by a readable file: one count per read
    for i in missing:
        os.remove(ds.samples[i][0])
    start = threading.Barrier(len(missing))

    def read(i):
        start.wait()
        assert ds.load_bytes(i)[1] == i + 1

    threads = [threading.Thread(target=read, args=(i,)) for i in missing]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ds.nmb_bad_images == len(missing)


def test_blur_none_leaves_the_crop_unblurred_and_bad_names_fail():
    from PIL import Image
    from src.multicropdataset import make_blur
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8))
    torch.manual_seed(0)
    none = make_blur("none")
    assert all(none(img) is img for _ in range(20))
    pil = make_blur("pil")
    assert any(pil(img) is not img for _ in range(20))  # p 0.5: some of 20 are blurred
    with pytest.raises(ValueError, match="--blur must be one of"):
        make_blur("box")

"""The pre-training datasets: images of a --data_path in any layout, each returned as its
crops (`CropsDataset`; `MultiCropDataset`: SwAV's multi-crop), and the sampler that seeds them.

The augmentations are in src/transforms.py (importable from here as before). With a
`SeededSampler` each sample is augmented from its own seed, a function of (seed, epoch, index):
the crops do not depend on the number of workers, and a resumed run (even mid-epoch) sees
exactly the crops an uninterrupted run would have seen.
"""
import logging
import threading
from contextlib import nullcontext

import torch
import torchvision.datasets as datasets
from PIL import Image

# IMG_EXTENSIONS, DataError and the transforms: importable from here as before
from .imagelist import IMG_EXTENSIONS, DataError, ImageList, find_images  # noqa: F401
from .transforms import (BLURS, MEAN, STD, KernelGaussianBlur, PILRandomGaussianBlur,  # noqa: F401
                         get_color_distortion, make_blur, multicrop_specs, multicrop_transforms,
                         normalize_crops, to_tensor)

logger = logging.getLogger()

BAD_COUNT_SLOTS = 64  # per-worker counters of unreadable images (worker id modulo this)
# a slot's += is a read then a write: threads of one process (the DALI loader's file readers,
# src/dali.py) count in the same slot one at a time, or a count could be lost
_BAD_COUNT_LOCK = threading.Lock()


def _open_rgb(path):
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
        return img.convert("RGB")


def _read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


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
        # slot of a shared-memory tensor (shared under fork and spawn alike, no lock across them)
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
        return self._load(index, _open_rgb)

    def load_bytes(self, index):
        """(the file's encoded bytes, index actually used), for a decoder outside Python
        (src/dali.py): an unreadable file is replaced as in load_image (one that reads but does
        not decode is the decoder's to report)."""
        return self._load(index, _read_bytes)

    def _load(self, index, load):
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            path = self.samples[i][0]
            try:
                return load(path), i
            except Exception as e:
                if self.strict_data:
                    raise DataError(f"unreadable image {path}: {e}") from None
                worker = torch.utils.data.get_worker_info()
                with _BAD_COUNT_LOCK:
                    self._nmb_bad[0 if worker is None else 1 + worker.id % BAD_COUNT_SLOTS] += 1
                logger.warning(f"skipping unreadable image {path}: {e}")
        raise DataError(f"no readable image in {self.root}")


class CropsDataset(SafeImageFolder):
    """Each image as the list [t(image) for t in trans] (`data_path`: an ImageList, or a path
    in any layout, src/imagelist.py find_images); an (index, seed) item, as SeededSampler
    yields, draws the crops from that seed."""

    def __init__(self, data_path, trans, size_dataset=-1, return_index=False, strict_data=False):
        super().__init__(data_path, strict_data=strict_data)
        self.trans = trans
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


class MultiCropDataset(CropsDataset):
    """nmb_crops[i] random crops at resolution size_crops[i] per image (src/transforms.py
    multicrop_transforms)."""

    def __init__(self, data_path, size_crops, nmb_crops, min_scale_crops, max_scale_crops,
                 size_dataset=-1, return_index=False, blur="pil", strict_data=False,
                 augment="fast"):
        # the transforms first: a bad flag is refused before the images are listed
        trans = multicrop_transforms(size_crops, nmb_crops, min_scale_crops, max_scale_crops,
                                     blur, augment)
        super().__init__(data_path, trans, size_dataset, return_index, strict_data)
        # the crops' distribution, for a loader that augments elsewhere (src/dali.py)
        self.crop_specs = multicrop_specs(size_crops, nmb_crops, min_scale_crops,
                                          max_scale_crops, blur)


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

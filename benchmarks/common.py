"""Shared helpers of the benchmarks: timing, machine description, textured JPEGs, table printing."""
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def machine_description(device="cpu"):
    """One line naming the CPU (and its bf16 support) or the GPU the numbers come from."""
    import torch

    from src.amp import cpu_has_native_bf16
    if str(device).startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{name}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
            f"capability {torch.backends.cpu.get_cpu_capability()}, "
            f"native bf16 {'yes (AMX/AVX512-BF16)' if cpu_has_native_bf16() else 'no'} "
            f"(torch {torch.__version__})")


def load_average():
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def median(values):
    return statistics.median(values) if values else float("nan")


def print_table(rows, columns):
    """rows: list of dicts; columns: list of (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else fmt.format(r[k])) for k, _, fmt in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for j, c in enumerate(cells):
        print("  ".join(s.rjust(w) for s, w in zip(c, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def print_json(name, payload):
    print(json.dumps({"benchmark": name, **payload}, default=float))


def textured_image(rng, width=500, height=375):
    """An RGB uint8 array with natural-image-like content: multi-octave colour noise (smooth
    regions at several scales), random hard-edged shapes, and fine grain. JPEG-compressing it
    gives file sizes and decode costs close to photographs (flat colour would not)."""
    from PIL import Image
    img = np.zeros((height, width, 3), np.float32)
    amp = 90.0
    for cells in (3, 7, 17, 41, 97):  # octaves: coarse to fine
        small = rng.normal(0, 1, size=(max(2, cells * height // width), cells, 3)).astype(np.float32)
        up = np.stack([np.asarray(Image.fromarray(small[..., c], "F").resize(
            (width, height), Image.BICUBIC)) for c in range(3)], -1)
        img += amp * up
        amp *= 0.55
    img += 128 + rng.normal(0, 30, size=3).astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(rng.integers(4, 10)):  # shapes: edges at random places
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(10, 120)
        color = rng.uniform(-70, 70, size=3).astype(np.float32)
        if rng.random() < 0.5:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2
        else:
            mask = (abs(xx - cx) < r) & (abs(yy - cy) < r * rng.uniform(0.3, 1.5))
        img[mask] += color
    img += rng.normal(0, 6, size=img.shape).astype(np.float32)  # sensor grain
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_jpeg(job):
    path, seed, i, width, height, quality = job
    from PIL import Image
    rng = np.random.default_rng((seed, i))  # per image: the same files with any process count
    Image.fromarray(textured_image(rng, width, height)).save(path, quality=quality)


def make_jpeg_folder(root, n_images=256, classes=4, width=500, height=375, seed=0, quality=90,
                     processes=1):
    """root/class_k/img_i.jpg: `n_images` textured JPEGs (reused when already there)."""
    marker = os.path.join(root, f".made_{n_images}_{classes}_{width}x{height}_{seed}_{quality}")
    if os.path.exists(marker):
        return root
    jobs = []
    for i in range(n_images):
        d = os.path.join(root, f"class_{i % classes}")
        os.makedirs(d, exist_ok=True)
        jobs.append((os.path.join(d, f"img_{i:05d}.jpg"), seed, i, width, height, quality))
    if processes > 1:
        import multiprocessing
        with multiprocessing.Pool(processes) as pool:
            pool.map(_write_jpeg, jobs, chunksize=8)
    else:
        for job in jobs:
            _write_jpeg(job)
    open(marker, "w").close()
    return root


class Timer:
    """Accumulates wall time per named stage: `with timer("decode"): ...`."""

    def __init__(self):
        self.totals = {}

    def __call__(self, name):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.totals[name] = timer.totals.get(name, 0.0) + time.perf_counter() - self.t0
        return _Ctx()

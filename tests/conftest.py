import os
import socket
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tests' models are tiny: one thread per process avoids OpenMP threads spinning against each
# other (and against the 2-rank subprocess runs) on a small machine. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def free_port():
    """A TCP port free now on 127.0.0.1, for a test's process group (never a fixed one: two
    test runs on one machine would collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fork_ranks(target, *args, world=2, timeout=60):
    """Run target(rank, port, *args, queue) in `world` forked processes (no re-import of torch:
    quick) on a free port; each puts one (rank, result) in the queue. Returns ({rank: result},
    [exit codes])."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=target, args=(r, port, *args, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    return results, [p.exitcode for p in procs]


def make_image_folder(root, classes=3, per_class=8, size=40, seed=0):
    """A tiny ImageFolder of textured random JPEGs: root/class_k/img_i.jpg."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = os.path.join(root, f"class_{c}")
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            base = rng.integers(0, 255, size=(1, 1, 3))
            noise = rng.integers(0, 60, size=(size, size, 3))
            arr = np.clip(base + noise + c * 30, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(os.path.join(d, f"img_{i}.jpg"), quality=90)
    return root


def make_split_folder(root, train_per_class, val_per_class, extra_val=False):
    """root/train and root/val of 3 classes (20x20); `extra_val`: one more val image in class_0,
    so that val does not split evenly over 2 ranks."""
    make_image_folder(os.path.join(root, "train"), classes=3, per_class=train_per_class, size=20,
                      seed=0)
    make_image_folder(os.path.join(root, "val"), classes=3, per_class=val_per_class, size=20, seed=1)
    if extra_val:
        make_image_folder(os.path.join(root, "extra"), classes=1, per_class=1, size=20, seed=2)
        os.rename(os.path.join(root, "extra", "class_0", "img_0.jpg"),
                  os.path.join(root, "val", "class_0", "extra.jpg"))
    return str(root)


def randomize_bn(model):
    """Random BN affine parameters and statistics too (convs keep their random init)."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith(("running_mean", "bias")):
                t.normal_(0, 0.1)
            elif t.is_floating_point() and t.ndim == 1:
                t.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(str(tmp_path / "data"))


def tiny_swav_argv(data, dump, extra=()):
    """The issue's tiny CPU configuration of main_swav.py."""
    return ["--data_path", data, "--epochs", "2", "--batch_size", "8", "--nmb_crops", "2", "2",
            "--size_crops", "32", "16", "--min_scale_crops", "0.3", "0.1", "--max_scale_crops",
            "1", "0.3", "--nmb_prototypes", "20", "--feat_dim", "16", "--hidden_mlp", "64",
            "--workers", "0", "--use_fp16", "false", "--checkpoint_freq", "1", "--dump_path", dump,
            "--arch", "resnet18", "--width", "8", "--cifar_stem", "true", *extra]


def entry_args(entry, argv=(), **after_init):
    """A run's args as entry point `entry` (e.g. "main_swav", "eval_linear") parses `argv`:
    every flag there with its parser default, not a hand-made Namespace that silently lacks
    one. `after_init` sets what src/distributed.py init_distributed_mode decides (rank,
    world_size, device, gpu_to_work_on); any other name must be one of the parser's flags, so a
    typo fails here instead of adding an attribute no run has."""
    import importlib
    args = importlib.import_module(entry).get_args_parser().parse_args(list(argv))
    for name, value in after_init.items():
        if not hasattr(args, name) and name != "gpu_to_work_on":
            raise AttributeError(f"{entry} has no flag --{name}")
        setattr(args, name, value)
    return args


LAUNCHER_ENV = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_STEP_ID", "RANK", "WORLD_SIZE")


@pytest.fixture
def no_launcher(monkeypatch):
    """A plain process: no Slurm job or torchrun variables (tests run inside a Slurm job or under
    a launcher must not change what main() does), no stop signal pending."""
    from src import preemption
    for var in LAUNCHER_ENV:
        monkeypatch.delenv(var, raising=False)
    preemption.reset()


@pytest.fixture
def one_thread(monkeypatch):
    """One torch thread, here and in subprocesses: tiny models are all per-op overhead, and on a
    shared CPU the OpenMP threads of a parallel op wait for each other (10x slower with 2)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _signal_handlers_back():
    """A main() run in the test process installs its stop-signal handlers (src/preemption.py):
    give SIGTERM and SIGINT back to pytest afterwards."""
    yield
    from src import preemption
    preemption.reset()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it (tests/test_gpu.py)")


def tensorboard_scalars(logdir):
    """{tag: [values by step]} from the TensorBoard event files under `logdir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(logdir)
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

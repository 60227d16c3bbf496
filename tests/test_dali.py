"""--data_backend dali (src/dali.py) without DALI or a GPU: the flag and its one-line errors, the
crop distribution the DALI graph is built with (against the torchvision pipeline's objects: one
source of truth, src/transforms.py CropSpec), the batches' order (the DataLoader's sampler), and
the training loops fed by it, through a fake `nvidia.dali` that records the graph. Where DALI is
installed, a real pipeline runs on DALI's CPU operators."""
import argparse
import os
import shlex
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torchvision.transforms as T

import main_deepclusterv2
import main_simsiam
import main_swav
from conftest import make_image_folder, tiny_swav_argv
from src import dali as dali_backend
from src import data as data_module
from src.cli import check_shared_args, run_main
from src.errors import UsageError
from src.multicropdataset import MultiCropDataset, SeededSampler
from src.simsiam import TwoViewDataset
from src.transforms import (CropSpec, KernelGaussianBlur, multicrop_specs, multicrop_transforms,
                            simsiam_spec, simsiam_transform)

MAINS = [main_swav, main_deepclusterv2, main_simsiam]
SWAV_CROPS = ([224, 96], [2, 6], [0.14, 0.05], [1.0, 0.14])  # the model zoo's multi-crop


# ----------------------------------------------------------------------------- a fake DALI
class Node:
    """A fake DALI DataNode: the op that made it and its arguments. Arithmetic makes nodes too,
    so a parameter built from random draws stays an expression that `value` evaluates."""

    def __init__(self, op, args=(), kwargs=None):
        self.op, self.args, self.kwargs = op, args, kwargs or {}

    def __add__(self, other):
        return Node("+", (self, other))

    def __radd__(self, other):
        return Node("+", (other, self))

    def __sub__(self, other):
        return Node("-", (self, other))

    def __rsub__(self, other):
        return Node("-", (other, self))

    def __mul__(self, other):
        return Node("*", (self, other))

    def __rmul__(self, other):
        return Node("*", (other, self))


def value(x, draws):
    """One sample's value of expression x, given the random nodes' draws {node: value}."""
    if not isinstance(x, Node):
        return x
    if x in draws:
        return draws[x]
    a, b = (value(v, draws) for v in x.args)
    return {"+": a + b, "-": a - b, "*": a * b}[x.op]


def leaves(x, op):
    """The nodes made by `op` in expression x."""
    if not isinstance(x, Node):
        return []
    if x.op == op:
        return [x]
    return [n for v in x.args for n in leaves(v, op)]


def producer(node, op):
    """The node made by `op` up the chain of first inputs from `node`."""
    while node.op != op:
        node = node.args[0]
    return node


class FakePipeline:
    made = []

    def __init__(self, **kwargs):
        self.kwargs, self.outputs = kwargs, None
        FakePipeline.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set_outputs(self, *outputs):
        self.outputs = outputs


class FakeFn:
    """fn.<op>(...) records a Node; fn.decoders / fn.random are namespaces."""

    def __init__(self, prefix=""):
        self.prefix = prefix

    def __getattr__(self, name):
        op = self.prefix + name
        if op in ("decoders", "random"):
            return FakeFn(op + ".")

        def make(*args, **kwargs):
            node = Node(op, args, kwargs)
            if op == "external_source":
                return [Node("source_output", (node,)) for _ in range(kwargs["num_outputs"])]
            return node
        return make


class FakeIterator:
    """DALIGenericIterator over a FakePipeline: drives its external source as DALI does (iter()
    at build and right after each epoch's StopIteration, next() only after reset) and returns
    uint8 crops of each output's size, made from the batch's indices (deterministic)."""

    def __init__(self, pipelines, output_map, **kwargs):
        self.pipe, self.output_map, self.kwargs = pipelines[0], output_map, kwargs
        self.source = producer(self.pipe.outputs[-1], "external_source").kwargs["source"]
        self.fed = []  # every batch of files the source gave
        iter(self.source)

    def __iter__(self):
        while True:
            try:
                files, index = next(self.source)
            except StopIteration:
                iter(self.source)
                return
            self.fed.append(files)
            index = torch.tensor(np.stack(index))
            out = {}
            for name, node in zip(self.output_map, self.pipe.outputs):
                if name == "index":
                    out[name] = index
                else:
                    size = producer(node, "random_resized_crop").kwargs["size"]
                    g = torch.Generator().manual_seed(int(index.sum()))
                    out[name] = torch.randint(0, 256, (len(files), 3, *size), generator=g,
                                              dtype=torch.uint8)
            yield [out]

    def reset(self):
        pass


@pytest.fixture
def fake_dali(monkeypatch):
    """`nvidia.dali` importable as the fake above (and torch seeing a GPU for check_backend)."""
    FakePipeline.made = []
    dali = types.ModuleType("nvidia.dali")
    dali.Pipeline, dali.fn = FakePipeline, FakeFn()
    dali.types = types.SimpleNamespace(UINT8="UINT8", INT64="INT64", RGB="RGB",
                                       INTERP_LINEAR="INTERP_LINEAR")
    plugin = types.ModuleType("nvidia.dali.plugin.pytorch")
    plugin.DALIGenericIterator = FakeIterator
    for name, module in [("nvidia", types.ModuleType("nvidia")), ("nvidia.dali", dali),
                         ("nvidia.dali.plugin", types.ModuleType("nvidia.dali.plugin")),
                         ("nvidia.dali.plugin.pytorch", plugin)]:
        monkeypatch.setitem(sys.modules, name, module)
    return dali


def loader_args(**kw):
    return argparse.Namespace(**{"batch_size": 4, "world_size": 1, "rank": 0, "seed": 31,
                                 "workers": 1, "gpu_to_work_on": 0, **kw})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("dali") / "data"), classes=2,
                             per_class=6, size=24)


def graph(specs, images, **kw):
    """The fake pipeline a DaliLoader builds for `specs` (at its first iteration)."""
    ds = MultiCropDataset(images, [16], [1], [0.5], [1.0], augment="pil")
    ds.crop_specs = specs
    loader = dali_backend.DaliLoader(ds, loader_args(**kw))
    next(iter(loader))
    return FakePipeline.made[-1]


# ----------------------------------------------------------------------------- the flag, errors
def test_flag_on_the_three_pretrainings():
    for main in MAINS:
        parser = main.get_args_parser()
        assert parser.parse_args([]).data_backend == "pytorch"  # the original's
        assert parser.parse_args(["--data_backend", "dali"]).data_backend == "dali"
        with pytest.raises(SystemExit):
            parser.parse_args(["--data_backend", "cuda"])


def test_device_cpu_refused():
    args = main_swav.get_args_parser().parse_args(["--data_backend", "dali", "--device", "cpu"])
    with pytest.raises(UsageError, match="--device cpu"):
        check_shared_args(args)


def test_without_the_package_one_line_error_says_how_to_install(monkeypatch, tmp_path, images):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # `import nvidia.dali` fails
    argv = ["main_simsiam.py", "--data_backend", "dali", "--data_path", images,
            "--dump_path", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        parser = argparse.ArgumentParser(parents=[main_simsiam.get_args_parser()])
        run_main(main_simsiam.main, parser)
    message = str(e.value.code)
    assert message.startswith("error: --data_backend dali needs NVIDIA DALI")
    assert "pip install" in message and "nvidia-dali-cuda120" in message
    assert "\n" not in message and not os.listdir(tmp_path)  # before any work


def test_without_cuda_one_line_error(fake_dali, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = main_deepclusterv2.get_args_parser().parse_args(["--data_backend", "dali"])
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        check_shared_args(args)
    # main(args) called directly (not through run_main): refused before the images are listed
    args.device = "cpu"  # as init_distributed_mode resolves "auto" without a GPU
    with pytest.raises(UsageError, match="--device cpu"):
        data_module.build_train_data(args, lambda images: pytest.fail("listed the images"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args.device = "cuda:0"
    assert dali_backend.check_backend(args).Pipeline is FakePipeline


# ----------------------------------------------------------------------------- crop distribution
def torchvision_params(t):
    """A crop's random distribution as the torchvision pipeline (augment="pil") holds it."""
    steps = {type(s): s for s in t.transforms}
    if T.Compose in steps:  # multi-crop: the colour distortion is a Compose
        steps.update({type(s): s for s in steps[T.Compose].transforms})
    rrc, flip = steps[T.RandomResizedCrop], steps[T.RandomHorizontalFlip]
    jitter_apply, gray = steps[T.RandomApply], steps[T.RandomGrayscale]
    jitter = jitter_apply.transforms[0]
    blur = next(s for s in t.transforms if hasattr(s, "prob"))
    return dict(size=list(rrc.size), area=list(rrc.scale), ratio=list(rrc.ratio), flip=flip.p,
                jitter_p=jitter_apply.p, brightness=list(jitter.brightness),
                contrast=list(jitter.contrast), saturation=list(jitter.saturation),
                hue=[360 * h for h in jitter.hue], gray=gray.p, blur_p=blur.prob,
                sigma=[blur.lo, blur.hi],
                window=blur.kernel_size if isinstance(blur, KernelGaussianBlur) else None)


def rounded(params):
    """Comparable: lists as tuples, floats to 9 decimals (0.8 strength: 1 - 0.8 = 0.1999...)."""
    def r(x):
        return round(x, 9) if isinstance(x, float) else x
    return {k: tuple(map(r, v)) if isinstance(v, (list, tuple)) else r(v)
            for k, v in params.items()}


def dali_params(out):
    """The same distribution read off the (fake) DALI graph of one crop output; checks on the
    way that each coin switches between its op's draw and the identity."""
    cmn, x = out, out.args[0]
    twist, blur = producer(x, "color_twist"), x if x.op == "gaussian_blur" else None
    rrc = producer(twist, "random_resized_crop")
    (jitter,) = leaves(twist.kwargs["hue"], "random.coin_flip")
    (gray,) = [c for c in leaves(twist.kwargs["saturation"], "random.coin_flip") if c is not jitter]

    def jitter_range(name):
        (u,) = leaves(twist.kwargs[name], "random.uniform")
        identity = 0 if name == "hue" else 1
        assert value(twist.kwargs[name], {jitter: 0, u: 0.7, gray: 0}) == identity
        assert value(twist.kwargs[name], {jitter: 1, u: 0.7, gray: 0}) == pytest.approx(0.7)
        return u.kwargs["range"]

    (u,) = leaves(twist.kwargs["saturation"], "random.uniform")
    for j in (0, 1):  # greyscale, jittered or not: saturation 0
        assert value(twist.kwargs["saturation"], {jitter: j, u: 1.3, gray: 1}) == 0
    assert cmn.kwargs["dtype"] == "UINT8" and cmn.kwargs["output_layout"] == "CHW"
    assert rrc.kwargs["num_attempts"] == 10 and rrc.kwargs["antialias"] is True
    params = dict(size=rrc.kwargs["size"], area=rrc.kwargs["random_area"],
                  ratio=rrc.kwargs["random_aspect_ratio"],
                  flip=cmn.kwargs["mirror"].kwargs["probability"],
                  jitter_p=jitter.kwargs["probability"], brightness=jitter_range("brightness"),
                  contrast=jitter_range("contrast"), saturation=jitter_range("saturation"),
                  hue=jitter_range("hue"), gray=gray.kwargs["probability"], blur_p=0.0,
                  sigma=None, window=None)
    if blur is not None:
        (coin,) = leaves(blur.kwargs["window_size"], "random.coin_flip")
        assert value(blur.kwargs["window_size"], {coin: 0}) == 1  # not blurred: the identity
        window = value(blur.kwargs["window_size"], {coin: 1})
        assert window in (23, 13)  # OpenCV's kernel; else 3 sigma_max (2) each side
        params.update(blur_p=coin.kwargs["probability"],
                      sigma=blur.kwargs["sigma"].kwargs["range"],
                      window=window if window == 23 else None)
    return params


@pytest.mark.parametrize("blur", ["pil", "opencv", "none"])
def test_dali_graph_has_the_torchvision_distribution_swav_multicrop(fake_dali, images, blur):
    """Each crop of the model zoo's 2x224 + 6x96: the DALI ops get the numbers the torchvision
    pipeline holds (a parameter changed in one place only fails here)."""
    pil = multicrop_transforms(*SWAV_CROPS, blur=blur, augment="pil")
    pipe = graph(multicrop_specs(*SWAV_CROPS, blur=blur), images)
    assert len(pipe.outputs) == 8 + 1  # 8 crops, then the indices
    for t, out in zip(pil, pipe.outputs):
        expected = torchvision_params(t)
        if blur == "none":  # the PIL blur with probability 0; DALI: no blur op
            assert expected["blur_p"] == 0
            expected.update(sigma=None)
        assert rounded(dali_params(out)) == rounded(expected)
    assert [dali_params(o)["size"] for o in pipe.outputs[:-1]] == [[224, 224]] * 2 + [[96, 96]] * 6


def test_dali_graph_has_the_torchvision_distribution_simsiam(fake_dali, images):
    pil = simsiam_transform(224, 0.2, 1.0, augment="pil")
    pipe = graph(TwoViewDataset(images, 224, 0.2, 1.0, augment="pil").crop_specs, images)
    expected = torchvision_params(pil)
    assert rounded(expected)["brightness"] == (0.6, 1.4)  # MoCo v2's 0.4, not SwAV's 0.8
    assert [rounded(dali_params(o)) for o in pipe.outputs[:-1]] == [rounded(expected)] * 2


def test_fast_pipeline_reads_the_same_specs():
    """augment="fast" (src/fastaugment.py) is built from the same CropSpecs."""
    for t, spec in zip(multicrop_transforms(*SWAV_CROPS, augment="fast"),
                       multicrop_specs(*SWAV_CROPS)):
        if not hasattr(t, "rrc"):
            pytest.skip("numba not installed: no fast pipeline")
        assert (t.rrc.size, t.rrc.scale, t.rrc.ratio) == ((spec.size,) * 2, spec.scale, spec.ratio)
        assert (t.p_jitter, t.p_gray, t.p_flip) == (spec.jitter_p, spec.gray_p, spec.flip_p)
        assert t.jitter.brightness == pytest.approx((1 - spec.jitter[0], 1 + spec.jitter[0]))
        assert t.jitter.hue == pytest.approx((-spec.jitter[3], spec.jitter[3]))
        assert (t.blur.prob, t.blur.lo, t.blur.hi) == (spec.blur_p, *spec.blur_sigma)
    assert simsiam_spec().jitter == pytest.approx((0.4, 0.4, 0.4, 0.1))


def test_pipeline_device_seed_and_decoder(fake_dali, images):
    pipe = graph([CropSpec(16, (0.5, 1.0))], images, gpu_to_work_on=3, rank=1, world_size=2)
    assert pipe.kwargs["device_id"] == 3 and pipe.kwargs["batch_size"] == 4
    decoder = producer(pipe.outputs[0], "decoders.image")
    assert decoder.kwargs["device"] == "mixed" and decoder.kwargs["output_type"] == "RGB"
    for op in ("random_resized_crop", "color_twist", "gaussian_blur", "crop_mirror_normalize"):
        assert producer(pipe.outputs[0], op).kwargs["device"] == "gpu"
    source = producer(pipe.outputs[-1], "external_source")
    assert source.kwargs["cycle"] == "raise" and source.kwargs["batch"] is True
    seed_rank1 = pipe.kwargs["seed"]
    pipe = graph([CropSpec(16, (0.5, 1.0))], images, rank=0, world_size=2)
    assert pipe.kwargs["seed"] != seed_rank1  # each rank its own draws


# ----------------------------------------------------------------------------- batches
def test_batches_are_the_samplers_shard_per_rank_and_epoch(fake_dali, images):
    """Each rank gets the DataLoader's batches (DistributedSampler: shuffled per epoch with the
    seed, this rank's shard), the files' bytes are fed to DALI, the indices come back with
    the crops, and set_epoch(epoch, start_iter) resumes mid-epoch."""
    ds = MultiCropDataset(images, [16, 8], [2, 1], [0.5, 0.2], [1.0, 0.5], return_index=True,
                          augment="pil")
    seen = {}
    for rank in (0, 1):
        loader = dali_backend.DaliLoader(ds, loader_args(batch_size=2, world_size=2, rank=rank))
        sampler = SeededSampler(ds, num_replicas=2, rank=rank, seed=31, batch_size=2,
                                seeded=False)
        reference = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, drop_last=True)
        assert len(loader) == len(reference) == 3
        for epoch, start in [(0, 0), (1, 0), (2, 1)]:
            loader.sampler.set_epoch(epoch, start)
            sampler.set_epoch(epoch, start)
            expected = np.array(list(sampler)).reshape(-1, 2).tolist()
            batches = list(loader)
            assert [idx.tolist() for idx, _ in batches] == expected
            assert all([tuple(c.shape) for c in crops] == [(2, 3, 16, 16)] * 2 + [(2, 3, 8, 8)]
                       for _, crops in batches)
            fed = loader.iterator.fed[-len(expected):]
            assert [[bytes(f) for f in files] for files in fed] == [
                [open(ds.samples[i][0], "rb").read() for i in b] for b in expected]
            seen[rank, epoch] = {i for b in expected for i in b}
    assert seen[0, 0].isdisjoint(seen[1, 0]) and seen[0, 0] | seen[1, 0] == set(range(len(ds)))
    assert seen[0, 0] != seen[0, 1]  # another shuffle each epoch
    assert len(FakePipeline.made) == 2  # one pipeline per loader, reset between epochs


@pytest.mark.parametrize("main", MAINS)
def test_training_loops_run_on_the_dali_loader(fake_dali, monkeypatch, tmp_path, images,
                                               no_launcher, one_thread, main):
    """The three entry points train (2 epochs, checkpoints) on a DaliLoader's batches: len(),
    set_epoch, the crop list (SimSiam: two views) and DeepCluster-v2's image indices."""
    if main is main_simsiam:
        argv = ["--data_path", images, "--epochs", "2", "--size_crop", "16", "--dim", "16",
                "--pred_dim", "8", "--workers", "0", "--use_fp16", "false", "--dump_path",
                str(tmp_path), "--arch", "resnet18", "--width", "8", "--cifar_stem", "true"]
    else:
        argv = tiny_swav_argv(images, str(tmp_path))
        if main is main_deepclusterv2:
            i = argv.index("--nmb_prototypes")
            argv[i + 1:i + 2] = ["3", "2"]
    args = main.get_args_parser().parse_args(
        argv + ["--data_backend", "dali", "--batch_size", "4", "--device", "cpu"])
    # past check_backend's refusal of --device cpu: the CPU stands in for the GPU
    monkeypatch.setattr(data_module, "check_backend", lambda args: fake_dali)
    stats = main.main(args)
    assert len(stats.stats) == 2 and os.path.isfile(tmp_path / "checkpoint.pth.tar")
    assert FakePipeline.made[0].kwargs["device_id"] is None  # (no GPU here)


# ----------------------------------------------------------------------------- real DALI, CPU ops
def test_real_dali_cpu_pipeline(images):
    pytest.importorskip("nvidia.dali")
    ds = MultiCropDataset(images, [16, 8], [2, 1], [0.5, 0.2], [1.0, 0.5], return_index=True,
                          augment="pil")
    loader = dali_backend.DaliLoader(ds, loader_args(batch_size=4), cpu=True)
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        order = np.array(list(loader.sampler))[:len(loader) * 4].reshape(-1, 4).tolist()
        batches = list(loader)
        assert [idx.tolist() for idx, _ in batches] == order
        for _, crops in batches:
            assert [tuple(c.shape) for c in crops] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)]
            assert all(c.dtype == torch.uint8 for c in crops)
    # the coins: everything off and the whole square image -> the decoded image; flip p 1 ->
    # mirrored; greyscale p 1 -> equal channels
    from PIL import Image
    ident = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, blur_p=0.0)
    ds.crop_specs = [CropSpec(24, flip_p=0.0, gray_p=0.0, **ident),
                     CropSpec(24, flip_p=1.0, gray_p=0.0, **ident),
                     CropSpec(24, flip_p=0.0, gray_p=1.0, **ident)]
    loader = dali_backend.DaliLoader(ds, loader_args(batch_size=4), cpu=True)
    idx, (plain, flipped, grey) = next(iter(loader))
    pil = torch.stack([torch.from_numpy(np.array(Image.open(ds.samples[i][0]).convert("RGB")))
                       .permute(2, 0, 1) for i in idx.tolist()]).int()
    assert (plain.int() - pil).abs().float().mean() < 2  # two JPEG decoders
    assert torch.equal(flipped, plain.flip(-1))
    assert (grey.int().amax(1) - grey.int().amin(1)).max() <= 1


def test_real_dali_cpu_feeds_main_swav(monkeypatch, tmp_path, images, no_launcher, one_thread):
    """main_swav trains 2 epochs on real DALI batches (its CPU operators stand in for the GPU)."""
    dali = pytest.importorskip("nvidia.dali")
    monkeypatch.setattr(data_module, "check_backend", lambda args: dali)
    monkeypatch.setattr(data_module, "DaliLoader",
                        lambda *a, **kw: dali_backend.DaliLoader(*a, cpu=True, **kw))
    args = main_swav.get_args_parser().parse_args(tiny_swav_argv(images, str(tmp_path)) + [
        "--data_backend", "dali", "--batch_size", "4", "--device", "cpu"])
    stats = main_swav.main(args)
    assert len(stats.stats) == 2 and np.isfinite(stats.stats["loss"].astype(float)).all()


# ----------------------------------------------------------------------------- gpu_suite.sh dali
SUITE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "gpu_suite.sh")


def test_gpu_suite_dali_stage(tmp_path):
    """`gpu_suite.sh dali`: main_swav runs with --data_backend dali on CUDA (flags its parser
    accepts, fresh dump paths); where DALI does not import it fails in one line saying how to
    install it (a green suite must not mean an untested DALI)."""
    out = subprocess.run(["bash", SUITE, "--dry-run", "dali", str(tmp_path)], check=True,
                         capture_output=True, text=True).stdout.splitlines()
    commands = [shlex.split(line) for line in out if "main_swav.py" in line]
    assert len(commands) == 2
    for cmd in commands:
        args = main_swav.get_args_parser().parse_args(cmd[cmd.index("main_swav.py") + 1:])
        assert args.data_backend == "dali" and args.device == "cuda" and args.use_fp16
        assert args.dump_path.startswith(str(tmp_path))
    assert commands[1][commands[1].index("--size_crops") + 1:][:2] == ["224", "96"]
    env = dict(os.environ, PYTHON=sys.executable)
    if subprocess.run([sys.executable, "-c", "import nvidia.dali"], env=env,
                      capture_output=True).returncode == 0:
        return  # DALI imports here: the stage would run (on a GPU)
    proc = subprocess.run(["bash", SUITE, "dali", str(tmp_path / "run")], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "passed" not in proc.stdout, proc.stdout
    assert "error: the dali part needs DALI (nvidia.dali does not import" in proc.stderr
    assert "requirements-dali.txt" in proc.stderr

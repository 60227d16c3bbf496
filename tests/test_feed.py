"""The training feed: the loader ships uint8 crops, the training loops copy them to the device
(non-blocking) and normalise them there; the values equal the original's host-side ToTensor +
Normalize (float32) to float rounding, and training on them equals training on the float crops."""
import copy
import os
import shlex
import shutil
import subprocess

import numpy as np
import pytest
import torch

import main_deepclusterv2 as dc
import main_simsiam
import main_swav
from src.engine import build_larc_sgd, to_device
from src.multicropdataset import MultiCropDataset, multicrop_transforms, normalize_crops
from src.resnet50 import resnet18
from src.simsiam import SimSiam, simsiam_transform
from test_fastpath import ListLoader, tiny_args, tiny_model
from conftest import ROOT, entry_args
from test_fastaugment import textured

ARGS = ([32, 16], [2, 3], [0.14, 0.05], [1.0, 0.14])


@pytest.mark.parametrize("augment,blur", [("fast", "pil"), ("fast", "opencv"), ("pil", "pil")])
def test_uint8_crops_normalised_equal_the_host_float_crops(augment, blur):
    old = multicrop_transforms(*ARGS, blur=blur, augment=augment, host_normalize=True)
    new = multicrop_transforms(*ARGS, blur=blur, augment=augment)
    for seed in range(6):
        img = textured(200 + seed)
        torch.manual_seed(seed)
        a = [t(img) for t in old]
        torch.manual_seed(seed)
        b = [t(img) for t in new]
        for x, y in zip(a, b):
            assert x.dtype == torch.float32 and y.dtype == torch.uint8
            torch.testing.assert_close(normalize_crops(y), x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("augment", ["fast", "pil"])
def test_simsiam_views_uint8_normalised_equal_host_float(augment):
    old = simsiam_transform(16, 0.2, 1.0, augment=augment, host_normalize=True)
    new = simsiam_transform(16, 0.2, 1.0, augment=augment)
    img = textured(5, 60, 40)
    for seed in range(6):
        torch.manual_seed(seed)
        a = old(img)
        torch.manual_seed(seed)
        b = new(img)
        assert b.dtype == torch.uint8
        torch.testing.assert_close(normalize_crops(b), a, rtol=0, atol=1e-6)


def test_loader_batch_is_uint8_a_quarter_of_the_bytes_and_to_device_restores_it(image_folder):
    ds = MultiCropDataset(image_folder, *ARGS)
    ds.trans = multicrop_transforms(*ARGS, host_normalize=True)  # the original's float crops
    torch.manual_seed(0)
    ref = [torch.stack(c) for c in zip(*[ds[(i, 77 + i)] for i in range(4)])]
    ds.trans = multicrop_transforms(*ARGS)
    batch = [torch.stack(c) for c in zip(*[ds[(i, 77 + i)] for i in range(4)])]
    assert all(c.dtype == torch.uint8 for c in batch)
    assert 4 * sum(c.nbytes for c in batch) == sum(c.nbytes for c in ref)
    fed = to_device(batch, torch.device("cpu"))
    assert all(f.dtype == torch.float32 for f in fed)
    for f, r in zip(fed, ref):
        torch.testing.assert_close(f, r, rtol=0, atol=1e-6)
    # float tensors (evaluations, hub users) pass through untouched
    x = torch.randn(2, 3, 8, 8)
    assert to_device(x, "cpu") is x


def test_to_device_copies_without_blocking(monkeypatch):
    calls = []
    to = torch.Tensor.to

    def spy(self, *a, **kw):
        if self.dtype == torch.uint8 and a and isinstance(a[0], (str, torch.device)):
            calls.append(kw.get("non_blocking", False))  # a crop's device copy
        return to(self, *a, **kw)
    monkeypatch.setattr(torch.Tensor, "to", spy)
    to_device([torch.zeros(2, 3, 4, 4, dtype=torch.uint8)] * 3, torch.device("cpu"))
    assert calls == [True] * 3


def test_forward_refuses_uint8_with_a_clear_error():
    with pytest.raises(TypeError, match="normalise"):
        tiny_model()(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))


def uint8_crops(seed=1, bs=8, sizes=(16, 16, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (bs, 3, s, s), generator=g, dtype=torch.uint8) for s in sizes]


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_swav_train_on_uint8_crops_equals_train_on_float_crops():
    batches = [uint8_crops(seed) for seed in range(3)]
    result = {}
    for name, feed in [("uint8", batches), ("float", [normalize_crops_list(b) for b in batches])]:
        args = tiny_args()
        model = tiny_model()
        optimizer = build_larc_sgd(model, args)
        (_, loss), _ = main_swav.train(ListLoader(feed), model, optimizer, 0, np.full(3, 0.5),
                                       None, args)
        result[name] = loss, _weights(model)
    assert result["uint8"][0] == pytest.approx(result["float"][0], rel=1e-6)
    torch.testing.assert_close(result["uint8"][1], result["float"][1], rtol=1e-6, atol=1e-7)


def normalize_crops_list(batch):
    return [normalize_crops(c) for c in batch]


def test_deepclusterv2_init_memory_on_uint8_crops(image_folder):
    args = dc.get_args_parser().parse_args(["--nmb_prototypes", "5", "--feat_dim", "16",
                                            "--hidden_mlp", "32", "--batch_size", "8"])
    args.nmb_crops, args.size_crops, args.crops_for_assign = [2, 2], [16, 8], [0, 1]
    args.rank, args.world_size, args.device, args.use_fp16 = 0, 1, "cpu", False
    torch.manual_seed(0)
    model = tiny_model()
    batches = [(torch.arange(8) + 8 * k, uint8_crops(k)) for k in range(2)]
    floats = [(i, normalize_crops_list(b)) for i, b in batches]
    index, emb = dc.init_memory(ListLoader(batches), copy.deepcopy(model), args)
    ref_index, ref_emb = dc.init_memory(ListLoader(floats), copy.deepcopy(model), args)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(emb, ref_emb, rtol=1e-6, atol=1e-7)


def test_simsiam_train_on_uint8_views_equals_train_on_float_views():
    args = main_simsiam.get_args_parser().parse_args([])
    args.rank, args.world_size, args.device, args.use_fp16 = 0, 1, "cpu", False
    views = [uint8_crops(seed, sizes=(16, 16)) for seed in range(2)]
    result = {}
    for name, feed in [("uint8", views), ("float", [normalize_crops_list(v) for v in views])]:
        torch.manual_seed(0)
        model = SimSiam(resnet18(cifar_stem=True, width=8), dim=16, pred_dim=4)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        main_simsiam.train(ListLoader(feed), model, optimizer, 0, [0.05, 0.05], args)
        result[name] = _weights(model)
    torch.testing.assert_close(result["uint8"], result["float"], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- CUDA settings
ENTRY_POINTS = ["main_swav", "main_deepclusterv2", "main_simsiam", "eval_linear", "eval_knn",
                "eval_semisup"]


@pytest.fixture
def cuda_flags():
    names = [(torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "allow_tf32"),
             (torch.backends.cuda.matmul, "allow_tf32")]
    old = [getattr(m, n) for m, n in names]
    yield
    for (m, n), v in zip(names, old):
        setattr(m, n, v)


@pytest.mark.parametrize("tf32", [False, True])
def test_configure_backends_autotunes_and_sets_tf32_on_cuda(cuda_flags, tf32):
    from src.engine import configure_backends
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
    args = entry_args("main_swav", ["--tf32", str(tf32)], device="cpu")
    configure_backends(args)  # a CPU run: untouched
    assert not torch.backends.cudnn.benchmark
    args.device = "cuda:0"
    configure_backends(args)  # flags only: no GPU needed
    assert torch.backends.cudnn.benchmark
    assert torch.backends.cuda.matmul.allow_tf32 == torch.backends.cudnn.allow_tf32 == tf32


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_entry_point_has_tf32_off_by_default_and_channels_last_on(name):
    import importlib
    parser = importlib.import_module(name).get_args_parser()
    args = parser.parse_args([])
    assert args.tf32 is False and args.channels_last is True
    assert parser.parse_args(["--tf32", "true", "--channels_last", "false"]).tf32 is True


def test_evaluations_configure_backends_and_use_channels_last(tmp_path, monkeypatch):
    import eval_knn
    from src import evaluation
    calls = []
    monkeypatch.setattr(evaluation, "configure_backends", lambda args: calls.append(args.tf32))
    args = eval_knn.get_args_parser().parse_args(["--dump_path", str(tmp_path), "--device",
                                                  "cpu", "--arch", "resnet18", "--tf32", "true"])
    evaluation.start_eval(args, "eval_knn", ("k", "temperature", "top1", "top5"))
    assert calls == [True]
    backbone = evaluation.build_frozen_backbone(args, 32)
    assert backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    args.channels_last = False
    assert not evaluation.build_frozen_backbone(args, 32).conv1.weight.is_contiguous(
        memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- gpu_suite.sh
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")


def test_gpu_suite_syntax_and_shellcheck():
    subprocess.run(["bash", "-n", SUITE], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", SUITE], check=True)


def test_gpu_suite_dry_run_commands_parse_with_each_entry_point(tmp_path):
    """The suite's command lines: every entry point under torchrun with fp16 on CUDA, each with
    its own fresh dump path, flags its parser accepts; a second run gets a new folder."""
    import importlib
    out = subprocess.run(["bash", SUITE, "--dry-run", "checks", str(tmp_path)], check=True,
                         capture_output=True, text=True).stdout.splitlines()
    commands = [shlex.split(line) for line in out if ".py " in line and "torch.distributed.run"
                in line]
    scripts = [c[c.index("--nproc_per_node") + 2] for c in commands]
    assert scripts == ["main_swav.py", "main_deepclusterv2.py", "main_simsiam.py",
                       "eval_linear.py", "eval_semisup.py", "eval_knn.py"]
    dumps = set()
    for cmd, script in zip(commands, scripts):
        assert cmd[0].endswith(".venv/bin/python") and cmd[1:3] == ["-m", "torch.distributed.run"]
        argv = cmd[cmd.index(script) + 1:]
        args = importlib.import_module(script[:-3]).get_args_parser().parse_args(argv)
        assert args.use_fp16 is True and args.device == "cuda"
        assert args.dump_path.startswith(str(tmp_path)) and args.dump_path not in dumps
        dumps.add(args.dump_path)
    assert any("tests/test_gpu.py" in line for line in out)
    again = subprocess.run(["bash", SUITE, "--dry-run", "checks", str(tmp_path)], check=True,
                           capture_output=True, text=True).stdout
    assert out[0] != again.splitlines()[0]  # "results in <a new folder>"


def test_gpu_suite_fails_on_the_first_error(tmp_path):
    """A failing command fails the suite (set -e with pipefail: its output goes through tee)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, status in [("nvidia-smi", 0), ("python", 3)]:
        (bin_dir / name).write_text(f"#!/bin/sh\necho {name}\nexit {status}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python"))
    proc = subprocess.run(["bash", SUITE, "checks", str(tmp_path / "out")], env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "passed" not in proc.stdout
    assert "== data" in proc.stdout and "== main_swav" not in proc.stdout

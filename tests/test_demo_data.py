"""The embedded demo data (data/fashion_mnist_subset.npz), the tool that makes and exports it,
and tools/plot_stats.py."""
import gzip
import os
import struct
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import make_demo_data  # noqa: E402
import plot_stats  # noqa: E402
import demo  # noqa: E402


def test_shipped_subset_is_stratified_uint8_and_small():
    assert os.path.getsize(make_demo_data.DEFAULT_NPZ) < 5e6
    assert os.path.isfile(os.path.join(ROOT, "data", "LICENSE-fashion-mnist.txt"))
    d = make_demo_data.load_subset()
    assert d["x_train"].shape == (5000, 28, 28) and d["x_train"].dtype == np.uint8
    assert d["x_test"].shape == (1000, 28, 28) and d["x_test"].dtype == np.uint8
    assert np.bincount(d["y_train"]).tolist() == [500] * 10
    assert np.bincount(d["y_test"]).tolist() == [100] * 10
    assert list(d["classes"]) == make_demo_data.CLASSES
    # distinct source images, and real images (not blank)
    assert len(np.unique(d["train_index"])) == 5000
    assert d["x_train"].reshape(5000, -1).max(1).min() > 0


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim,
                                                                    *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_source(tmp_path):
    """Fashion-MNIST-shaped IDX files: 10 classes, 12 train / 5 test images each."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    for key, n in (("train", 120), ("t10k", 50)):
        labels = np.repeat(np.arange(10), n // 10)
        rng.shuffle(labels)
        images = rng.integers(1, 255, size=(n, 28, 28))
        images[:, 0, 0] = labels  # tag each image with its label
        write_idx(str(src / f"{key}-images-idx3-ubyte.gz"), images)
        write_idx(str(src / f"{key}-labels-idx1-ubyte.gz"), labels)
    return str(src)


def test_build_is_deterministic_and_stratified(fake_source, tmp_path):
    a, b = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    make_demo_data.build(fake_source, a, train_per_class=4, test_per_class=2, seed=0)
    make_demo_data.build(fake_source, b, train_per_class=4, test_per_class=2, seed=0)
    da, db = make_demo_data.load_subset(a), make_demo_data.load_subset(b)
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(da[key], db[key])
    assert np.bincount(da["y_train"]).tolist() == [4] * 10
    assert np.bincount(da["y_test"]).tolist() == [2] * 10
    # labels stay attached to their images
    assert (da["x_train"][:, 0, 0] == da["y_train"]).all()
    make_demo_data.build(fake_source, b, train_per_class=4, test_per_class=2, seed=1)
    assert not np.array_equal(da["train_index"], make_demo_data.load_subset(b)["train_index"])
    with pytest.raises(ValueError, match="fewer than"):
        make_demo_data.build(fake_source, b, train_per_class=13)


def test_build_without_source_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        make_demo_data.main(["build", "--source", str(tmp_path / "nope"),
                             "--out", str(tmp_path / "x.npz")])
    assert "error:" in str(e.value) and "dataset-fashion-mnist" in str(e.value)


def test_export_writes_an_image_folder_of_padded_rgb_pngs(tmp_path):
    out = str(tmp_path / "folder")
    n = make_demo_data.export(make_demo_data.DEFAULT_NPZ, out, limit_per_class=2)
    assert n == 2 * 10 * 2
    for split in ("train", "val"):
        classes = sorted(os.listdir(os.path.join(out, split)))
        assert classes == [f"{i}_{c}" for i, c in enumerate(make_demo_data.CLASSES)]
    d = make_demo_data.load_subset()
    first_class0 = np.flatnonzero(d["y_train"] == 0)[0]
    img = Image.open(os.path.join(out, "train", "0_T-shirt_top", f"{first_class0:05d}.png"))
    assert img.size == (32, 32) and img.mode == "RGB"
    arr = np.asarray(img)
    np.testing.assert_array_equal(arr[2:30, 2:30, 1], d["x_train"][first_class0])
    assert arr[:2].max() == 0 and (arr[..., 0] == arr[..., 2]).all()
    # a second export of the same file with the same options is skipped
    assert make_demo_data.export(make_demo_data.DEFAULT_NPZ, out, limit_per_class=2) == 0


def test_plot_stats_writes_a_png(tmp_path):
    dump = tmp_path / "run"
    dump.mkdir()
    pd.DataFrame({"epoch": [0, 1], "loss": [4.0, 3.5]}).to_pickle(dump / "stats0.pkl")
    lines = [f"INFO - x - 0:00:01 - Epoch: [{e}][{it}]\tTime 0.1 (0.1)\tData 0.0 (0.0)\t"
             f"Loss {4 - e - it / 100:.4f} (4.0)\tLr: {0.1 * (it + 1):.4f}\tETA epoch 3s\n"
             for e in range(2) for it in (0, 10, 20)]
    (dump / "train.log").write_text("".join(lines))
    frame = plot_stats.read_log(str(dump / "train.log"))
    assert len(frame) == 6 and frame["lr"].iloc[1] == pytest.approx(1.1)
    pd.DataFrame({"epoch": [0, 1], "prec1_val": [50.0, 60.0]}).to_pickle(
        dump / "stats_eval_linear0.pkl")
    out = plot_stats.plot(str(dump))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError):
        plot_stats.plot(str(tmp_path))


def test_demo_methods_and_progress_line():
    """Every method's demo command parses with its script's own parser; the progress line is
    read for SwAV's positive and SimSiam's negative losses."""
    import importlib
    for name, method in demo.METHODS.items():
        module = importlib.import_module(method.script[:-3])
        args = module.get_args_parser().parse_args(
            ["--data_path", "d", "--dump_path", "r", *demo.BACKBONE, *demo.COMMON, *method.args])
        assert args.batch_size == 64 and args.width == int(demo.BACKBONE[-1]), name
    line = "Epoch: [{}][20]\tTime 0.132 (0.141)\tData 0.007 (0.004)\tLoss {} ({})\tLr: 0.0352"
    assert demo.PROGRESS.search(line.format(11, -0.812, -0.7852)).groups() == ("11", "20", "-0.7852")
    assert demo.PROGRESS.search(line.format(1, 3.812, 3.7852)).groups() == ("1", "20", "3.7852")

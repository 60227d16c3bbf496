"""Your own images as --data_path (issue 16 §1): an ImageFolder, a flat folder, a folder tree at
mixed depths, or a list file train every method; hidden files, other files and upper-case
extensions; a symlink loop (issue 20 item 5); the tree walked once per job (rank 0), the other
ranks and a resumed run reading dump_path/image_list.txt; the evaluations refuse unlabelled
data in one line."""
import json
import os
import runpy
import shutil
import subprocess
import sys

import pandas as pd
import pytest

import main_deepclusterv2
import main_simsiam
import main_swav
from conftest import ROOT, entry_args, make_image_folder, make_split_folder, tiny_swav_argv
from src import imagelist
from src.evaluation import build_eval_datasets
from src.imagelist import DataError, find_images, read_list_file
from src.multicropdataset import MultiCropDataset

IMAGE_LIST = "image_list.txt"  # src.data.IMAGE_LIST, written into --dump_path
KW = dict(size_crops=[16], nmb_crops=[2], min_scale_crops=[0.3], max_scale_crops=[1])


pytestmark = pytest.mark.usefixtures("no_launcher", "one_thread")  # conftest.py


# ----------------------------------------------------------------------------- the layouts
def _images(root, n, seed):
    """n tiny JPEGs written into root (flattened out of a one-class ImageFolder)."""
    tmp = make_image_folder(root + ".tmp", classes=1, per_class=n, size=20, seed=seed)
    os.makedirs(root, exist_ok=True)
    names = []
    for f in sorted(os.listdir(os.path.join(tmp, "class_0"))):
        names.append(os.path.join(root, f"s{seed}_{f}"))
        shutil.move(os.path.join(tmp, "class_0", f), names[-1])
    shutil.rmtree(tmp)
    return names


def make_layout(base, layout):
    """24 images in `layout`; returns (--data_path, its description in the log)."""
    root = os.path.join(base, "data")
    if layout == "ImageFolder":
        make_image_folder(root, classes=3, per_class=8, size=20)
    elif layout == "flat folder":
        _images(root, 24, seed=0)
    elif layout == "folder tree":  # images beside folders, at depths 0, 1 and 2
        _images(root, 8, seed=0)
        _images(os.path.join(root, "a"), 8, seed=1)
        _images(os.path.join(root, "b", "c"), 8, seed=2)
    else:  # a list file, half absolute and half relative paths, a comment, a missing file
        paths = _images(os.path.join(base, "pics"), 24, seed=0)
        root = os.path.join(base, "lists", "train.txt")
        os.makedirs(os.path.dirname(root))
        lines = ["# my images", ""] + paths[:12] + [os.path.join("..", "pics", os.path.basename(p))
                                                    for p in paths[12:]]
        lines.append(os.path.join(base, "pics", "gone.jpg"))
        with open(root, "w") as f:
            f.write("\n".join(lines) + "\n")
    return root, f"found 24 images in {root} ({layout})"


LAYOUTS = ["ImageFolder", "flat folder", "folder tree", "list file"]


def _swav(data, dump):
    return main_swav.main(main_swav.get_args_parser().parse_args(
        tiny_swav_argv(data, dump, ["--epochs", "1"])))


def _deepcluster(data, dump):
    return main_deepclusterv2.main(main_deepclusterv2.get_args_parser().parse_args(
        tiny_swav_argv(data, dump, ["--epochs", "1", "--nmb_prototypes", "6", "5"])))


def _simsiam(data, dump):
    return main_simsiam.main(main_simsiam.get_args_parser().parse_args([
        "--data_path", data, "--epochs", "1", "--batch_size", "8", "--size_crop", "16", "--dim",
        "32", "--pred_dim", "8", "--workers", "0", "--use_fp16", "false", "--dump_path", dump,
        "--arch", "resnet18", "--width", "8", "--cifar_stem", "true", "--device", "cpu"]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_trains_one_epoch_of_each_method(tmp_path, layout):
    data, found = make_layout(str(tmp_path), layout)
    for name, run in [("swav", _swav), ("deepclusterv2", _deepcluster), ("simsiam", _simsiam)]:
        dump = str(tmp_path / name)
        run(data, dump)
        assert list(pd.read_pickle(os.path.join(dump, "stats0.pkl"))["epoch"]) == [0], name
        log = open(os.path.join(dump, "train.log")).read()
        assert log.count(found) == 1, (name, log[-3000:])
        assert "Building data done with 24 images loaded." in log
        listed = read_list_file(os.path.join(dump, IMAGE_LIST), check_exists=False)
        assert len(listed) == 24 and listed.root == data and listed.layout == layout
        if layout == "list file":  # the missing file is named once, and left out
            assert log.count("1 listed file(s) do not exist and are left out: "
                             f"[{os.path.join(str(tmp_path), 'pics', 'gone.jpg')!r}]") == 1
        if layout == "ImageFolder":  # the labels travel in the list
            assert listed.classes == ["class_0", "class_1", "class_2"]


def test_hidden_files_other_files_and_upper_case_extensions(tmp_path, caplog):
    root = make_image_folder(str(tmp_path / "d"), classes=2, per_class=3, size=20)
    os.rename(os.path.join(root, "class_0", "img_0.jpg"), os.path.join(root, "class_0", "A.JPG"))
    os.rename(os.path.join(root, "class_1", "img_0.jpg"), os.path.join(root, "class_1", "B.Png"))
    shutil.copy(os.path.join(root, "class_0", "img_1.jpg"), os.path.join(root, "class_0", ".x.jpg"))
    open(os.path.join(root, "class_0", "._img_1.jpg"), "wb").write(b"\x00\x05macOS")  # AppleDouble
    os.makedirs(os.path.join(root, "class_1", ".thumbs"))
    shutil.copy(os.path.join(root, "class_1", "img_1.jpg"), os.path.join(root, "class_1", ".thumbs"))
    os.makedirs(os.path.join(root, ".git"))
    shutil.copy(os.path.join(root, "class_1", "img_1.jpg"), os.path.join(root, ".git", "y.jpg"))
    for name in ["notes.txt", "clip.gif", ".DS_Store"]:
        open(os.path.join(root, "class_1", name), "w").close()
    with caplog.at_level("WARNING"):
        ds = MultiCropDataset(root, **KW)
    names = sorted(os.path.basename(p) for p, _ in ds.samples)
    assert names == ["A.JPG", "B.Png", "img_1.jpg", "img_1.jpg", "img_2.jpg", "img_2.jpg"]
    assert ds.classes == ["class_0", "class_1"] and sorted(ds.targets) == [0, 0, 0, 1, 1, 1]
    warnings = [r.getMessage() for r in caplog.records]  # one line names what was left out
    assert len(warnings) == 1 and "ignored 2 file(s) with other extensions: " in warnings[0]
    assert ".gif x1" in warnings[0] and ".txt x1" in warnings[0]


def test_symlink_loop_does_not_multiply_the_data(tmp_path):
    root = make_image_folder(str(tmp_path / "d"))  # 3 classes x 8
    os.symlink(root, os.path.join(root, "class_0", "back_to_root"))
    assert len(MultiCropDataset(root, **KW)) == 24  # was 984: each image 41 times
    os.symlink(os.path.join(root, "class_2"), os.path.join(root, "class_1", "same_as_class_2"))
    ds = MultiCropDataset(root, **KW)
    assert len(ds) == 24 and len({os.path.realpath(p) for p, _ in ds.samples}) == 24
    assert sorted(ds.targets) == sorted([0] * 8 + [1] * 8 + [2] * 8)
    # a folder tree (images at the root too) with the same loop
    shutil.copy(os.path.join(root, "class_0", "img_0.jpg"), os.path.join(root, "top.jpg"))
    images = find_images(root)
    assert images.layout == "folder tree" and len(images) == 25


def test_walk_order_is_torchvisions_within_a_class(tmp_path):
    import torchvision
    root = make_image_folder(str(tmp_path / "d"), classes=2, per_class=2, size=8)
    for sub in ["a-b", "a", os.path.join("a", "z"), "b"]:  # "a-b" sorts between "a" and "a/z"
        _images(os.path.join(root, "class_1", sub), 1, seed=len(sub))
    ours = MultiCropDataset(root, **KW).samples
    assert ours == torchvision.datasets.ImageFolder(root).samples


# ----------------------------------------------------------------------------- walk once
def _job_args(data, dump):
    os.makedirs(dump, exist_ok=True)
    return entry_args("main_swav", ["--data_path", data, "--dump_path", dump], rank=0,
                      world_size=1)


def test_resumed_run_reuses_the_list_and_another_data_path_gets_a_fresh_one(tmp_path, monkeypatch):
    from src.engine import job_image_list
    walks = []
    real_walk = imagelist._walk
    monkeypatch.setattr(imagelist, "_walk", lambda root: walks.append(root) or real_walk(root))
    a = make_image_folder(str(tmp_path / "a"), classes=2, per_class=2, size=8)
    b, _ = make_layout(str(tmp_path / "b"), "flat folder")
    dump = str(tmp_path / "dump")
    first = job_image_list(_job_args(a, dump))
    assert len(first) == 4 and walks == [a]
    again = job_image_list(_job_args(a, dump))  # a resumed run: no walk, same list and labels
    assert walks == [a] and again == first
    other = job_image_list(_job_args(b, dump))  # another --data_path: looked for again
    assert walks == [a, b] and len(other) == 24 and other.layout == "flat folder"
    assert read_list_file(os.path.join(dump, IMAGE_LIST)).root == b
    # a list file given as --data_path is read again once edited
    listed = str(tmp_path / "list.txt")
    first.save(listed)
    first = job_image_list(_job_args(listed, dump))
    assert len(first) == 4 and first.layout == "list file"
    with open(listed, "a") as f:
        f.write(other.paths[0] + "\n")
    os.utime(listed, (os.path.getmtime(listed) + 10,) * 2)
    assert len(job_image_list(_job_args(listed, dump))) == 5


def test_a_rank_0_that_finds_no_image_stops_every_rank_in_one_line(tmp_path, monkeypatch):
    from src import engine
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    reduced = []  # rank 0 takes part in the verdict's all-reduce before raising
    monkeypatch.setattr(engine.du, "all_reduce", lambda t: reduced.append(int(t)) or t)
    with pytest.raises(DataError, match="contains no images"):
        engine.job_image_list(_job_args(str(empty), str(tmp_path / "d0")))
    assert reduced == [1]
    # rank 1 (it walks nothing) learns rank 0's verdict from the all-reduce
    monkeypatch.setattr(engine.du, "all_reduce", lambda t: t.fill_(1))
    args = _job_args(str(empty), str(tmp_path / "d1"))
    args.rank = 1
    with pytest.raises(DataError, match=r"^rank 0 could not list the images of --data_path .*"
                                        r"\(its log says why\)$"):
        engine.job_image_list(args)


_COUNTER = """
import atexit, builtins, json, os, runpy, sys
data = os.path.realpath(os.environ["COUNT_UNDER"])
listed, opened = [], []
real_scandir, real_open = os.scandir, builtins.open

def scandir(path="."):  # os.walk lists every folder with os.scandir
    if isinstance(path, (str, os.PathLike)):
        p = os.path.realpath(path)
        if p == data or p.startswith(data + os.sep):
            listed.append(p)
    return real_scandir(path)

def open_(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, os.PathLike)) and os.path.basename(file) == "image_list.txt":
        opened.append(mode)
    return real_open(file, mode, *args, **kwargs)

os.scandir, builtins.open = scandir, open_
out = os.path.join(os.environ["COUNT_OUT"], "rank" + os.environ["RANK"] + ".json")
atexit.register(lambda: json.dump({"listed": listed, "opened": opened}, real_open(out, "w")))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_two_ranks_walk_the_tree_once_and_a_resumed_run_not_at_all(tmp_path):
    data = make_image_folder(str(tmp_path / "data"))  # the root and 3 class folders
    wrapper = tmp_path / "count_walks.py"
    wrapper.write_text(_COUNTER)
    dump = str(tmp_path / "run")

    def run(epochs, tag):
        out = tmp_path / tag
        out.mkdir()
        env = dict(os.environ, COUNT_UNDER=data, COUNT_OUT=str(out), OMP_NUM_THREADS="1",
                   PYTHONPATH=ROOT)
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node", "2", str(wrapper), "main_swav.py",
                            *tiny_swav_argv(data, dump, ["--epochs", str(epochs)])],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return [json.load(open(out / f"rank{i}.json")) for i in range(2)]

    rank0, rank1 = run(1, "first")
    real = os.path.realpath(data)
    assert sorted(rank0["listed"]) == sorted([real] + [os.path.join(real, f"class_{c}")
                                                       for c in range(3)])  # each folder once
    assert rank1["listed"] == []  # rank 1 walks nothing ...
    assert "r" in rank1["opened"]  # ... it reads the list rank 0 wrote
    log = open(os.path.join(dump, "train.log")).read()
    assert log.count(f"found 24 images in {data} (ImageFolder)") == 1

    rank0, rank1 = run(2, "resumed")  # the second epoch, resumed: nobody walks
    assert rank0["listed"] == [] and rank1["listed"] == []
    assert "r" in rank0["opened"] and "r" in rank1["opened"]
    assert list(pd.read_pickle(os.path.join(dump, "stats0.pkl"))["epoch"]) == [0, 1]
    log = open(os.path.join(dump, "train.log")).read()
    assert log.count(f"found 24 images in {data} (ImageFolder), from the list "
                     f"{os.path.join(dump, IMAGE_LIST)} an earlier run wrote") == 1


# ----------------------------------------------------------------------------- evaluations
def test_evaluations_refuse_unlabelled_data_in_one_line(tmp_path, monkeypatch):
    data = make_split_folder(str(tmp_path / "tree"), 2, 1)
    shutil.copy(os.path.join(data, "train", "class_0", "img_0.jpg"),
                os.path.join(data, "train", "loose.jpg"))  # images beside the class folders
    with pytest.raises(DataError) as e:
        build_eval_datasets(data, None, None)
    message = str(e.value)
    assert message.startswith(f"train/ of --data_path {os.path.join(data, 'train')!r} is a "
                              "folder tree without classes") and "labels" in message
    assert "one sub-folder per class" in message and "\n" not in message

    flat, _ = make_layout(str(tmp_path / "flat"), "flat folder")
    os.rename(flat, os.path.join(flat + "_split"))
    os.makedirs(flat)
    os.rename(flat + "_split", os.path.join(flat, "train"))
    make_image_folder(os.path.join(flat, "val"), classes=2, per_class=1, size=8)
    with pytest.raises(DataError, match="is a flat folder without classes: the evaluations train "
                                        "and score a classifier on labels"):
        build_eval_datasets(flat, None, None)

    listed, _ = make_layout(str(tmp_path / "list"), "list file")
    with pytest.raises(DataError, match="is a list file: the evaluations .* labels"):
        build_eval_datasets(listed, None, None)

    # the script itself: a one-line error, no traceback
    monkeypatch.setattr(sys, "argv", [
        "eval_knn.py", "--data_path", data, "--arch", "pixels", "--resize", "8", "--center_crop",
        "8", "--workers", "0", "--dump_path", str(tmp_path / "knn")])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(os.path.join(ROOT, "eval_knn.py"), run_name="__main__")
    text = str(exit_.value.code)
    assert text.startswith("error: train/ of --data_path") and "labels" in text and "\n" not in text

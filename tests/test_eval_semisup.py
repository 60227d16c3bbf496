"""eval_semisup.py: the labelled subset (subset file or deterministic stratified sample), its bad
input, the optimiser layout, and short runs in one process and under torchrun."""
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import ROOT, entry_args, free_port, make_split_folder

import eval_semisup
from src.evaluation import eval_scaler, read_subset_file, stratified_subset, train_epoch
from src.multicropdataset import DataError


def fake_samples(counts):
    return [(f"c{c}/img{i}.jpg", c) for c, n in enumerate(counts) for i in range(n)]


def test_stratified_subset_is_deterministic_and_covers_every_class():
    samples = fake_samples([100, 40, 7, 250])
    a = stratified_subset(samples, 10, seed=3)
    assert a == stratified_subset(samples, 10, seed=3)
    assert a != stratified_subset(samples, 10, seed=4)
    per_class = pd.Series([t for _, t in a]).value_counts().sort_index().tolist()
    assert per_class == [10, 4, 1, 25]  # round(10 % of each class)
    assert a == sorted(a, key=samples.index) and len(set(a)) == len(a)
    assert stratified_subset(samples, 100, seed=0) == samples


def test_labels_perc_that_empties_a_class_is_an_error():
    with pytest.raises(DataError, match="leaves class 'dog'"):
        stratified_subset(fake_samples([100, 3]), 1, seed=0, classes=["cat", "dog"])
    with pytest.raises(ValueError, match="labels_perc"):
        stratified_subset(fake_samples([10]), 0, seed=0)


def test_subset_file_formats_and_errors(tmp_path):
    train = tmp_path / "train"
    for cls, names in {"n01": ["n01_1.JPEG", "n01_2.JPEG"], "n02": ["n02_7.JPEG"]}.items():
        (train / cls).mkdir(parents=True)
        for name in names:
            (train / cls / name).write_bytes(b"")
    class_to_idx = {"n01": 0, "n02": 1}
    subset = tmp_path / "subset.txt"
    # SimCLR's bare file names (class = prefix) and relative paths, blank lines ignored
    subset.write_text("n01_2.JPEG\n\nn02/n02_7.JPEG\n")
    assert read_subset_file(str(subset), str(train), class_to_idx) == [
        (str(train / "n01" / "n01_2.JPEG"), 0), (str(train / "n02" / "n02_7.JPEG"), 1)]
    subset.write_text("\n\n")
    with pytest.raises(DataError, match="is empty"):
        read_subset_file(str(subset), str(train), class_to_idx)
    subset.write_text("n01_1.JPEG\nn01_9.JPEG\nn03_1.JPEG\n")
    with pytest.raises(DataError, match=r"2 of 3 files are not in .* \(first: n01/n01_9.JPEG\)"):
        read_subset_file(str(subset), str(train), class_to_idx)
    with pytest.raises(DataError, match="no such file"):
        read_subset_file(str(tmp_path / "none.txt"), str(train), class_to_idx)


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory):
    return make_split_folder(tmp_path_factory.mktemp("semi") / "data", 8, 3)


def semisup_argv(data, dump, extra=()):
    return ["--data_path", data, "--arch", "resnet18", "--width", "8", "--cifar_stem", "true",
            "--train_crop", "16", "--resize", "16", "--center_crop", "16", "--batch_size", "4",
            "--workers", "0", "--epochs", "2", "--decay_epochs", "1", "--labels_perc", "50",
            "--dump_path", dump, *extra]


def test_short_run_fine_tunes_the_whole_network(split_folder, tmp_path):
    torch.manual_seed(0)
    from src.resnet50 import build_backbone
    pre = build_backbone("resnet18", width=8, cifar_stem=True, normalize=True, hidden_mlp=16,
                         output_dim=8, nmb_prototypes=5)
    path = str(tmp_path / "pre.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in pre.state_dict().items()}}, path)
    dump = str(tmp_path / "run")
    final = eval_semisup.main(eval_semisup.get_args_parser().parse_args(
        semisup_argv(split_folder, dump, ["--pretrained", path])))
    stats = pd.read_pickle(os.path.join(dump, "stats_eval_semisup0.pkl"))
    assert list(stats["epoch"]) == [0, 1] and final["top1"] == stats["prec1_val"].iloc[-1]
    ckp = torch.load(os.path.join(dump, "checkpoint_eval_semisup.pth.tar"), weights_only=True)
    state = ckp["state_dict"]
    # the trunk moved away from the pre-trained weights; the head has one output per class
    assert not torch.equal(state["module.conv1.weight"], pre.state_dict()["conv1.weight"])
    assert state["module.projection_head.weight"].shape == (3, 64)
    # two parameter groups (trunk, head) with the original's rates, decayed by gamma at epoch 1
    groups = ckp["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([0.01 * 0.2, 0.2 * 0.2])
    assert len(groups[1]["params"]) == 2 and all(g["weight_decay"] == 0 for g in groups)


def test_subset_file_run_and_torchrun(split_folder, tmp_path):
    subset = tmp_path / "subset.txt"
    subset.write_text("class_0/img_1.jpg\nclass_1/img_2.jpg\nclass_2/img_0.jpg\n"
                      "class_2/img_5.jpg\n")
    dump = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "eval_semisup.py",
           *semisup_argv(split_folder, dump, ["--subset_file", str(subset), "--batch_size", "2"])]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = open(os.path.join(dump, "eval_semisup.log")).read()
    assert "labelled subset" in log and "4 images of 3/3 classes" in log
    stats = pd.read_pickle(os.path.join(dump, "stats_eval_semisup0.pkl"))
    # 9 val images, each counted once over the two ranks
    assert all(abs(p * 9 / 100 - round(p * 9 / 100)) < 1e-6 for p in stats["prec1_val"])


def test_cli_bad_labels_perc_is_one_line(split_folder, tmp_path):
    proc = subprocess.run([sys.executable, "eval_semisup.py",
                           *semisup_argv(split_folder, str(tmp_path / "x"),
                                         ["--labels_perc", "1"])],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --labels_perc 1.0 leaves class")


def test_fine_tuning_steps_go_through_the_grad_scaler():
    """fp16 fine-tuning on CUDA needs loss scaling; on the CPU the scaler is off (bf16/fp32).
    An enabled CPU GradScaler stands in for the CUDA one: every loss is scaled, every gradient
    unscaled before the step, and a power-of-two scale leaves the steps those of no scaler."""
    args = entry_args("eval_semisup", ["--use_fp16", "true", "--log_freq", "100"], device="cpu",
                      rank=0, world_size=1)
    assert not eval_scaler(args).is_enabled()

    class RecordingScaler(torch.amp.GradScaler):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.scaled, self.unscaled = 0, 0

        def scale(self, loss):
            self.scaled += 1
            return super().scale(loss)

        def unscale_(self, optimizer):
            self.unscaled += 1
            return super().unscale_(optimizer)

    def run(scaler):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        loader = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        before = model.weight.detach().clone()
        train_epoch(model, [model], loader, optimizer, 0, args, scaler)
        assert not torch.equal(model.weight, before)  # the steps were taken
        return model.weight.detach()

    scaler = RecordingScaler("cpu", init_scale=2.0 ** 10)
    assert scaler.is_enabled()
    scaled = run(scaler)
    assert scaler.scaled == 3 and scaler.unscaled == 3
    assert scaler.get_scale() == 2.0 ** 10  # finite gradients: no step skipped, no back-off
    plain = run(None)  # train_epoch's default: a disabled scaler
    assert torch.equal(scaled, plain)  # 2^10 scales and unscales exactly

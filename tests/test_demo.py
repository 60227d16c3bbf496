"""tools/demo.py's pieces, without running the demo: the raw-pixel k-means baseline, the
summary.json of a run whose steps are stubbed, and the clustering step's flags."""
import json
import os
import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import demo  # noqa: E402


def blobs(n_per_class=12, classes=3, side=6, seed=0):
    """uint8 images of `classes` well-separated mean images plus a little noise."""
    rng = np.random.default_rng(seed)
    means = rng.integers(0, 256, size=(classes, side, side))
    labels = np.repeat(np.arange(classes), n_per_class)
    noise = rng.normal(0, 4, size=(len(labels), side, side))
    return np.clip(means[labels] + noise, 0, 255).astype(np.uint8), labels


def test_pixel_kmeans_recovers_separated_classes_and_not_shuffled_labels():
    images, labels = blobs()
    found = demo.pixel_kmeans(images, labels, k=3)
    assert found["nmi"] == pytest.approx(1.0) and found["ari"] == pytest.approx(1.0)
    shuffled = np.random.default_rng(1).permutation(labels)
    assert demo.pixel_kmeans(images, shuffled, k=3)["nmi"] < 0.3
    # the same K as asked: more clusters than classes split them, purity stays 1
    more = demo.pixel_kmeans(images, labels, k=6)
    assert more["purity"] == pytest.approx(1.0) and more["nmi"] < 1.0


def test_stubbed_run_writes_summary_json(tmp_path, monkeypatch, capsys):
    """Every step stubbed: summary.json holds the issue's keys with the steps' numbers, and the
    console prints the margins and the contact-sheet overview's path."""
    evals = {"swav": (84.0, 82.5), "untrained": (74.0, 73.0), "pixels": (80.0, 78.5)}
    calls = []
    monkeypatch.setattr(demo.make_demo_data, "export", lambda *a, **k: 0)
    monkeypatch.setattr(demo, "pretrain", lambda *a: 12.5)
    monkeypatch.setattr(demo, "evaluate", lambda data, dump, *a: (
        *evals[os.path.basename(dump)], 1.0))
    monkeypatch.setattr(demo.plot_stats, "plot", lambda d: os.path.join(d, "plot.png"))

    def cluster(data, dump, checkpoint, model_args, workers, tensorboard, flags):
        calls.append((checkpoint, flags))
        grouped = "--prototype_groups" in flags
        k = int(flags[flags.index("--prototype_groups" if grouped else "--nmb_clusters") + 1])
        return {"mode": flags[1], "clusters": k, "non_empty": k, "nmi": 0.68 if grouped else 0.71,
                "ari": 0.4, "overview": os.path.join(dump, "overview.png"),
                **({"prototypes": {"clusters": 100}} if grouped else {})}
    monkeypatch.setattr(demo, "cluster", cluster)
    monkeypatch.setattr(demo, "pixel_kmeans", lambda x, y, k: (
        calls.append(k) or {"nmi": 0.5, "ari": 0.3, "purity": 0.6}))
    demo.main(["--out", str(tmp_path / "run"), "--data", str(tmp_path / "data"),
               "--tensorboard", "false"])
    run_dir = tmp_path / "run" / "swav"
    ckpt = str(run_dir / "checkpoint.pth.tar")
    # the prototypes grouped into 10, then k-means with K = 10; one pixel k-means for that K
    assert calls == [(ckpt, demo.CLUSTERINGS["prototypes"]), 10,
                     (ckpt, demo.CLUSTERINGS["kmeans10"])]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary)[:len(demo.SUMMARY_KEYS)] == list(demo.SUMMARY_KEYS)
    assert (summary["trained_linear"], summary["trained_knn"]) == (84.0, 82.5)
    assert (summary["untrained_linear"], summary["untrained_knn"]) == (74.0, 73.0)
    assert (summary["pixels_linear"], summary["pixels_knn"]) == (80.0, 78.5)
    assert (summary["cluster_nmi"], summary["pixels_kmeans_nmi"]) == (0.68, 0.5)
    assert [(c["name"], c["K"], c["nmi"]) for c in summary["clusterings"]] == [
        ("prototypes", 10, 0.68), ("kmeans10", 10, 0.71)]
    assert 0 <= summary["total_s"] < 60 and summary["clusters"] == 10
    out = capsys.readouterr().out
    assert "raw pixels: linear +4.0, k-NN +4.0" in out and "NMI +0.180" in out
    assert "NMI +0.210" in out and "its 100 learned prototypes grouped into 10" in out
    assert str(run_dir / "clusters_prototypes" / "overview.png") in out


def test_summary_refuses_missing_keys(tmp_path):
    with pytest.raises(ValueError, match="cluster_nmi"):
        demo.write_summary(str(tmp_path / "s.json"), **{k: 0 for k in demo.SUMMARY_KEYS
                                                        if k != "cluster_nmi"})


def test_cluster_flags_parse_with_assign_clusters():
    import assign_clusters
    for flags in demo.CLUSTERINGS.values():
        args = assign_clusters.get_args_parser().parse_args(
            ["--data_path", "d", "--pretrained", "c", *demo.SIZES, *demo.BACKBONE,
             *demo.CLUSTER_VIEW, *flags])
        assert args.mode in ("kmeans", "argmax") and args.center_crop == int(demo.SIZES[-1])


def test_evaluations_run_in_process_with_their_logs(tmp_path, no_launcher):
    """run_in_process: the entry point's main() here, its console output in the log file (not on
    the demo's console), its own files in the dump path; twice in one process (the demo runs six
    evaluations); a failure ends the demo with one line naming the script and the log."""
    from conftest import make_split_folder
    data = make_split_folder(str(tmp_path / "data"), train_per_class=4, val_per_class=2)
    for name in ("a", "b"):
        dump = tmp_path / name
        dump.mkdir()
        demo.run_in_process("eval_knn.py", [
            "--data_path", data, "--dump_path", str(dump), "--arch", "pixels", "--resize", "8",
            "--center_crop", "8", "--workers", "0", "--nb_knn", "3", "--tensorboard", "false"],
            str(dump / "console.log"))
        assert "top-1" in (dump / "console.log").read_text()
        assert (dump / "stats_eval_knn0.pkl").exists()
    with pytest.raises(SystemExit, match=r"eval_knn.py failed .*end of .*bad.log"):
        demo.run_in_process("eval_knn.py", ["--data_path", str(tmp_path / "missing"),
                                            "--dump_path", str(tmp_path / "c"), "--arch",
                                            "pixels"], str(tmp_path / "bad.log"))
    assert "missing" in (tmp_path / "bad.log").read_text()


def test_simsiam_has_no_prototype_clustering(tmp_path, monkeypatch):
    """SimSiam has no prototypes: only the k-means clustering runs (argmax would stop the demo
    with assign_clusters' 'needs prototypes' error), and summary.json's cluster_nmi is its."""
    flags_seen = []
    monkeypatch.setattr(demo.make_demo_data, "export", lambda *a, **k: 0)
    monkeypatch.setattr(demo, "pretrain", lambda *a: 1.0)
    monkeypatch.setattr(demo, "evaluate", lambda *a: (70.0, 70.0, 1.0))
    monkeypatch.setattr(demo.plot_stats, "plot", lambda d: os.path.join(d, "plot.png"))
    monkeypatch.setattr(demo, "cluster", lambda *a: flags_seen.append(a[-1]) or {
        "mode": "kmeans", "clusters": 10, "non_empty": 10, "nmi": 0.6, "ari": 0.4,
        "overview": "o.png"})
    monkeypatch.setattr(demo, "pixel_kmeans", lambda x, y, k: {"nmi": 0.5, "ari": 0.3})
    demo.main(["--method", "simsiam", "--out", str(tmp_path), "--data", str(tmp_path / "d"),
               "--tensorboard", "false"])
    assert flags_seen == [demo.CLUSTERINGS["kmeans10"]]
    summary = json.loads((tmp_path / "simsiam" / "summary.json").read_text())
    assert summary["cluster_nmi"] == 0.6 and summary["cluster_mode"] == "kmeans"


def test_progress_line_waits_for_the_start_up_before_an_eta():
    line = ("INFO - 0:00:06 - Epoch: [{}][{}]\tTime 0.1 (0.1)\tData 0.0 (0.0)\tLoss 6.0 (6.0)"
            "\tLr: 0.1")
    assert demo.progress_line("INFO - Starting epoch 0", 78, 80, 5.0) is None
    first = demo.progress_line(line.format(0, 0), 78, 80, 6.0)
    assert "iteration 1/6240" in first and first.endswith("ETA -")
    later = demo.progress_line(line.format(1, 21), 78, 80, 10.0)  # 100 done, 6140 left
    assert "epoch 2/80, iteration 100/6240, loss 6.000" in later and later.endswith("ETA 614s")

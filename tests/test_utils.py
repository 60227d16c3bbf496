import argparse
import logging
import math
import re

import numpy as np
import pytest
import torch

from src.logger import LogFormatter, PD_Stats, create_logger
from src.utils import accuracy, bool_flag, cosine_lr_schedule


def test_lr_schedule_values_match_original_formula():
    base, final, epochs, warm, niter, start = 4.8, 0.0048, 5, 2, 7, 0.3
    sched = cosine_lr_schedule(base, final, epochs, niter, warm, start)
    warmup = np.linspace(start, base, niter * warm)
    T = niter * (epochs - warm)
    cosine = [final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / T)) for t in range(T)]
    assert len(sched) == niter * epochs
    np.testing.assert_allclose(sched, np.concatenate([warmup, cosine]), rtol=1e-12)
    assert sched[0] == start and sched[niter * warm - 1] == base and sched[niter * warm] == base
    # warm-up longer than the run (the tiny command): only the warm-up ramp is used
    assert len(cosine_lr_schedule(4.8, 0, 2, 3, 10)) == 30


def test_bool_flag():
    for s in ["on", "True", "1", "TRUE"]:
        assert bool_flag(s) is True
    for s in ["off", "false", "0"]:
        assert bool_flag(s) is False
    with pytest.raises(argparse.ArgumentTypeError):
        bool_flag("maybe")


def test_accuracy_topk_on_non_contiguous_slices():
    output = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.3, 0.3, 0.4]])
    target = torch.tensor([1, 2, 2, 0])
    top1, top2 = accuracy(output, target, topk=(1, 2))
    assert top1.item() == pytest.approx(50.0) and top2.item() == pytest.approx(75.0)


def test_log_format_and_indent():
    fmt = LogFormatter()
    rec = logging.LogRecord("x", logging.INFO, "f", 1, "line1\nline2", None, None)
    out = fmt.format(rec)
    assert re.match(r"INFO - \d\d/\d\d/\d\d \d\d:\d\d:\d\d - 0:00:00 - line1\n {30,}line2$", out)


def test_pd_stats_roundtrip_and_column_check(tmp_path):
    p = str(tmp_path / "stats0.pkl")
    s = PD_Stats(p, ["epoch", "loss"])
    s.update((0, 1.5))
    s.update((1, 1.2))
    s2 = PD_Stats(p, ["epoch", "loss"])
    assert len(s2.stats) == 2 and s2.stats["loss"].iloc[1] == 1.2
    with pytest.raises(ValueError, match="columns"):
        PD_Stats(p, ["epoch", "acc"])


def test_logger_keeps_library_debug_out_of_the_log(tmp_path):
    path = tmp_path / "train.log"
    log = create_logger(str(path), rank=0)
    try:
        logging.getLogger("PIL.PngImagePlugin").debug("STREAM b'IDAT' 41 1377")
        logging.getLogger("src.engine").debug("our own debug line")
    finally:
        for handler in list(log.handlers):
            if getattr(handler, "_swav", False):
                log.removeHandler(handler)
                handler.close()
    text = path.read_text()
    assert "our own debug line" in text
    assert "STREAM" not in text

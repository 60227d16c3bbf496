"""src/cli.run_main (issue 19): the project's own errors (src/errors.py) end in one line, any
other exception, a plain ValueError from deep inside among them, is a bug and keeps its
traceback."""
import os
import runpy
import sys

import pytest

from conftest import ROOT
from src import distributed as du
from src.errors import CheckpointError, DataError, UsageError

SCRIPTS = ["main_swav.py", "main_deepclusterv2.py", "main_simsiam.py", "eval_linear.py",
           "eval_semisup.py", "eval_knn.py", "assign_clusters.py"]


def _run(monkeypatch, script, error, tmp_path):
    """Run `script`'s own __main__ block with the process-group set-up raising `error`."""
    def fail(args):
        raise error
    monkeypatch.setattr(du, "init_distributed_mode", fail)
    monkeypatch.setattr(sys, "argv", [script, "--data_path", str(tmp_path),
                                     "--dump_path", str(tmp_path / "run")])
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_plain_value_error_is_a_bug_with_its_traceback(script, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="a bug deep inside") as raised:
        _run(monkeypatch, script, ValueError("a bug deep inside"), tmp_path)
    assert type(raised.value) is ValueError  # not turned into SystemExit("error: ...")
    assert raised.traceback  # raised as is: the traceback is printed


@pytest.mark.parametrize("error", [UsageError("--x is bad"), DataError("--x is bad"),
                                   CheckpointError("--x is bad")])
def test_the_projects_own_errors_stay_one_line(error, tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as exit_:
        _run(monkeypatch, "main_swav.py", error, tmp_path)
    assert exit_.value.code == "error: --x is bad"

# make test: set up .venv and run the test suite; make demo: the end-to-end demo on embedded data.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-slurm demo clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# the demo: pre-train on the embedded Fashion-MNIST subset, evaluate, print the table
# (METHOD=swav by default; METHOD=deepclusterv2 or METHOD=simsiam for the other methods)
METHOD ?= swav
demo: $(STAMP)
	$(PY) tools/demo.py --method $(METHOD)

test: $(STAMP)
	$(PY) -m pytest -q tests

# the sbatch scripts on a real one-node Slurm, with a preemption and requeue (needs root: it
# installs slurm + munge with apt-get when missing; see docs/README_slurm.md)
test-slurm: $(STAMP)
	$(PY) tests/slurm/run_test_slurm.py

clean:
	rm -rf demo_run demo_data

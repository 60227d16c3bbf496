"""init_distributed_mode under a faked Slurm environment and faked CUDA: the GPU a task binds
to, and the rendezvous host (never 127.0.0.1 on a multi-node job)."""
import pytest
import torch

from conftest import entry_args
from src import distributed as du


@pytest.fixture
def fake(monkeypatch):
    """Slurm task 5 of 8 (local id 1); CUDA with `ngpus` visible; collectives recorded."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "")  # recorded, so that what the code sets is undone after the test
        monkeypatch.delenv(k)
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
           "SLURM_JOB_NODELIST": "gpu-[01-02]", "SLURM_JOB_NUM_NODES": "2"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.setdefault("device", d))
    monkeypatch.setattr(du.dist, "init_process_group",
                        lambda **kw: seen.setdefault("group", kw))
    monkeypatch.setattr(du, "_slurm_master_addr", lambda: None)  # scontrol failed

    def run(ngpus, master=None):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: ngpus)
        if master:
            monkeypatch.setattr(du, "_slurm_master_addr", lambda: master)
        return du.init_distributed_mode(entry_args("main_swav", ["--device", "auto"]))
    return run, seen, monkeypatch


def test_one_gpu_per_task_binds_cuda0(fake):
    run, seen, _ = fake
    args = run(ngpus=1, master="gpu-01")
    assert args.device == "cuda:0" and args.gpu_to_work_on == 0 and seen["device"] == 0
    assert seen["group"]["backend"] == "nccl" and seen["group"]["rank"] == 5


def test_all_gpus_of_the_node_visible_binds_the_local_rank(fake):
    run, seen, _ = fake
    assert run(ngpus=8, master="gpu-01").device == "cuda:1" and seen["device"] == 1


def test_multi_node_job_without_a_master_is_an_error_not_localhost(fake):
    run, seen, _ = fake
    with pytest.raises(ValueError, match="cannot find the first node of the Slurm job"):
        run(ngpus=8)
    assert "group" not in seen  # no rendezvous at this node's own 127.0.0.1


def test_one_node_job_falls_back_to_this_host(fake):
    import os
    run, seen, mp = fake
    mp.setenv("SLURM_JOB_NUM_NODES", "1")
    run(ngpus=8)
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and "group" in seen


def test_torchrun_with_one_process_makes_a_one_rank_group(fake):
    """`torchrun --nproc_per_node 1` (the GPU suite's runs): a real group of one, so the
    collectives run (nccl on a GPU) instead of being skipped as in a plain process."""
    run, seen, monkeypatch = fake
    for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID"):
        monkeypatch.delenv(k)
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    args = run(ngpus=1)
    assert args.world_size == 1 and args.device == "cuda:0"
    assert seen["group"]["backend"] == "nccl" and seen["group"]["world_size"] == 1
    # a plain process (no launcher) makes none
    seen.clear()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k)
    run(ngpus=1)
    assert "group" not in seen

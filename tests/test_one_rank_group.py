"""A real one-rank process group: gloo on the CPU here, nccl on a GPU machine (skipped without
CUDA; `python -m pytest -q tests/test_one_rank_group.py` there). The collectives run (a group of
one is not skipped), each with its tensor on the backend's device although the callers hold
host tensors: a DeepCluster-v2 epoch to its end (k-means, the collapse monitor fed CPU
assignments, the memory-bank gather for the checkpoint) and the k-NN top-k merge."""

import pytest
import torch
import torch.distributed as dist

import main_deepclusterv2 as dc
from conftest import free_port, tiny_swav_argv
from src import preemption
from src.checkpoint import safe_load
from src.evaluation import knn_classify, merge_topk

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "gather")


@pytest.fixture(params=["gloo", pytest.param("nccl", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def group(request, monkeypatch):
    """(backend, device, seen): a one-rank group; `seen` gets (collective, device type) of each
    tensor that reaches torch.distributed."""
    for var in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_STEP_ID", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    backend = request.param
    device = "cuda" if backend == "nccl" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    seen = []

    def spy(name, real):
        def call(*args, **kwargs):
            for t in args[:2]:
                for x in (t if isinstance(t, list) else [t]):
                    if torch.is_tensor(x):
                        seen.append((name, x.device.type))
            return real(*args, **kwargs)
        return call

    for name in COLLECTIVES:
        monkeypatch.setattr(dist, name, spy(name, getattr(dist, name)))
    preemption.reset()
    yield backend, device, seen
    preemption.reset()
    dist.destroy_process_group()


def test_a_deepclusterv2_epoch_ends_under_the_group(group, image_folder, tmp_path):
    backend, device, seen = group
    argv = tiny_swav_argv(image_folder, str(tmp_path / "dc"), [
        "--nmb_prototypes", "6", "5", "--epochs", "1", "--device", device])
    stats = dc.main(dc.get_args_parser().parse_args(argv))
    assert len(stats.stats) == 1  # the epoch's row: clustering, training, monitor, checkpoint
    assert {name for name, _ in seen} == set(COLLECTIVES)
    assert {dev for _, dev in seen} == {device}  # nothing on another device reached the backend
    saved = safe_load(str(tmp_path / "dc" / "checkpoint.pth.tar"))
    assert saved["memory_bank"]["embeddings"].shape[0] == 1  # rank 0's bank, gathered


def test_knn_merge_under_the_group(group):
    backend, device, seen = group
    g = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(30, 8, generator=g), torch.randint(0, 3, (30,), generator=g)
    queries = torch.randn(7, 8, generator=g)
    on_device = knn_classify(bank.to(device), labels.to(device), queries, 3, k=5)
    assert on_device.device.type == "cpu"  # on the queries' device
    torch.testing.assert_close(on_device, knn_classify(bank, labels, queries, 3, k=5),
                               rtol=1e-5, atol=1e-6)
    # the merge of one rank's top-k is that top-k
    values = torch.randn(7, 5, generator=g).sort(dim=1, descending=True)[0].to(device)
    top_labels = torch.randint(0, 3, (7, 5), generator=g).to(device)
    merged_values, merged_labels = merge_topk(values, top_labels, 5)
    assert torch.equal(merged_values, values) and torch.equal(merged_labels, top_labels)
    assert ("all_gather", device) in seen and {dev for _, dev in seen} == {device}

"""Elastic resume: a run continues on another number of processes. The per-rank state (SwAV's
queue, DeepCluster-v2's memory bank) is re-sharded so that the global state keeps its rows and
their order; the sampler and the schedule continue from the global position; a change of the
global batch is refused unless --allow_batch_change; flags that differ from the checkpoint's are
logged one line each. Runs of 2 gloo ranks are forked processes calling main() (no interpreter
start-up): 24 images, global batch 8 (2 x 4 or 1 x 8), 3 iterations per epoch."""
import logging
import multiprocessing
import os
import shutil
import signal

import pandas as pd
import pytest
import torch

import main_deepclusterv2
import main_simsiam
import main_swav
from conftest import entry_args, free_port, tiny_swav_argv
from src import distributed as du
from src import preemption
from src.checkpoint import (CheckpointError, check_resume_flags, map_start_iter, merge_shards,
                            reshard, safe_load, split_shards)

ENV = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_STEP_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK",
       "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for var in ENV:
        monkeypatch.delenv(var, raising=False)
    preemption.reset()
    yield
    preemption.reset()


# ----------------------------------------------------------------------------- re-sharding
def _shards(world, rows, crops=2, dim=3):
    """Per-rank [crops, rows, dim] tensors whose values name (rank, row)."""
    return [(100 * r + torch.arange(rows, dtype=torch.float32)).view(1, rows, 1)
            .expand(crops, rows, dim).clone() for r in range(world)]


def test_merge_is_global_batch_blocks_in_rank_order():
    q0, q1 = _shards(2, 4)
    # batch 2: rank 0's newest batch, rank 1's newest batch, then the older ones
    assert merge_shards([q0, q1], 2, dim=1)[0, :, 0].tolist() == [0, 1, 100, 101, 2, 3, 102, 103]


@pytest.mark.parametrize("old,new", [((2, 4), (1, 8)), ((1, 8), (2, 4)), ((2, 4), (4, 2)),
                                     ((4, 2), (2, 4)), ((2, 4), (4, 1))])
def test_reshard_keeps_the_global_queue(old, new):
    (old_world, old_batch), (world, batch) = old, new
    shards = _shards(old_world, 16 // old_world)
    out = reshard(shards, old_batch, world, batch, dim=1)
    assert len(out) == world and all(s.shape == (2, 16 // world, 3) for s in out)
    torch.testing.assert_close(merge_shards(out, batch, dim=1), merge_shards(shards, old_batch, 1))
    if world * batch == old_world * old_batch:  # the same global batch: each batch of rows
        # keeps its age, so the FIFO evicts the same rows in the same order
        for block in range(16 // (world * batch)):
            old_rows = torch.cat([s[:, block * old_batch:(block + 1) * old_batch] for s in shards], 1)
            new_rows = torch.cat([s[:, block * batch:(block + 1) * batch] for s in out], 1)
            torch.testing.assert_close(new_rows, old_rows)
    assert torch.equal(split_shards(merge_shards(out, batch, 1), world, batch, 1)[0], out[0])


def test_reshard_refuses_a_length_that_is_not_whole_global_batches():
    with pytest.raises(CheckpointError, match=r"^the queue: 16 rows are not a multiple of the "
                                              r"global batch 12 \(--batch_size 4 x 3 processes\)"):
        reshard(_shards(2, 8), 4, 3, 4, dim=1, what="the queue")
    with pytest.raises(CheckpointError, match="not whole batches of 3 rows"):
        merge_shards(_shards(2, 8), 3, dim=1)


def test_reshard_to_another_length_keeps_the_first_rows():
    shards = _shards(2, 8)
    merged = merge_shards(shards, 4, dim=1)
    shorter = reshard(shards, 4, 1, 8, dim=1, rows=8)[0]
    torch.testing.assert_close(shorter, merged[:, :8])
    longer = reshard(shards, 4, 1, 8, dim=1, rows=24)[0]  # the queue: empty rows at the end
    torch.testing.assert_close(longer[:, :16], merged)
    assert not longer[:, 16:].any()
    repeated = reshard(shards, 4, 1, 8, dim=1, rows=24, pad="repeat")[0]  # the memory bank
    torch.testing.assert_close(repeated, torch.cat([merged, merged[:, :8]], 1))


# ----------------------------------------------------------------------------- flags
def _args(**kw):
    return entry_args("main_swav", **{"rank": 0, "world_size": 1, "device": "cpu", **kw})


def _saved(args, **kw):
    saved = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list))}
    saved.update(kw)
    return saved


def test_flag_differences_are_logged_and_a_global_batch_change_refused(caplog):
    args = _args(batch_size=16, base_lr=0.6)
    saved = _saved(args, batch_size=8, world_size=2, base_lr=4.8, rank=1)
    with caplog.at_level(logging.INFO):
        assert check_resume_flags(saved, args, "ckp") == 16  # 8 x 2 = 16 x 1: resumes
    lines = [r.getMessage() for r in caplog.records]
    assert "resuming with --base_lr 4.8 -> 0.6 (the checkpoint's run had the first)" in lines
    assert "resuming with --batch_size 8 -> 16 (the checkpoint's run had the first)" in lines
    assert not any("--rank" in line for line in lines)  # not a flag of the run
    assert any(line.startswith("resuming on 1 process, the checkpoint's run had 2") for line
               in lines)

    args.batch_size = 8
    with pytest.raises(CheckpointError) as refused:
        check_resume_flags(saved, args, "ckp")
    message = str(refused.value)
    assert message == ("ckp: the global batch would change from 16 (--batch_size 8 x 2 processes) "
                       "to 8 (--batch_size 8 x 1 process): resume with --batch_size 16 on 1 process, "
                       "or pass --allow_batch_change true (the schedule is then mapped by epochs "
                       "done)")
    args.allow_batch_change = True
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert check_resume_flags(saved, args, "ckp") == 16
    assert any("--allow_batch_change: global batch 16 -> 8" in r.getMessage()
               for r in caplog.records)
    assert check_resume_flags(None, args, "ckp") is None  # the original's: nothing recorded


def test_mid_epoch_position_follows_the_samples_seen():
    assert map_start_iter(2, 16, 16, 0) == 2  # same global batch: same iteration
    assert map_start_iter(3, 16, 8, 0) == 6   # 48 samples seen = 6 batches of 8
    assert map_start_iter(3, 16, 32, 0) == 1  # 48 = 1 batch of 32 + 16 seen again
    assert map_start_iter(0, 16, 32, 0) == 0


# ----------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def warm():
    """Compile the augmentation kernels once here: every forked run inherits them."""
    from src import fastaugment
    fastaugment.warm_up()


def _rank(module, argv, rank, world, port, stop_step, out):
    """One process of a run: main(argv) as rank `rank` of `world` (env:// rendezvous); records
    the per-rank state that train() starts from; SIGUSR1 during step `stop_step` on rank 0."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if world == 1:
        for k in ("RANK", "WORLD_SIZE"):
            os.environ.pop(k)
    preemption.reset()
    first, steps = {}, {"n": 0}
    train = module.train
    loss_name, state_args = {main_swav: ("swav_loss", slice(5, 6)),
                             main_deepclusterv2: ("deepcluster_loss", slice(5, 7)),
                             main_simsiam: ("simsiam_loss", slice(0, 0))}[module]
    loss_fn = getattr(module, loss_name)

    def recording_train(*a, **kw):
        if not first:  # the queue (SwAV) or memory bank (DC-v2) as re-sharded at resume
            # numpy: a tensor would cross the queue as shared memory that dies with this process
            first["state"] = [t.detach().cpu().numpy().copy() if t is not None else None
                              for t in a[state_args]]
        return train(*a, **kw)

    def signalling_loss(*a, **kw):
        if rank == 0 and steps["n"] == stop_step:
            os.kill(os.getpid(), signal.SIGUSR1)
        steps["n"] += 1
        return loss_fn(*a, **kw)

    module.train, code = recording_train, 0
    setattr(module, loss_name, signalling_loss)
    try:
        module.main(module.get_args_parser().parse_args(argv))
    except SystemExit as e:
        code = e.code
    except Exception as e:  # noqa: BLE001 (reported to the test)
        code = f"{type(e).__name__}: {e}"
    finally:
        du.destroy()
    out.put((rank, code, first.get("state")))


def _run(module, argv, world, stop_step=-1):
    """{rank: (exit code, state train() started from)} of a run on `world` processes."""
    ctx = multiprocessing.get_context("fork")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(module, argv, r, world, port, stop_step, out))
             for r in range(world)]
    for p in procs:
        p.start()
    results = {r: (code, state and [torch.from_numpy(t) if t is not None else None for t in state])
               for r, code, state in [out.get(timeout=120) for _ in procs]}
    for p in procs:
        p.join(timeout=30)
    return results


def _load(dump):
    return safe_load(os.path.join(dump, "checkpoint.pth.tar"))


def _stats(dump, rank=0):
    return pd.read_pickle(os.path.join(dump, f"stats{rank}.pkl"))


SWAV = ["--queue_length", "16", "--epoch_queue_starts", "0", "--freeze_prototypes_niters", "2"]


def test_swav_2_to_1_to_2_processes_with_a_queue(image_folder, tmp_path, warm):
    dump = str(tmp_path / "swav")
    argv = lambda epochs, bs, *extra: tiny_swav_argv(  # noqa: E731
        image_folder, dump, [*SWAV, "--epochs", str(epochs), "--batch_size", str(bs), *extra])

    # 2 processes, epoch 0: each rank's queue (2 batches of 4) fills
    assert {r: c for r, (c, _) in _run(main_swav, argv(1, 4), 2).items()} == {0: 0, 1: 0}
    two = _load(dump)["queue"]
    assert two.shape == (2, 2, 8, 16) and two.abs().sum(-1).gt(0).all()

    # a global batch change is refused in one line, or mapped by epochs with the flag
    other = str(tmp_path / "batch_change")
    shutil.copytree(dump, other)
    refused = _run(main_swav, tiny_swav_argv(image_folder, other, [*SWAV, "--epochs", "2",
                                                                     "--batch_size", "4"]), 1)
    assert refused[0][0].startswith("CheckpointError: ")
    assert ("global batch would change from 8 (--batch_size 4 x 2 processes) to 4 (--batch_size "
            "4 x 1 process)") in refused[0][0]
    allowed = _run(main_swav, tiny_swav_argv(image_folder, other, [
        *SWAV, "--epochs", "2", "--batch_size", "4", "--allow_batch_change", "true",
        "--base_lr", "1.2"]), 1, stop_step=0)  # one step is enough: stop, mid-epoch checkpoint
    assert allowed[0][0] == preemption.REQUEUE_EXIT_CODE
    assert _load(other)["epoch"] == 1 and _load(other)["start_iter"] == 1  # 6 batches of 4 now
    log = open(os.path.join(other, "train.log")).read()
    assert "--allow_batch_change: global batch 8 -> 4" in log
    assert "resuming with --base_lr 4.8 -> 1.2 (the checkpoint's run had the first)" in log
    # the queue keeps its 16 rows, now 4 batches of 4 (the newest 8 rows: rank 0's newest
    # batch, then rank 1's)
    assert torch.equal(allowed[0][1][0], merge_shards(list(two), 4, dim=1))

    # 1 process (batch 8: the same global batch) from the epoch boundary, stopped mid-epoch 1
    one = _run(main_swav, argv(2, 8), 1, stop_step=1)
    assert one[0][0] == preemption.REQUEUE_EXIT_CODE
    # the single process starts from the concatenated queues: global batch after global batch
    expected = torch.cat([two[0][:, :4], two[1][:, :4], two[0][:, 4:], two[1][:, 4:]], dim=1)
    assert torch.equal(one[0][1][0], expected)
    mid = _load(dump)
    assert mid["epoch"] == 1 and mid["start_iter"] == 2 and mid["queue"].shape == (1, 2, 16, 16)
    assert mid["queue"][0].abs().sum(-1).gt(0).all()  # all 16 rows filled
    log = open(os.path.join(dump, "train.log")).read()
    assert "resuming with --batch_size 4 -> 8 (the checkpoint's run had the first)" in log
    assert "resuming with --epochs 1 -> 2 (the checkpoint's run had the first)" in log

    # 2 processes again, from the mid-epoch checkpoint: epoch 1 at iteration 2, then epoch 2
    again = _run(main_swav, argv(3, 4), 2)
    assert {r: c for r, (c, _) in again.items()} == {0: 0, 1: 0}
    assert torch.equal(merge_shards([again[0][1][0], again[1][1][0]], 4, dim=1), mid["queue"][0])
    final = _load(dump)
    assert final["epoch"] == 3 and "start_iter" not in final
    assert "resuming epoch 1 at iteration 2" in open(os.path.join(dump, "train.log")).read()
    stats = _stats(dump)
    assert list(stats["epoch"]) == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(list(stats["loss"]), dtype=torch.float64)))
    assert list(_stats(dump, 1)["epoch"]) == [0, 1, 2]  # rank 1: epoch 1's row from its 2nd half


DC = ["--nmb_prototypes", "6", "5", "4"]


def test_deepclusterv2_2_to_1_to_2_processes_with_its_memory_bank(image_folder, tmp_path, warm):
    dump = str(tmp_path / "dc")
    argv = lambda epochs, bs: tiny_swav_argv(  # noqa: E731
        image_folder, dump, [*DC, "--epochs", str(epochs), "--batch_size", str(bs),
                             "--log_freq", "1"])  # distributed stop checks at log iterations

    # 2 processes, stopped in epoch 0 after iteration 1 (mid-epoch checkpoint)
    two = _run(main_deepclusterv2, argv(1, 4), 2, stop_step=1)
    assert {r: c for r, (c, _) in two.items()} == {0: 75, 1: 75}
    mid = _load(dump)
    assert mid["epoch"] == 0 and mid["start_iter"] == 2
    banks = mid["memory_bank"]
    assert banks["embeddings"].shape == (2, 2, 12, 16)

    # 1 process resumes epoch 0 at iteration 2 with the concatenated memory banks
    one = _run(main_deepclusterv2, argv(2, 8), 1)
    assert one[0][0] == 0
    index, embeddings = one[0][1]
    assert torch.equal(index, merge_shards(list(banks["index"]), 4))
    assert torch.equal(embeddings, merge_shards(list(banks["embeddings"]), 4, dim=1))
    assert sorted(index.tolist()) == sorted(banks["index"].flatten().tolist())
    after = _load(dump)
    assert after["epoch"] == 2 and after["memory_bank"]["index"].shape == (1, 24)
    assert sorted(after["memory_bank"]["index"][0].tolist()) == list(range(24))  # covers the data

    # 2 processes from the epoch boundary: each rank gets half of every global batch's rows
    again = _run(main_deepclusterv2, argv(3, 4), 2)
    assert {r: c for r, (c, _) in again.items()} == {0: 0, 1: 0}
    assert torch.equal(merge_shards([again[0][1][0], again[1][1][0]], 4),
                       after["memory_bank"]["index"][0])
    assert torch.equal(merge_shards([again[0][1][1], again[1][1][1]], 4, dim=1),
                       after["memory_bank"]["embeddings"][0])
    final = _load(dump)
    assert final["epoch"] == 3
    stats = _stats(dump)
    assert list(stats["epoch"]) == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(list(stats["loss"]), dtype=torch.float64)))
    log = open(os.path.join(dump, "train.log")).read()
    assert "resuming epoch 0 at iteration 2" in log and "Start initializing" in log
    assert log.count("Start initializing the memory banks") == 1  # never filled again


def test_simsiam_resumes_on_another_number_of_processes(image_folder, tmp_path, warm):
    dump = str(tmp_path / "simsiam")
    argv = lambda epochs, bs: [  # noqa: E731
        "--data_path", image_folder, "--epochs", str(epochs), "--batch_size", str(bs),
        "--size_crop", "16", "--dim", "32", "--pred_dim", "8", "--workers", "0", "--use_fp16",
        "false", "--dump_path", dump, "--arch", "resnet18", "--width", "8", "--cifar_stem",
        "true", "--device", "cpu"]
    assert {r: c for r, (c, _) in _run(main_simsiam, argv(1, 4), 2).items()} == {0: 0, 1: 0}
    # 1 process, stopped mid-epoch 1, then 2 processes again from that iteration
    assert _run(main_simsiam, argv(2, 8), 1, stop_step=1)[0][0] == preemption.REQUEUE_EXIT_CODE
    assert _load(dump)["start_iter"] == 2
    assert {r: c for r, (c, _) in _run(main_simsiam, argv(2, 4), 2).items()} == {0: 0, 1: 0}
    assert _load(dump)["epoch"] == 2
    log = open(os.path.join(dump, "train.log")).read()
    assert "resuming on 1 process, the checkpoint's run had 2" in log
    assert "resuming on 2 processes, the checkpoint's run had 1" in log
    assert "resuming epoch 1 at iteration 2" in log
    for rank in (0, 1):
        stats = _stats(dump, rank)
        assert list(stats["epoch"]) == [0, 1]
        assert all(torch.isfinite(torch.tensor(list(stats["loss"]), dtype=torch.float64)))

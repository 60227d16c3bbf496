"""`make test-slurm`: the sbatch scripts on a real (local, one-node, CPU) Slurm.

1. scripts/local_slurm.sh up (installs slurm + munge with apt when missing; needs root);
   shellcheck on every script.
2. Two tiny 2-task CPU SwAV jobs through scripts/swav_200ep_bs256_pretrain.sh (sizes overridden
   by flags after the script name), submitted together:
   A runs uninterrupted; B gets `scancel --signal=USR1` early in its second epoch, must write a
   mid-epoch checkpoint, requeue itself (restart 1), resume and finish.
3. Checks: A's outputs (2 ranks, checkpoints, stats, logs); B restarted once, stopped mid-epoch,
   no traceback, and ends with the same weights, optimizer state, queue and stats as A.
4. Brings the cluster down again if this run brought it up.
Prints one line per check and `slurm: N passed, M failed`; exit status 1 on any failure.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

SCRIPT = "scripts/swav_200ep_bs256_pretrain.sh"
LOCAL = os.path.join(ROOT, "scripts", "local_slurm.sh")
SLURM_DIR = os.environ.get("LOCAL_SLURM_DIR", "/tmp/swav-local-slurm")
# the row's resources cut down to one CPU node; Slurm takes the command line over #SBATCH lines
SBATCH = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
          "--mem=0", "--time=15"]
# tiny SwAV: 192 images, 2 ranks x batch 2 -> 48 iterations per epoch, so a signal sent when
# epoch 1 starts lands mid-epoch; a queue (full from epoch 0) makes the resume state non-trivial
FLAGS = ["--device", "cpu", "--epochs", "2", "--batch_size", "2", "--nmb_crops", "2", "2",
         "--size_crops", "32", "16", "--min_scale_crops", "0.3", "0.1", "--max_scale_crops", "1",
         "0.3", "--nmb_prototypes", "20", "--feat_dim", "16", "--hidden_mlp", "64", "--workers",
         "0", "--use_fp16", "false", "--checkpoint_freq", "1", "--arch", "resnet18", "--width",
         "8", "--cifar_stem", "true", "--queue_length", "16", "--epoch_queue_starts", "0",
         "--freeze_prototypes_niters", "2",
         # the ranks agree on a stop at the log iterations (steps this fast give no others)
         "--log_freq", "8"]
NITER = 48
TIMEOUT = 600

results = []
submitted = []


def check(name, ok, detail=""):
    results.append(bool(ok))
    print(f"{'PASS' if ok else 'FAIL'}: {name}" + (f" ({detail})" if detail and not ok else ""),
          flush=True)
    return ok


def sh(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def die(msg):
    print("\n" + "!" * 78 + f"\ntest-slurm CANNOT RUN: {msg}\n" + "!" * 78, file=sys.stderr)
    sys.exit(1)


def job_field(job, field):
    out = sh(["scontrol", "show", "job", job]).stdout
    m = re.search(rf"\b{field}=(\S+)", out)
    return m.group(1) if m else None


def submit(exp, env):
    os.makedirs(exp, exist_ok=True)
    r = sh(["sbatch", "--parsable", *SBATCH, f"--output={exp}/slurm-%j.out", SCRIPT, *FLAGS],
           cwd=ROOT, env={**env, "EXPERIMENT_PATH": exp})
    if r.returncode != 0:
        die(f"sbatch failed: {r.stderr.strip()}")
    submitted.append(r.stdout.strip().split(";")[0])
    return submitted[-1]


def wait_done(job, deadline):
    state = None
    while time.time() < deadline:
        state = job_field(job, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    return f"still {state} after {TIMEOUT} s"


def read(path):
    return open(path).read() if os.path.isfile(path) else ""


def show_logs(exp, job):
    for name in (f"slurm-{job}.out", f"{job}.err", "train.log"):
        text = read(os.path.join(exp, name))
        print(f"----- {exp}/{name} (last 30 lines)\n" + "\n".join(text.splitlines()[-30:]))


def main():
    t0 = time.time()
    if os.geteuid() != 0:
        die("it needs root (apt-get for slurm/munge, SlurmUser=root); run as root, e.g. in CI")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        die("slurm is not installed and there is no apt-get to install it (Debian/Ubuntu only)")
    os.environ["SLURM_CONF"] = os.path.join(SLURM_DIR, "slurm.conf")  # sbatch, scontrol, ...
    was_up = sh([LOCAL, "status"]).returncode == 0
    r = subprocess.run([LOCAL, "up"])
    if r.returncode != 0:
        die("scripts/local_slurm.sh up failed (messages above)")
    print(f"local Slurm up in {time.time() - t0:.0f} s", flush=True)
    try:
        run_checks()
    finally:
        if submitted:  # a failed check leaves nothing running behind it
            sh(["scancel", *submitted])
        if not was_up:
            subprocess.run([LOCAL, "down"])
    failed = results.count(False)
    print(f"test-slurm took {time.time() - t0:.0f} s")
    print(f"slurm: {results.count(True)} passed, {failed} failed")
    return 1 if failed else 0


def run_checks():
    import torch
    import pandas as pd
    from conftest import make_image_folder

    if shutil.which("shellcheck") is None and shutil.which("apt-get"):
        sh(["apt-get", "update", "-qq"])
        sh(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "shellcheck"],
           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    scripts = sorted(os.path.join("scripts", f) for f in os.listdir(os.path.join(ROOT, "scripts"))
                     if f.endswith(".sh"))
    r = sh(["shellcheck", *scripts], cwd=ROOT) if shutil.which("shellcheck") else None
    check(f"shellcheck on {len(scripts)} scripts", r is not None and r.returncode == 0,
          "shellcheck missing" if r is None else r.stdout[-2000:])

    tmp = tempfile.mkdtemp(prefix="swav-test-slurm-")
    data = make_image_folder(os.path.join(tmp, "data"), classes=3, per_class=64, size=32)
    env = {**os.environ, "DATASET_PATH": data, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    exp_a, exp_b = os.path.join(tmp, "uninterrupted"), os.path.join(tmp, "preempted")
    job_a, job_b = submit(exp_a, env), submit(exp_b, env)
    print(f"submitted {SCRIPT}: job {job_a} (uninterrupted), job {job_b} (to be preempted)",
          flush=True)

    # signal B as soon as rank 0 logs the first iteration of epoch 1: 47 iterations remain
    deadline = time.time() + TIMEOUT
    log_b = os.path.join(exp_b, "train.log")
    while "Epoch: [1][0]" not in read(log_b):
        if time.time() > deadline or job_field(job_b, "JobState") not in ("PENDING", "RUNNING"):
            show_logs(exp_b, job_b)
            die(f"job {job_b} never reached epoch 1")
        time.sleep(0.1)
    r = sh(["scancel", "--signal=USR1", job_b], env=env)
    check(f"scancel --signal=USR1 {job_b}", r.returncode == 0, r.stderr)

    state_a, state_b = wait_done(job_a, deadline), wait_done(job_b, deadline)
    ok_a = check(f"job {job_a} COMPLETED", state_a == "COMPLETED", state_a)
    ok_b = check(f"job {job_b} COMPLETED after its requeue", state_b == "COMPLETED", state_b)
    if not (ok_a and ok_b):
        show_logs(exp_a, job_a)
        show_logs(exp_b, job_b)
        return

    # ---- A: an ordinary 2-task run
    ckp_a = torch.load(os.path.join(exp_a, "checkpoint.pth.tar"), weights_only=True)
    check("A: final checkpoint at epoch 2, every rank's queue in it",
          ckp_a["epoch"] == 2 and tuple(ckp_a["queue"].shape) == (2, 2, 8, 16),
          f"epoch {ckp_a['epoch']}, queue {tuple(ckp_a['queue'].shape)}")
    files = ["checkpoints/ckp-0.pth", "checkpoints/ckp-1.pth", "stats0.pkl", "stats1.pkl",
             "train.log", "train.log-1", "params.pkl", f"{job_a}.out", f"{job_a}.err"]
    missing = [f for f in files if not os.path.isfile(os.path.join(exp_a, f))]
    check("A: checkpoints, stats, logs of both ranks", not missing, f"missing {missing}")
    log_a = read(os.path.join(exp_a, "train.log"))
    check("A: world size 2 through srun", re.search(r"world_size: 2\b", log_a), "")
    err_a = read(os.path.join(exp_a, f"{job_a}.err"))
    check("A: srun --label output of ranks 0 and 1, no traceback",
          "0: " in err_a and "1: " in err_a and "Traceback" not in err_a, err_a[-1500:])
    out_a = read(os.path.join(exp_a, f"slurm-{job_a}.out"))
    check("A: batch script found the master with scontrol and exited 0",
          re.search(r"rendezvous \S+:\d+", out_a) and "srun exited with status 0" in out_a,
          out_a[-800:])

    # ---- B: stopped mid-epoch, requeued, resumed
    check(f"B: Slurm restarted job {job_b} once", job_field(job_b, "Restarts") == "1",
          f"Restarts={job_field(job_b, 'Restarts')}")
    out_b = read(os.path.join(exp_b, f"slurm-{job_b}.out"))
    check("B: the requeued run has SLURM_RESTART_COUNT=1 (batch log appended, not overwritten)",
          "(restart 0)" in out_b and "(restart 1)" in out_b, out_b[-800:])
    log_b = read(log_b)
    m = re.search(r"mid-epoch checkpoint: epoch 1 resumes at iteration (\d+)", log_b)
    stop_iter = int(m.group(1)) if m else -1
    check("B: stopped mid-epoch (epoch 1) and checkpointed that iteration",
          0 < stop_iter < NITER, f"iteration {stop_iter}")
    check("B: rank 0 requeued the job itself (scontrol requeue)",
          f"requeued Slurm job {job_b} (restart 1)" in log_b, log_b[-1500:])
    log_b1 = read(os.path.join(exp_b, "train.log-1"))
    check("B: both ranks got the signal or agreed to stop",
          "stop requested" in log_b and "stop requested" in log_b1)
    check("B: both ranks of the stopped run left cleanly (status 0) after the requeue",
          "exiting with status 0" in log_b and "exiting with status 0" in log_b1)
    resumed = re.findall(r"Starting epoch (\d+)", log_b)
    check("B: the requeued run resumed in epoch 1 (did not restart epoch 0)",
          resumed == ["0", "1", "1"], f"epochs started: {resumed}")
    err_b = read(os.path.join(exp_b, f"{job_b}.err"))
    check("B: no traceback from either run", "Traceback" not in err_b, err_b[-2000:])

    ckp_b = torch.load(os.path.join(exp_b, "checkpoint.pth.tar"), weights_only=True)
    same_w = all(torch.equal(ckp_a["state_dict"][k], ckp_b["state_dict"][k])
                 for k in ckp_a["state_dict"])
    check("B: final weights identical to the uninterrupted run (every tensor)",
          ckp_b["epoch"] == 2 and same_w and ckp_a["state_dict"].keys() == ckp_b["state_dict"].keys())
    mom_a = [s["momentum_buffer"] for s in ckp_a["optimizer"]["state"].values()]
    mom_b = [s["momentum_buffer"] for s in ckp_b["optimizer"]["state"].values()]
    check("B: optimizer momentum and queue identical",
          all(torch.equal(a, b) for a, b in zip(mom_a, mom_b)) and len(mom_a) == len(mom_b)
          and torch.equal(ckp_a["queue"], ckp_b["queue"]))
    for rank in (0, 1):
        sa = pd.read_pickle(os.path.join(exp_a, f"stats{rank}.pkl"))
        sb = pd.read_pickle(os.path.join(exp_b, f"stats{rank}.pkl"))
        check(f"B: stats{rank}.pkl has the same 2 rows (no partial-epoch row)",
              sa.equals(sb) and len(sb) == 2, f"\n{sa}\n{sb}")
    if os.environ.get("TEST_SLURM_KEEP"):
        print(f"outputs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

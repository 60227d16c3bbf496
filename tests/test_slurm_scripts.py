"""The sbatch scripts in scripts/: syntax (bash -n, shellcheck), one script per model-zoo row with
the original's resources and hyper-parameters (SPEC §8), flags the entry points accept, and the
shared helper's behaviour (srun line, rendezvous, overrides, bad input) under a fake Slurm
environment. The real Slurm run is `make test-slurm` (tests/slurm/run_test_slurm.py)."""
import os
import re
import shlex
import shutil
import stat
import subprocess

import pytest

import main_deepclusterv2
import main_swav
from conftest import ROOT

SCRIPTS = os.path.join(ROOT, "scripts")

MC6 = {"nmb_crops": [2, 6], "size_crops": [224, 96], "min_scale_crops": [0.14, 0.05],
       "max_scale_crops": [1.0, 0.14]}
MC2 = {"nmb_crops": [2], "size_crops": [224], "min_scale_crops": [0.08], "max_scale_crops": [1.0]}
SWAV = {"temperature": 0.1, "epsilon": 0.05, "sinkhorn_iterations": 3, "feat_dim": 128,
        "nmb_prototypes": 3000, "wd": 1e-6, "crops_for_assign": [0, 1], "use_fp16": True,
        "blur": "opencv"}  # the published runs' blur (the original's --use_pil_blur false)
BS4096 = {"batch_size": 64, "base_lr": 4.8, "final_lr": 0.0048, "warmup_epochs": 10,
          "start_warmup": 0.3, "freeze_prototypes_niters": 313, "queue_length": 0,
          "arch": "resnet50", "sync_bn": "apex", "hidden_mlp": 2048}
BS256 = {"batch_size": 64, "base_lr": 0.6, "final_lr": 0.0006, "warmup_epochs": 0,
         "freeze_prototypes_niters": 5005, "queue_length": 3840, "epoch_queue_starts": 15,
         "arch": "resnet50", "sync_bn": "pytorch"}
DCV2 = {"temperature": 0.1, "feat_dim": 128, "nmb_prototypes": [3000, 3000, 3000], "wd": 1e-6,
        "crops_for_assign": [0, 1], "blur": "opencv", "batch_size": 64, "base_lr": 4.8,
        "final_lr": 0.0048,
        "warmup_epochs": 10, "start_warmup": 0.3, "freeze_prototypes_niters": 300000,
        "arch": "resnet50", "sync_bn": "apex", "use_fp16": False}

# script: (entry point, nodes, tasks (= GPUs) per node, cpus per task, time, global batch, flags)
ROWS = {
    "swav_100ep_pretrain": ("main_swav.py", 8, 8, 8, "7:00:00", 4096,
                            {**MC6, **SWAV, **BS4096, "epochs": 100}),
    "swav_200ep_pretrain": ("main_swav.py", 8, 8, 8, "13:00:00", 4096,
                            {**MC6, **SWAV, **BS4096, "epochs": 200}),
    "swav_400ep_pretrain": ("main_swav.py", 8, 8, 8, "25:00:00", 4096,
                            {**MC6, **SWAV, **BS4096, "epochs": 400}),
    "swav_800ep_pretrain": ("main_swav.py", 8, 8, 8, "50:00:00", 4096,
                            {**MC6, **SWAV, **BS4096, "epochs": 800}),
    "swav_200ep_bs256_pretrain": ("main_swav.py", 1, 4, 4, "72:00:00", 256,
                                  {**MC6, **SWAV, **BS256, "epochs": 200}),
    "swav_400ep_bs256_pretrain": ("main_swav.py", 1, 4, 4, "72:00:00", 256,
                                  {**MC6, **SWAV, **BS256, "epochs": 400}),
    "swav_400ep_2x224_pretrain": ("main_swav.py", 8, 8, 8, "25:00:00", 4096,
                                  {**MC2, **SWAV, **BS4096, "epochs": 400}),
    "swav_RN50w2_400ep_pretrain": ("main_swav.py", 16, 8, 10, "72:00:00", 4096, {
        **SWAV, **BS4096, "nmb_crops": [2, 4], "size_crops": [224, 96],
        "min_scale_crops": [0.14, 0.05], "max_scale_crops": [1.0, 0.14],
        "batch_size": 32, "epochs": 400, "arch": "resnet50w2", "hidden_mlp": 8192}),
    "swav_RN50w4_400ep_pretrain": ("main_swav.py", 8, 8, 10, "72:00:00", 2560, {
        **SWAV, **BS4096, "nmb_crops": [2, 4], "size_crops": [224, 96],
        "min_scale_crops": [0.08, 0.08], "max_scale_crops": [1.0, 0.14],
        "batch_size": 40, "epochs": 400, "arch": "resnet50w4", "hidden_mlp": 8192,
        "queue_length": 2560, "epoch_queue_starts": 0}),
    "swav_RN50w5_400ep_pretrain": ("main_swav.py", 16, 8, 10, "72:00:00", 1536, {
        **SWAV, **BS4096, "nmb_crops": [2, 4], "size_crops": [224, 96],
        "min_scale_crops": [0.14, 0.05], "max_scale_crops": [1.0, 0.14],
        "batch_size": 12, "epochs": 400, "arch": "resnet50w5", "hidden_mlp": 10240,
        "queue_length": 1536, "epoch_queue_starts": 0, "final_lr": 0.0, "start_warmup": 0.1875}),
    "deepclusterv2_800ep_pretrain": ("main_deepclusterv2.py", 8, 8, 8, "40:00:00", 4096,
                                     {**MC6, **DCV2, "epochs": 800}),
    "deepclusterv2_400ep_pretrain": ("main_deepclusterv2.py", 8, 8, 8, "25:00:00", 4096, {
        **DCV2, "nmb_crops": [2, 4], "size_crops": [160, 96], "min_scale_crops": [0.08, 0.05],
        "max_scale_crops": [1.0, 0.14], "epochs": 400}),
    "deepclusterv2_400ep_2x224_pretrain": ("main_deepclusterv2.py", 8, 8, 8, "25:00:00", 4096,
                                           {**MC2, **DCV2, "epochs": 400}),
}
PARSERS = {"main_swav.py": main_swav.get_args_parser,
           "main_deepclusterv2.py": main_deepclusterv2.get_args_parser}


def all_shell_scripts():
    return sorted(f for f in os.listdir(SCRIPTS) if f.endswith(".sh"))


def parse_script(name):
    """(#SBATCH options, entry point, row flags) of scripts/{name}.sh."""
    text = open(os.path.join(SCRIPTS, name + ".sh")).read()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    m = re.search(r"^swav_launch (\S+) \\\n(.*?)\"\$@\"", text, re.M | re.S)
    assert m, f"{name}: no swav_launch call"
    return text, sbatch, m.group(1), shlex.split(m.group(2).replace("\\\n", " "))


def test_one_script_per_zoo_row():
    sbatch_scripts = {f[:-3] for f in all_shell_scripts()
                      if "\n#SBATCH " in open(os.path.join(SCRIPTS, f)).read()}
    assert sbatch_scripts == set(ROWS)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_resources_and_hyper_parameters_match_the_zoo_table(name):
    entry, nodes, tasks, cpus, time, global_batch, expected = ROWS[name]
    text, sbatch, got_entry, flags = parse_script(name)
    assert text.startswith("#!/bin/bash\n")  # shebang on line one (the original had it on 8)
    assert got_entry == entry
    assert int(sbatch["nodes"]) == nodes and int(sbatch["ntasks-per-node"]) == tasks
    assert int(sbatch["gpus-per-node"]) == tasks  # one GPU per task
    assert int(sbatch["cpus-per-task"]) == cpus and sbatch["time"] == time
    assert sbatch["job-name"] == name
    # preemption and time limits: signal, requeue, logs appended across restarts
    assert re.fullmatch(r"USR1@\d+", sbatch["signal"]) and "requeue" in sbatch
    assert sbatch["open-mode"] == "append"
    assert "master_node" not in text and "SLURM_NODELIST:" not in text  # no host-name slicing

    args = PARSERS[entry]().parse_args(flags)  # every flag exists in the entry point
    for key, value in expected.items():
        assert getattr(args, key) == pytest.approx(value) if isinstance(value, float) \
            else getattr(args, key) == value, (name, key, getattr(args, key), value)
    assert nodes * tasks * args.batch_size == global_batch


@pytest.mark.parametrize("script", all_shell_scripts())
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", os.path.join(SCRIPTS, script)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not installed (apt-get install shellcheck; "
                           "make test-slurm installs and runs it)")
def test_shellcheck():
    scripts = [os.path.join("scripts", s) for s in all_shell_scripts()]
    r = subprocess.run(["shellcheck", *scripts], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


# ----------------------------------------------------------------------------- fake Slurm
def _fake_slurm_bin(tmp_path):
    """srun that records its command line and rendezvous; scontrol that expands a node list."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        'printf "%s\\n" "$@" > "$FAKE_OUT/argv"\n'
        'echo "$MASTER_ADDR:$MASTER_PORT" > "$FAKE_OUT/rendezvous"\n'
        "exit ${FAKE_SRUN_STATUS:-0}\n")
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\n"
        '[ -n "${FAKE_SCONTROL_FAIL:-}" ] && { echo "scontrol: error: no controller" >&2; exit 1; }\n'
        '[ "$1 $2" = "show hostnames" ] && printf "gpu-node-07\\ngpu-node-08\\n"\n')
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _run_script(tmp_path, name, *flags, **env):
    bin_dir = tmp_path / "bin" if (tmp_path / "bin").exists() else _fake_slurm_bin(tmp_path)
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    base = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_OUT": str(tmp_path),
            "SLURM_JOB_ID": "1234", "SLURM_SUBMIT_DIR": ROOT, "SLURM_JOB_NAME": name,
            "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_TASKS_PER_NODE": "4",
            "SLURM_NTASKS": "4", "SLURM_GPUS_ON_NODE": "4", "DATASET_PATH": str(data),
            "EXPERIMENT_PATH": str(tmp_path / "exp"), "PYTHON": "python3"}
    base.update({k: v for k, v in env.items() if v is not None})
    for k in [k for k, v in env.items() if v is None]:
        base.pop(k, None)
    return subprocess.run(["bash", os.path.join(SCRIPTS, name + ".sh"), *flags], cwd=str(tmp_path),
                          capture_output=True, text=True, env=base, timeout=60)


def test_srun_line_rendezvous_and_overrides(tmp_path):
    r = _run_script(tmp_path, "swav_200ep_bs256_pretrain", "--epochs", "2", "--nmb_crops", "2")
    assert r.returncode == 0, r.stderr
    argv = (tmp_path / "argv").read_text().split("\n")[:-1]
    py = argv.index("python3")
    assert "--label" in argv[:py] and "--kill-on-bad-exit=1" in argv[:py]
    assert f"--output={tmp_path}/exp/%j.out" in argv[:py] and "--open-mode=append" in argv[:py]
    assert argv[py + 1:py + 3] == ["-u", os.path.join(ROOT, "main_swav.py")]
    assert argv[py + 3:py + 7] == ["--data_path", str(tmp_path / "data"),
                                   "--dump_path", str(tmp_path / "exp")]
    assert argv[-4:] == ["--epochs", "2", "--nmb_crops", "2"]  # user flags last: they win
    args = main_swav.get_args_parser().parse_args(argv[py + 3:])
    assert args.epochs == 2 and args.nmb_crops == [2] and args.queue_length == 3840
    # master: the first host of the allocation; port from the job id
    # 10000 + job id % 20000: below the ephemeral ports (32768+) outgoing connections take
    assert (tmp_path / "rendezvous").read_text().strip() == "gpu-node-07:11234"
    assert "(restart 0)" in r.stdout and (tmp_path / "exp").is_dir()


@pytest.mark.parametrize("cpus,flags,workers", [("8", [], 7), ("1", [], 1),
                                                  ("8", ["--workers", "3"], 3), (None, [], 10)])
def test_loader_workers_fit_the_cpus_of_a_task(tmp_path, cpus, flags, workers):
    # the original asked for 10 workers (its default) on 8 CPUs per task
    r = _run_script(tmp_path, "swav_800ep_pretrain", *flags, SLURM_CPUS_PER_TASK=cpus)
    assert r.returncode == 0, r.stderr
    argv = (tmp_path / "argv").read_text().split("\n")[:-1]
    py = argv.index("python3")
    assert main_swav.get_args_parser().parse_args(argv[py + 3:]).workers == workers


def test_env_overrides_master_and_status_is_srun_status(tmp_path):
    r = _run_script(tmp_path, "swav_800ep_pretrain", MASTER_ADDR="10.0.0.9", MASTER_PORT="4242",
                    SLURM_TASKS_PER_NODE="8(x2)", SLURM_GPUS_ON_NODE="8", FAKE_SRUN_STATUS="3")
    assert r.returncode == 3 and "srun exited with status 3" in r.stdout
    assert (tmp_path / "rendezvous").read_text().strip() == "10.0.0.9:4242"


@pytest.mark.parametrize("env,flags,message", [
    ({"SLURM_JOB_ID": None}, [], "is a Slurm batch script: submit it with sbatch"),
    ({"DATASET_PATH": None}, [], "DATASET_PATH is not set"),
    ({"DATASET_PATH": "/no/such/folder"}, [], "is not a directory"),
    ({"SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_GPUS_ON_NODE": "4"}, [],
     "8 tasks on one node but only 4 GPU(s)"),
    ({"SLURM_GPUS_ON_NODE": "0"}, [], "no GPU on node"),
    ({"FAKE_SCONTROL_FAIL": "1"}, [], "cannot name the first node of the allocation"),
    ({"SLURM_SUBMIT_DIR": "/"}, [], "submit from the root of the checkout, or set SWAV_ROOT"),
])
def test_bad_input_one_clear_error(tmp_path, env, flags, message):
    r = _run_script(tmp_path, "swav_800ep_pretrain", *flags, **env)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr, r.stderr
    assert not (tmp_path / "argv").exists()  # nothing was launched


@pytest.mark.parametrize("flags", [["--device", "cpu"], ["--device=cpu"]])
def test_cpu_run_needs_no_gpu(tmp_path, flags):
    r = _run_script(tmp_path, "deepclusterv2_400ep_pretrain", *flags,
                    SLURM_GPUS_ON_NODE="0", SLURM_TASKS_PER_NODE="2")
    assert r.returncode == 0, r.stderr
    argv = (tmp_path / "argv").read_text().split("\n")
    assert os.path.join(ROOT, "main_deepclusterv2.py") in argv


def test_local_slurm_usage():
    r = subprocess.run([os.path.join(SCRIPTS, "local_slurm.sh"), "bogus"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "usage:" in r.stderr

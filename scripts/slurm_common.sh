# shellcheck shell=bash
# Sourced by every sbatch script in scripts/: checks, rendezvous and the srun line they share.
#
#   swav_launch ENTRY_POINT [flags of the model-zoo row...] [user flags...]
#
# Environment (sbatch exports the submitting shell's environment to the job):
#   DATASET_PATH     ImageFolder with the training images (required), e.g. /path/to/imagenet/train
#   EXPERIMENT_PATH  checkpoints, logs and stats (default ./experiments/$SLURM_JOB_NAME)
#   PYTHON           interpreter (default: python3 on the PATH)
#   MASTER_ADDR      rendezvous host (default: the first node of the allocation)
#   MASTER_PORT      rendezvous port (default: derived from the job id, so two jobs that share a
#                    node do not collide; the same after a requeue)
# Flags given after the script name (`sbatch scripts/x.sh --epochs 2`) come last on the command
# line of the entry point, so they override the row's flags.

swav_die() {
    echo "error: $*" >&2
    exit 2
}

swav_usage() {
    local script=${SWAV_SCRIPT:-scripts/<script>.sh}
    cat >&2 <<EOF
error: $script is a Slurm batch script: submit it with sbatch from the root of the checkout, e.g.
  DATASET_PATH=/path/to/imagenet/train sbatch $script [extra flags of the entry point]
To try it on this machine: scripts/local_slurm.sh up, then sbatch with a tiny configuration
(see docs/README_slurm.md). Without Slurm, run the entry point directly (python or torchrun).
EOF
    exit 2
}

# The most tasks Slurm puts on one node: SLURM_TASKS_PER_NODE looks like "8(x2),4".
swav_max_tasks_per_node() {
    local spec=${SLURM_TASKS_PER_NODE:-${SLURM_NTASKS:-1}}
    echo "$spec" | tr ',' '\n' | sed 's/(x[0-9]*)//' | sort -n | tail -n1
}

# GPUs Slurm gave this node (gres), else the GPUs nvidia-smi sees, else 0.
swav_gpus_on_node() {
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# One task per GPU: more tasks than GPUs on a node is an error before anything starts, unless
# the run is on the CPU (--device cpu among the flags).
swav_check_gpus() {
    local arg device=auto prev=
    for arg in "$@"; do
        if [ "$prev" = "--device" ]; then device=$arg; fi
        case $arg in --device=*) device=${arg#--device=} ;; esac
        prev=$arg
    done
    [ "$device" = cpu ] && return 0
    local tasks gpus
    tasks=$(swav_max_tasks_per_node)
    gpus=$(swav_gpus_on_node)
    if [ "$gpus" -eq 0 ]; then
        swav_die "no GPU on node $(hostname): ask for GPUs (sbatch --gpus-per-node=N) or run on" \
            "the CPU by adding --device cpu to the flags"
    fi
    if [ "$tasks" -gt "$gpus" ]; then
        swav_die "$tasks tasks on one node but only $gpus GPU(s): one task per GPU (sbatch" \
            "--ntasks-per-node=$gpus --gpus-per-node=$gpus), or add --device cpu"
    fi
}

swav_launch() {
    local entry=$1
    shift
    [ -n "${SLURM_JOB_ID:-}" ] || swav_usage
    [ -n "${DATASET_PATH:-}" ] || swav_die "DATASET_PATH is not set: DATASET_PATH=/path/to/imagenet/train sbatch ${SWAV_SCRIPT:-<script>}"
    [ -d "$DATASET_PATH" ] || swav_die "DATASET_PATH=$DATASET_PATH is not a directory"
    [ -f "$SWAV_ROOT/$entry" ] || swav_die "$SWAV_ROOT/$entry not found: submit from the root of the checkout or set SWAV_ROOT"
    swav_check_gpus "$@"

    EXPERIMENT_PATH=${EXPERIMENT_PATH:-./experiments/${SLURM_JOB_NAME:-swav}}
    mkdir -p "$EXPERIMENT_PATH" || swav_die "cannot create EXPERIMENT_PATH=$EXPERIMENT_PATH"
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n1)}
    # no fallback to this host: on many nodes the others would wait for a rendezvous that never comes
    [ -n "$MASTER_ADDR" ] || swav_die "cannot name the first node of the allocation" \
        "(scontrol show hostnames '${SLURM_JOB_NODELIST:-}' gave nothing): set MASTER_ADDR"
    # 10000-29999: below Linux's ephemeral range (32768-60999), whose ports outgoing
    # connections may hold on rank 0's node
    MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}
    export MASTER_ADDR MASTER_PORT
    local python=${PYTHON:-python3}
    # one loader worker per CPU of the task but one (the training loop's own); the original asked
    # for 10 workers (its default) on 8 CPUs. A --workers among the flags wins: it comes later.
    local workers=()
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
        workers=(--workers "$((SLURM_CPUS_PER_TASK > 1 ? SLURM_CPUS_PER_TASK - 1 : 1))")
    fi

    echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_NTASKS:-1} tasks on" \
        "${SLURM_JOB_NUM_NODES:-1} node(s) $SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT," \
        "output in $EXPERIMENT_PATH (resumes from its checkpoint.pth.tar when present)"

    # --signal=USR1@N (no B:) reaches the tasks, not this shell; a stray one must not kill it
    trap 'echo "batch shell: SIGUSR1 (the tasks checkpoint and requeue the job)"' USR1
    # srun does not inherit --cpus-per-task from sbatch in every Slurm version: pass it on
    srun --label --kill-on-bad-exit=1 --open-mode=append \
        --output="$EXPERIMENT_PATH/%j.out" --error="$EXPERIMENT_PATH/%j.err" \
        ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
        "$python" -u "$SWAV_ROOT/$entry" --data_path "$DATASET_PATH" --dump_path "$EXPERIMENT_PATH" \
        "${workers[@]}" "$@"
    local status=$?
    echo "job $SLURM_JOB_ID: srun exited with status $status"
    return "$status"
}

#!/bin/bash
#SBATCH --job-name=swav_800ep_pretrain
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=450G
#SBATCH --time=50:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#
# SwAV ResNet-50, 800 epochs, batch 4096 (8 nodes x 8 GPUs x 64), 2x224 + 6x96 crops: 75.3% top-1.
#   DATASET_PATH=/path/to/imagenet/train sbatch scripts/swav_800ep_pretrain.sh [extra flags]
# Flags after the script name override the row's (see scripts/slurm_common.sh and
# docs/README_slurm.md). 300 s before the time limit every task gets SIGUSR1: it finishes
# its step, rank 0 checkpoints mid-epoch and the job requeues itself and resumes.

SWAV_SCRIPT=scripts/swav_800ep_pretrain.sh
SWAV_ROOT=${SWAV_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}
# shellcheck source=scripts/slurm_common.sh
source "$SWAV_ROOT/scripts/slurm_common.sh" ||
    { echo "error: submit from the root of the checkout, or set SWAV_ROOT" >&2; exit 2; }

swav_launch main_swav.py \
    --nmb_crops 2 6 \
    --size_crops 224 96 \
    --min_scale_crops 0.14 0.05 \
    --max_scale_crops 1. 0.14 \
    --crops_for_assign 0 1 \
    --blur opencv \
    --temperature 0.1 \
    --epsilon 0.05 \
    --sinkhorn_iterations 3 \
    --feat_dim 128 \
    --nmb_prototypes 3000 \
    --queue_length 0 \
    --epochs 800 \
    --batch_size 64 \
    --base_lr 4.8 \
    --final_lr 0.0048 \
    --freeze_prototypes_niters 313 \
    --wd 0.000001 \
    --warmup_epochs 10 \
    --start_warmup 0.3 \
    --arch resnet50 \
    --use_fp16 true \
    --sync_bn apex \
    "$@"

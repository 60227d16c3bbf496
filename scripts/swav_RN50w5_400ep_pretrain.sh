#!/bin/bash
#SBATCH --job-name=swav_RN50w5_400ep_pretrain
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --mem=450G
#SBATCH --time=72:00:00
##SBATCH --constraint=volta32gb  # the original's 32 GB V100s (its cluster's feature name)
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#
# SwAV ResNet-50-w5, 400 epochs, batch 1536 (16 nodes x 8 GPUs x 12), 2x224 + 4x96 crops: 78.5% top-1.
#   DATASET_PATH=/path/to/imagenet/train sbatch scripts/swav_RN50w5_400ep_pretrain.sh [extra flags]
# Flags after the script name override the row's (see scripts/slurm_common.sh and
# docs/README_slurm.md). 300 s before the time limit every task gets SIGUSR1: it finishes
# its step, rank 0 checkpoints mid-epoch and the job requeues itself and resumes.

SWAV_SCRIPT=scripts/swav_RN50w5_400ep_pretrain.sh
SWAV_ROOT=${SWAV_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}
# shellcheck source=scripts/slurm_common.sh
source "$SWAV_ROOT/scripts/slurm_common.sh" ||
    { echo "error: submit from the root of the checkout, or set SWAV_ROOT" >&2; exit 2; }

swav_launch main_swav.py \
    --nmb_crops 2 4 \
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
    --queue_length 1536 \
    --epoch_queue_starts 0 \
    --epochs 400 \
    --batch_size 12 \
    --base_lr 4.8 \
    --final_lr 0. \
    --freeze_prototypes_niters 313 \
    --wd 0.000001 \
    --warmup_epochs 10 \
    --start_warmup 0.1875 \
    --arch resnet50w5 \
    --hidden_mlp 10240 \
    --use_fp16 true \
    --sync_bn apex \
    "$@"

#!/usr/bin/env bash
# The GPU checks of benchmarks/README.md. Any error stops the suite with a non-zero status.
#
#   bash benchmarks/gpu_suite.sh [--dry-run] [checks|bench|data|dali] [OUT_DIR]
#
# checks (default, ~5 minutes on one H100): a few fp16 iterations of main_swav, main_deepclusterv2
#   (two epochs: k-means, the memory bank and the collapse monitor's epoch end run), main_simsiam
#   and the three evaluations on the SwAV checkpoint, each under the venv's
#   `python -m torch.distributed.run` on CUDA; then tests/test_gpu.py.
# bench: RN50 2x224+6x96 batch 64 training step, fp32 vs fp16 channels_last (bench_train_step.py).
# data: images/s of the loader (bench_data.py) and training on JPEGs through the loader; then
#   the dali stage when DALI imports.
# dali: --data_backend dali (src/dali.py, never run on a GPU before): a tiny main_swav run, then
#   RN50 2x224+6x96 batch 64 fp16 on JPEGs (its log's "Data" column: the wait for DALI). Where
#   nvidia.dali does not import (pip install -r requirements-dali.txt), `dali` fails and `data`
#   skips it, saying so in its last line.
# --dry-run prints the commands instead of running them (tests/test_feed.py parses them).
# Every run writes to a fresh folder under OUT_DIR (default /tmp/gpu_suite): a rerun never
# resumes an earlier run's checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY=1
  shift
fi
PART=${1:-checks}
OUT_ROOT=${2:-${OUT:-/tmp/gpu_suite}}
PY=${PYTHON:-.venv/bin/python}
if [[ $DRY == 0 && ! -x $PY ]]; then
  echo "error: $PY not found: run 'make venv' first (or set PYTHON)" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1

mkdir -p "$OUT_ROOT"
OUT=$(mktemp -d "$OUT_ROOT/run.$(date +%Y%m%d-%H%M%S).XXXX")
DATA="$OUT/data"
echo "suite $PART: results in $OUT"

# run NAME CMD...: log to $OUT/NAME.txt, fail the suite (set -e, pipefail) when CMD fails
run() {
  local name=$1
  shift
  if [[ $DRY == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
    return 0
  fi
  echo "== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.txt"
}

# one process under the launcher, as the sbatch scripts start each task (CUDA: nccl backend;
# under torchrun one process gets a one-rank group, so the collectives run; --standalone picks
# a free port)
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1)
TINY=(--arch resnet18 --width 8 --cifar_stem true --workers 2 --use_fp16 true --device cuda
      --checkpoint_freq 1 --log_freq 2)
CROPS=(--nmb_crops 2 2 --size_crops 32 16 --min_scale_crops 0.3 0.1 --max_scale_crops 1 0.3
       --batch_size 8 --feat_dim 16 --hidden_mlp 64)
EVAL=(--arch resnet18 --width 8 --cifar_stem true --workers 2 --device cuda --use_fp16 true
      --resize 32 --center_crop 32 --batch_size 8 --data_path "$DATA/split"
      --pretrained "$OUT/swav/checkpoint.pth.tar")

# dali_stage JPEG_DIR: --data_backend dali, where DALI imports (--dry-run prints it anyway);
# within `data` a missing DALI skips it (said in the last line), `dali` alone fails
SKIPPED=""
dali_stage() {
  local jpegs=$1
  if [[ $DRY == 0 ]] && ! "$PY" -c "import nvidia.dali" >/dev/null 2>&1; then
    local why="nvidia.dali does not import: $PY -m pip install -r requirements-dali.txt"
    if [[ $PART == dali ]]; then
      echo "error: the dali part needs DALI ($why)" >&2
      exit 1
    fi
    echo "== dali: skipped ($why)"
    SKIPPED=" (dali stage SKIPPED: not tested)"
    return 0
  fi
  run dali_tiny_data "$PY" -c "import sys; sys.path.insert(0, 'tests'); import conftest as c; \
c.make_image_folder('$DATA/dali_train', classes=3, per_class=16, size=40)"
  run dali_swav_tiny "${TORCHRUN[@]}" main_swav.py "${TINY[@]}" "${CROPS[@]}" --epochs 2 \
    --nmb_prototypes 20 --data_backend dali --data_path "$DATA/dali_train" \
    --dump_path "$OUT/dali_swav_tiny"
  run dali_swav_rn50 "${TORCHRUN[@]}" main_swav.py --data_backend dali --data_path "$jpegs" \
    --nmb_crops 2 6 --size_crops 224 96 --min_scale_crops 0.14 0.05 --max_scale_crops 1 0.14 \
    --batch_size 64 --epochs 1 --workers 8 --use_fp16 true --device cuda --log_freq 4 \
    --checkpoint_freq 1 --dump_path "$OUT/dali_swav_rn50"
}

case "$PART" in
checks)
  run machine nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  run data "$PY" -c "import sys; sys.path.insert(0, 'tests'); import conftest as c; \
c.make_image_folder('$DATA/train', classes=3, per_class=16, size=40); \
c.make_split_folder('$DATA/split', train_per_class=8, val_per_class=4)"
  run main_swav "${TORCHRUN[@]}" main_swav.py "${TINY[@]}" "${CROPS[@]}" --epochs 2 \
    --nmb_prototypes 20 --queue_length 16 --epoch_queue_starts 1 --data_path "$DATA/train" \
    --dump_path "$OUT/swav"
  run main_deepclusterv2 "${TORCHRUN[@]}" main_deepclusterv2.py "${TINY[@]}" "${CROPS[@]}" \
    --epochs 2 --nmb_prototypes 6 5 4 --data_path "$DATA/train" --dump_path "$OUT/dcv2"
  run main_simsiam "${TORCHRUN[@]}" main_simsiam.py "${TINY[@]}" --epochs 1 --batch_size 8 \
    --size_crop 16 --dim 32 --pred_dim 8 --data_path "$DATA/train" --dump_path "$OUT/simsiam"
  run eval_linear "${TORCHRUN[@]}" eval_linear.py "${EVAL[@]}" --train_crop 32 --epochs 1 \
    --dump_path "$OUT/linear"
  run eval_semisup "${TORCHRUN[@]}" eval_semisup.py "${EVAL[@]}" --train_crop 32 --epochs 1 \
    --decay_epochs 1 --labels_perc 50 --dump_path "$OUT/semisup"
  run eval_knn "${TORCHRUN[@]}" eval_knn.py "${EVAL[@]}" --nb_knn 3 --dump_path "$OUT/knn"
  run test_gpu "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py
  ;;
bench)  # RN50 2x224+6x96, batch 64: fp32 baseline vs fp16 channels_last (+ multi-tensor LARC)
  run train_step "$PY" benchmarks/bench_train_step.py --device cuda --batch_size 64 --rounds 1 \
    --warmup 5 --iters 20 --configs fp32 fp16+cl+foreach bf16+cl+foreach
  ;;
data)  # per-core augmentation speed, the loader with N workers, training on JPEGs
  run jpegs "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import common; \
common.make_jpeg_folder('$DATA/jpegs', 2048, processes=16)"
  run bench_data "$PY" benchmarks/bench_data.py --data_path "$DATA/jpegs" --rounds 3 \
    --loader_workers 1 4 8 15
  run train_jpeg "$PY" benchmarks/bench_train_step.py --device cuda --batch_size 64 --rounds 1 \
    --warmup 5 --iters 20 --configs fp16+cl+foreach --data_path "$DATA/jpegs" --workers 15
  dali_stage "$DATA/jpegs"
  ;;
dali)  # the DALI backend alone (its own JPEGs); fails where DALI does not import
  if [[ $DRY == 0 ]] && ! "$PY" -c "import nvidia.dali" >/dev/null 2>&1; then
    dali_stage "$DATA/jpegs"  # says why, exits 1
  fi
  run jpegs "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import common; \
common.make_jpeg_folder('$DATA/jpegs', 2048, processes=16)"
  dali_stage "$DATA/jpegs"
  ;;
*)
  echo "error: unknown part $PART (checks, bench, data or dali)" >&2
  exit 2
  ;;
esac
echo "suite $PART: passed$SKIPPED (results in $OUT)"

#!/usr/bin/env bash
# The GPU checks and benchmarks of benchmarks/README.md, in the parts they were run in (each part
# fits a 10-minute slot). Usage: bash benchmarks/gpu_suite.sh checks|eager|compile|data [OUT_DIR]
# Without numba installed the fast augmentation falls back to PIL: install it first (pip).
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:?checks, eager, compile or data}
OUT=${2:-${OUT:-/tmp/gpu_suite}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
TINY=(--epochs 2 --batch_size 8 --nmb_crops 2 2 --size_crops 32 16 --min_scale_crops 0.3 0.1
      --max_scale_crops 1 0.3 --nmb_prototypes 20 --feat_dim 16 --hidden_mlp 64 --workers 2
      --checkpoint_freq 1 --arch resnet18 --width 8 --cifar_stem true --data_path /tmp/tiny_data)
BENCH=(benchmarks/bench_train_step.py --device cuda --batch_size 64 --rounds 1 --warmup 5
       --iters 20)

case "$PART" in
checks)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/machine.txt"
  $PY -c "import torch, torchvision, numpy, PIL, os; print('torch', torch.__version__, 'tv',
torchvision.__version__, 'numpy', numpy.__version__, 'PIL', PIL.__version__, 'cpus', os.cpu_count())" \
    | tee -a "$OUT/machine.txt"
  $PY -c "import numba; print('numba', numba.__version__)" | tee -a "$OUT/machine.txt"
  $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_fastpath.py \
    tests/test_fastaugment.py 2>&1 | tee "$OUT/pytest.txt"
  $PY -c "import sys; sys.path.insert(0, 'tests'); from conftest import make_image_folder; \
make_image_folder('/tmp/tiny_data', classes=3, per_class=16, size=40)"
  for fp16 in true false; do
    $PY main_swav.py "${TINY[@]}" --use_fp16 $fp16 --dump_path /tmp/tiny_run_$fp16 2>&1 \
      | grep -E "precision|Epoch: \[1\]|Training done|Error|error" | tee -a "$OUT/main_swav.txt"
  done
  # two processes on one machine: gloo on the CPU (nccl would need two GPUs)
  torchrun --nproc_per_node 2 main_swav.py "${TINY[@]}" --use_fp16 false --device cpu \
    --dump_path /tmp/tiny_run_gloo 2>&1 | grep -E "Training done|Error|error" \
    | tee -a "$OUT/main_swav.txt"
  ;;
eager)  # synthetic crops, eager: fp32 baseline, channels_last, LARC loop vs multi-tensor, AMP
  $PY "${BENCH[@]}" --configs fp32 fp32+cl+foreach fp16+cl fp16+cl+foreach bf16+cl+foreach \
    2>&1 | tee "$OUT/train_eager.txt"
  ;;
compile)
  $PY "${BENCH[@]}" --configs fp16+cl+foreach+compile bf16+cl+foreach+compile \
    2>&1 | tee "$OUT/train_compile.txt"
  ;;
data)  # per-core augmentation speed, the loader with N workers, and training on real JPEGs
  $PY -c "import sys; sys.path.insert(0, 'benchmarks'); from common import make_jpeg_folder; \
make_jpeg_folder('/tmp/jpegs', 2048, processes=16)"
  $PY benchmarks/bench_data.py --data_path /tmp/jpegs --rounds 5 --loader_workers 4 8 15 \
    2>&1 | tee "$OUT/data.txt"
  for aug in fast pil; do
    $PY "${BENCH[@]}" --configs fp16+cl+foreach --data_path /tmp/jpegs --workers 15 \
      --augment $aug 2>&1 | tee "$OUT/train_jpeg_$aug.txt"
  done
  ;;
*) echo "unknown part $PART" >&2; exit 2 ;;
esac

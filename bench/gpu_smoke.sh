#!/usr/bin/env bash
# GPU smoke test: all four stages on a miniature CIFAR-100 with the paper's full-size committee under
# hardware=gpu and hardware=ddp; seconds, peak GPU memory and recover's s/image/iteration per stage
# (bench/gpu_smoke.py says what is measured). Extra arguments go to bench/gpu_smoke.py, e.g.
#   bash bench/gpu_smoke.sh --iterations 100 --out /scratch/smoke
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi >/dev/null 2>&1; then
  echo "bench/gpu_smoke.sh needs a CUDA GPU (nvidia-smi found none); on CPU run:" >&2
  echo "  python bench/gpu_smoke.py --hardware cpu --members resnet18_small,resnet50_small --iterations 2" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.device_count(), 'GPU(s)')"
exec python bench/gpu_smoke.py --hardware gpu,ddp "$@"

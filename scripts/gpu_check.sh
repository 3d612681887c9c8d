#!/usr/bin/env bash
# The GPU check of issue #29, ready for when a GPU is lent. On a fresh CUDA machine, after the README's setup
# (`make setup model`, which takes PyPI's CUDA build of torch when nvidia-smi is present):
#   1. the main job's pipeline (data -> sft -> rm -> dpo -> safety_eval) on the embedded model in bf16, one GPU;
#   2. sft under `accelerate launch` DDP (conf/accelerate/ddp.yaml) on every visible GPU;
#   3. per-stage seconds, tokens per second and peak GPU memory (scripts/gpu_report.py reads the stages' metrics).
# A few minutes on one modern GPU. `--dry-run` prints the commands without running them (tested on the CPU).
#   bash scripts/gpu_check.sh [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
PY=${PYTHON:-.venv/bin/python}
NAME=${RUN_NAME:-gpucheck-$(date +%Y%m%d-%H%M%S)}

run() {
  echo "+ $*"
  if (( ! DRY )); then "$@"; fi
}

if (( DRY )); then
  GPUS=${GPUS:-2}  # what the dry run shows; a real run counts them
else
  "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device (try --dry-run)')"
  GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
fi

run "$PY" -m align run.name="$NAME" tracking=none model.dtype=bfloat16
run "$PY" -m accelerate.commands.launch --config_file conf/accelerate/ddp.yaml --num_processes "$GPUS" \
  --main_process_port 0 -m align stage=sft run.name="$NAME-ddp" tracking=none model.dtype=bfloat16 \
  data=tax_scoped trainer.max_steps=30
run "$PY" scripts/gpu_report.py "outputs/$NAME" "outputs/$NAME-ddp"

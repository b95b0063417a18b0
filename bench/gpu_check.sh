#!/usr/bin/env bash
# One device call (< 8 minutes on a lent H200): bf16 LoRA and 8-bit LoRA on a ~1B Llama config,
# sft_scale vs TRL, tokens/s, MFU and max memory allocated (bench/gpu_check.py).
#
#   here, once:   bash bench/prepare_wheels.sh        # trl, datasets, bitsandbytes, deepspeed -> .whl/
#   device call:  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# Results: $OUT/gpu_check.md (a fragment for docs/BENCHMARKS.md), $OUT/gpu_check.json, $OUT/log.txt,
# and $OUT/plan_gpu.md (bench/plan_gpu_check.py: the memory planner against the GPU).
# Extra arguments go to bench.gpu_check (e.g. --methods sft_scale_bf16,trl_packing_bf16).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
start=$(date +%s)

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "gpu_check.sh: installing the wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "gpu_check.sh: no .whl/ carried (bash bench/prepare_wheels.sh here, carry=[\".whl\"])"
fi
# The repository itself (bench, sft_scale) is imported from the working tree.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false WANDB_DISABLED=true \
  SFT_SCALE_HOME=/tmp/sft_scale_home SFT_SCALE_BENCH_CACHE=/tmp/sft_scale_bench

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  > "$OUT/nvidia_smi.csv" 2>&1 || true
python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import importlib.metadata as m
for p in ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "bitsandbytes",
          "deepspeed"):
    try:
        print(p, m.version(p))
    except m.PackageNotFoundError:
        print(p, "missing")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY

# 380 s (+100 s for the planner check below) for the Python part leaves the install and the call's own overhead inside 8 minutes;
# --budget-s stops starting new methods early enough for the last one to finish.
timeout 380 python3 -m bench.gpu_check --out "$OUT" --budget-s 270 "$@" 2>&1 | tee "$OUT/log.txt"
rc=${PIPESTATUS[0]}
# The memory planner against torch.cuda.max_memory_allocated (issue 8), ~1 minute.
timeout 100 python3 bench/plan_gpu_check.py --out "$OUT/plan_gpu.md" 2>&1 | tee -a "$OUT/log.txt"
echo "gpu_check.sh: exit $rc after $(( $(date +%s) - start )) s"
exit "$rc"

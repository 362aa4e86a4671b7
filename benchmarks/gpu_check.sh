#!/usr/bin/env bash
# GPU acceptance check for hf_lwf (one GPU, under 8 minutes). Run from anywhere:
#
#   benchmarks/gpu_check.sh             # on a CUDA machine
#   benchmarks/gpu_check.sh --dry-run   # tiny model on the CPU, few steps (what CI runs; also HF_LWF_GPU_CHECK_DRY_RUN=1)
#
# 1. the gpu-marked tests (pytest -m gpu; the 2-GPU ones skip on one GPU);
# 2. benchmarks/gpu_check.py: SmolLM2 with LWFTrainer in bf16; the same with LoRA and gradient checkpointing;
#    a resume on CUDA; FSDP2 on one GPU (torchrun); DeepSpeed ZeRO-3 on one GPU (torchrun, the default preconditioned ascent;
#    in the dry run a one-rank ZeRO-3 run on the CPU with DeepSpeed's CPU accelerator);
# 3. the benchmark figures in bf16 (benchmarks/run.py on SmolLM2 and the tiny model), written as
#    benchmarks/results/<gpu>.json next to the CPU results, and docs/benchmarks.md regenerated.
# Exits non-zero if any part fails; every part runs regardless. Set GPU_CHECK_OUT to keep the working files.
# The timeouts of the three GPU parts add up to 460 s, under the 8-minute budget (tests/test_gpu_check.py checks it).
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DRY="${HF_LWF_GPU_CHECK_DRY_RUN:-0}"
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
OUT="${GPU_CHECK_OUT:-$(mktemp -d)}"
status=0

if [[ "$DRY" == "1" ]]; then
  export OMP_NUM_THREADS=1 HF_LWF_GPU_CHECK_DRY_RUN=1
  echo "[gpu_check] dry run: tiny model on the CPU"
  python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider || status=1
  python benchmarks/gpu_check.py --dry-run --out "$OUT" --summary "$OUT/summary.json" || status=1
  python benchmarks/run.py --models tiny --sections fisher_bf16 --threads 1 --out "$OUT/bench.json" || status=1
else
  timeout 100 python -m pytest -q -m gpu tests/ -p no:cacheprovider || status=1
  timeout 260 python benchmarks/gpu_check.py --out "$OUT" --summary "$OUT/summary.json" || status=1
  timeout 100 python benchmarks/run.py --models smollm2,tiny --sections scoring,step_overhead,fisher_bf16 || status=1
fi
echo "[gpu_check] working files in $OUT"
if [[ $status == 0 ]]; then echo "[gpu_check] PASSED"; else echo "[gpu_check] FAILED"; fi
exit $status

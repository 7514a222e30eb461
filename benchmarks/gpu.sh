#!/usr/bin/env bash
# One-shot GPU check, run on a machine with an NVIDIA GPU:
#
#   benchmarks/gpu.sh            # from the repository root; results in $OUT, else ./gpu-results
#   PYTHON=python3 benchmarks/gpu.sh
#
# 1. A short CUDA training through `dptrain run` (1 GPU: examples/digits-cnn.yaml, 5 epochs): its privacy
#    report (device, ε, steps, elapsed time) and the per-chunk examples/s.
# 2. Step time and samples/s of the engine's DP-SGD step on CUDA (benchmarks/distributed.py --device cuda):
#    1 GPU, and 1 GPU vs one process per GPU (NCCL) when more than one GPU is visible.
# 3. The step-time table of benchmarks/step_time.py on CUDA (batch 512: non-private, Opacus hooks/ghost,
#    dptrain's kernels), with peak CUDA memory ratios.
# 4. With more than one GPU, the same training with `dptrain run --nproc <GPUs>` (NCCL, noise once per step).
#
# Files (at most 8, for the device tool's $OUT): summary.txt, nvidia-smi.txt, run-1gpu.log, report-1gpu.json,
# bench-cuda.json, step-time-cuda.json, and with several GPUs run-multi.log, report-multi.json.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RESULTS="${OUT:-$ROOT/gpu-results}"
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT/trainer-image/src:$ROOT/api/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/summary.txt"
: >"$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi >"$RESULTS/nvidia-smi.txt" 2>&1; then
  say "gpu.sh: no NVIDIA GPU here (nvidia-smi failed); nothing measured"
  exit 1
fi
GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"
if [[ "$GPUS" -lt 1 ]]; then
  say "gpu.sh: torch sees no CUDA device ($("$PYTHON" -c 'import torch; print(torch.__version__)')): install a CUDA build"
  exit 1
fi
say "gpu.sh: $GPUS GPU(s): $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)"
say "torch $("$PYTHON" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# examples/digits-cnn.yaml, shortened (5 epochs: ~30 steps) so the whole script stays within a few minutes.
"$PYTHON" - "$ROOT/examples/digits-cnn.yaml" "$WORK/job.yaml" <<'EOF'
import sys, yaml
job = yaml.safe_load(open(sys.argv[1]))
job["spec"]["training"]["epochs"] = 5
job["spec"]["checkpoint"]["everySteps"] = 10
yaml.safe_dump(job, open(sys.argv[2], "w"))
EOF

run_training() {  # $1: label, then extra arguments of dptrain run
  local label="$1"; shift
  local started ended
  started="$(date +%s.%N)"
  if "$PYTHON" -m dptrain.cli run "$WORK/job.yaml" --output "$WORK/$label" --quiet \
      --termination-message-path "$WORK/$label.termination" "$@" >"$RESULTS/run-$label.log" 2>&1; then
    ended="$(date +%s.%N)"
    cp "$WORK/$label/privacy-report.json" "$RESULTS/report-$label.json"
    "$PYTHON" - "$RESULTS/report-$label.json" "$label" "$started" "$ended" <<'EOF' | tee -a "$SUMMARY" || say "cannot read report-$label.json"
import json, sys
report = json.load(open(sys.argv[1]))
runtime, mechanism = report["runtime"], report["mechanism"]
wall = float(sys.argv[4]) - float(sys.argv[3])
steps = mechanism["stepsRun"]
print(f"dptrain run [{sys.argv[2]}]: device {runtime['device']}, {runtime.get('processes', 1)} process(es), "
      f"{steps} steps, training attempt {runtime['elapsedSecondsThisAttempt']:.2f} s "
      f"({1000 * runtime['elapsedSecondsThisAttempt'] / max(steps, 1):.1f} ms/step incl. accounting and releases), "
      f"command {wall:.1f} s, ε {report['guarantee']['epsilon']:.4f} (target {report['guarantee']['targetEpsilon']})")
EOF
    grep -h "ex/s" "$RESULTS/run-$label.log" | tail -3 | sed "s/^/  [$label] /" | tee -a "$SUMMARY" || true
  else
    say "dptrain run [$label] FAILED (exit $?): see run-$label.log"
  fi
}

say ""
say "== 1. dptrain run on 1 GPU"
CUDA_VISIBLE_DEVICES=0 run_training 1gpu

say ""
say "== 2. DP-SGD step on CUDA (benchmarks/distributed.py)"
CONFIGS=(1x1)
if [[ "$GPUS" -gt 1 ]]; then CONFIGS+=("${GPUS}x1"); fi
"$PYTHON" "$ROOT/benchmarks/distributed.py" --device cuda --configs "${CONFIGS[@]}" --rounds 3 --steps 50 \
  --json "$RESULTS/bench-cuda.json" 2>&1 | tee -a "$SUMMARY" || say "benchmark FAILED"

say ""
say "== 3. Step time and peak memory ÷ non-private per clipping path on CUDA (benchmarks/step_time.py, batch 512)"
CUDA_VISIBLE_DEVICES=0 "$PYTHON" "$ROOT/benchmarks/step_time.py" --device cuda --batches 512 --rounds 5 \
  --json "$RESULTS/step-time-cuda.json" 2>/dev/null | tee -a "$SUMMARY" || say "step_time.py FAILED"

if [[ "$GPUS" -gt 1 ]]; then
  say ""
  say "== 4. dptrain run --nproc $GPUS (NCCL)"
  run_training multi --nproc "$GPUS"
fi
say ""
say "results in $RESULTS"

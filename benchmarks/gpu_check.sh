#!/usr/bin/env bash
# The CUDA path in one short script (under 5 minutes on one H200): the `medium` preset in bf16
# on CUDA/nccl under the real torchrun; a save, a stop and a resume that must be bitwise equal to
# an uninterrupted run (losses and final weights); steady-state throughput and MFU.
#   bash benchmarks/gpu_check.sh          # STEPS=80 HALF=40 PRESET=medium DEVICE=cuda PRECISION=bf16
#   PRESET=tiny DEVICE=cpu PRECISION=fp32 STEPS=20 HALF=10 bash benchmarks/gpu_check.sh   # its CPU rehearsal
# Needs the repo's dependencies importable (PYTHONPATH=. is set here); writes its log to
# ${OUT:-/tmp}/gpu_check.log. Results are written into benchmarks/README.md by hand.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PRESET=${PRESET:-medium} DEVICE=${DEVICE:-cuda} PRECISION=${PRECISION:-bf16} STEPS=${STEPS:-80} HALF=${HALF:-40} PEAK_TFLOPS=${PEAK_TFLOPS:-989}
WORK=$(mktemp -d)
LOG=${OUT:-/tmp}/gpu_check.log
exec > >(tee "$LOG") 2>&1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
      "cuda", torch.version.cuda)'

ARGS=(--preset "$PRESET" --train.device="$DEVICE" --train.precision="$PRECISION" --train.max_steps="$STEPS"
      --train.log_interval=10 --train.eval_interval=0 --data.val_samples=64
      --checkpoint.interval_steps=0 --train.warmup_fraction=0.1)
train() { timeout 240 torchrun --standalone --nproc_per_node=1 -m dtrain.train "${ARGS[@]}" "$@"; }

t0=$(date +%s.%N)
train --run-dir "$WORK/whole" || { echo "FAIL: uninterrupted run"; exit 1; }
t1=$(date +%s.%N)
train --run-dir "$WORK/split" --stop-at-step "$HALF" || { echo "FAIL: first leg"; exit 1; }
train --run-dir "$WORK/split" || { echo "FAIL: resumed leg"; exit 1; }
echo "uninterrupted run wall-clock: $(python3 -c "print(f'{$t1 - $t0:.1f}')") s (start-up included)"

python3 - "$WORK" "$PRESET" "$PEAK_TFLOPS" <<'EOF'
import json, statistics, sys
from pathlib import Path
import torch
from dtrain.export import load_from_run

work, preset, peak = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
def records(run, kind):
    return [json.loads(l) for l in (work / run / "metrics.jsonl").read_text().splitlines()
            if json.loads(l)["kind"] == kind]

whole, split = records("whole", "train"), records("split", "train")
same_losses = [r["loss"] for r in whole] == [r["loss"] for r in split]
a_model, a_optim, manifest, config = load_from_run(str(work / "whole"), optimizer=True)
b_model, b_optim, *_ = load_from_run(str(work / "split"), optimizer=True)
same_weights = all(torch.equal(v, b_model.state_dict()[k]) for k, v in a_model.state_dict().items())
same_optim = all(torch.equal(v, b_optim["state"][f][n])
                 for f, e in a_optim["state"].items() for n, v in e.items())
print(f"bitwise resume at step {manifest.step}: losses {'EQUAL' if same_losses else 'DIFFER'}, "
      f"weights {'EQUAL' if same_weights else 'DIFFER'}, optimizer {'EQUAL' if same_optim else 'DIFFER'}")

# Model FLOPs per example (training = 3x forward): 6 x params x points for the matmuls, and the
# attention scores and mixing, 12 x layers x points^2 x width.
params = sum(p.numel() for p in a_model.parameters())
n, width, layers = config.data.points, config.model.width, config.model.layers
flops = 6 * params * n + 12 * layers * n * n * width
rates = [r["samples_per_s"] for r in whole][1:]  # the first window holds compilation and warm-up
rate = statistics.median(rates)
print(f"{preset}: {params / 1e6:.1f} M params, {n} points/example, {flops / 1e9:.2f} GFLOP/example")
print(f"throughput: {rate:.0f} samples/s ({rate * n:.0f} points/s) median of {len(rates)} windows "
      f"({', '.join(f'{x:.0f}' for x in rates)})")
print(f"MFU: {100 * rate * flops / (peak * 1e12):.1f}% of {peak:.0f} TFLOP/s bf16 dense")
saves = [json.loads(l) for l in (work / "split/events.jsonl").read_text().splitlines()]
for event in saves:
    if event["event"] == "checkpoint":
        print("checkpoint event:", {k: event[k] for k in event if k not in ("time", "files")})
print("PASS" if same_losses and same_weights and same_optim else "FAIL: resume is not bitwise")
EOF

#!/usr/bin/env bash
# FSDP2 mixed precision on one GPU (gpu_8_fsdp.yaml at one process), from the repo root:
#   bash benchmarks/gpu_fsdp_precision.sh        (run directories and logs under ${OUT:-/tmp/gpu_fsdp_precision})
# `mini` for 20 steps in fp32, bf16 and fp16, each with the plain loss (the GPU default) and the chunked loss
# (--loss_chunk 4096), plus bf16 with Accelerate's output cast put back (what the trainer did before). Prints per
# run the largest |loss - fp32 loss| over the steps and how many logged losses are exactly representable in the
# run's 16-bit type: all of them means the logged loss was rounded to it.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_fsdp_precision}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, accelerate; print('torch', torch.__version__, '| accelerate', accelerate.__version__)"

cat > "$OUT/output_cast_kept.py" <<'PY'
import accel_gpt.launch
import accel_gpt.train
# Accelerate's FSDP2 policy as it comes: outputs cast to bf16
accel_gpt.launch.keep_fsdp_loss_in_fp32 = lambda accelerator: None
accel_gpt.train.main()
PY

run() {  # name, mixed precision, entry point, trainer flags...
  local name=$1 precision=$2 entry=$3; shift 3
  accelerate launch --config_file accelerate_configs/gpu_8_fsdp.yaml --num_processes 1 --mixed_precision "$precision" \
    $entry --model mini --max_steps 20 --warmup_steps 5 --eval_freq 10 --eval_iter 2 --save_freq 100 \
    --data_cache_dir "$OUT/cache" --output_dir "$OUT/$name" --overwrite true "$@" > "$OUT/$name.log" 2>&1 \
    || { echo "$name failed"; tail -15 "$OUT/$name.log"; }
}
run fp32 no "-m accel_gpt.train"
for precision in bf16 fp16; do
  run "${precision}_plain" $precision "-m accel_gpt.train"
  run "${precision}_chunked" $precision "-m accel_gpt.train" --loss_chunk 4096
done
run bf16_output_cast_kept bf16 "$OUT/output_cast_kept.py"

python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
import torch
out = Path(sys.argv[1])
def steps(name):
    path = out / name / "metrics.jsonl"
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())} if path.exists() else {}
reference = steps("fp32")
for name in ("fp32", "bf16_plain", "bf16_chunked", "fp16_plain", "fp16_chunked", "bf16_output_cast_kept"):
    run = steps(name)
    if not run:
        print(f"{name:22s} no metrics"); continue
    dtype = torch.float16 if name.startswith("fp16") else torch.bfloat16
    losses = [run[s]["loss"] for s in sorted(run)]
    exact = sum(float(torch.tensor(x).to(dtype)) == x for x in losses)
    worst = max(abs(run[s]["loss"] - reference[s]["loss"]) for s in run if s in reference) if reference else float("nan")
    print(f"{name:22s} {len(run)} steps | loss at 1, 10, 20: {losses[0]:.6f} {run[10]['loss']:.6f} "
          f"{run[20]['loss']:.6f} | val at 20: {run[20].get('val_loss', float('nan')):.6f} | largest |loss - fp32| "
          f"{worst:.4f} | exactly {dtype}: {exact}/{len(losses)}")
PY

#!/usr/bin/env bash
# A bounded GPU check of the training spine (well under 10 minutes with start-up), run from the repo root:
#   bash benchmarks/gpu_smoke.sh            (writes run directories and logs under ${OUT:-/tmp/gpu_smoke})
# 1. the unit tests that need no process launch, on the GPU machine's torch;
# 2. the default `mini` run for 100 steps on one GPU with bf16 (accelerate_configs/gpu_1.yaml);
# 3. gpt2-small (untied, 163M) bf16, 16 x 1024 tokens per step, 40 steps, without and with torch.compile;
# 4. benchmarks/model_step.py on the GPU (accel_gpt vs Hugging Face GPT-2, fp32);
# 5. FSDP2 with bf16 (gpu_8_fsdp.yaml at one process): gpt2-small for 20 steps, then a resume from its step-10
#    checkpoint, printing the largest loss difference between the two runs over steps 11-20.
# It prints each run's median steady-state tokens/s and MFU (first 5 steps skipped: warm-up and compilation),
# peak GPU memory and final val loss.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_smoke}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, accelerate, pyarrow, tiktoken, xxhash; print('torch', torch.__version__, '| accelerate', accelerate.__version__, '| pyarrow', pyarrow.__version__, '| xxhash', xxhash.VERSION)"

python3 -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_data.py tests/test_checkpoint.py \
  tests/test_schedule.py tests/test_config.py tests/test_tokenizer.py tests/test_train.py 2>&1 | tail -3

summary() {
  python3 - "$1" <<'PY'
import json, statistics, sys
recs = {}
for line in open(sys.argv[1] + "/metrics.jsonl"):
    r = json.loads(line); recs[r["step"]] = r
steady = [r for s, r in sorted(recs.items()) if s > 5]
last = recs[max(recs)]
mfu = statistics.median(r.get("mfu", float("nan")) for r in steady)
print(f"{sys.argv[1]}: {len(recs)} steps | median {statistics.median(r['tokens_per_sec'] for r in steady):,.0f} "
      f"tokens/s | MFU {mfu:.1%} | peak memory {last['peak_memory_mib'] / 1024:.1f} GiB | "
      f"final loss {last['loss']:.3f} | val_loss {last.get('val_loss', float('nan')):.3f}")
PY
}

run() {  # CONFIG and LAUNCH (extra `accelerate launch` flags) may be set per call
  local name=$1; shift
  accelerate launch --config_file "${CONFIG:-accelerate_configs/gpu_1.yaml}" ${LAUNCH:-} -m accel_gpt.train \
    --output_dir "$OUT/$name" --data_cache_dir "$OUT/cache" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -E "world_size|val_loss|saved|error" "$OUT/$name.log" | cut -c1-220
  [ $rc -eq 0 ] && summary "$OUT/$name" || { echo "$name failed (rc=$rc)"; tail -20 "$OUT/$name.log"; }
}

run mini --max_steps 100 --eval_freq 50 --save_freq 100
small=(--model gpt2-small --batch_size 16 --max_steps 40 --eval_freq 20 --eval_iter 2 --save_freq 40 \
  --warmup_steps 5 --learning_rate 6e-4 --min_lr 6e-5)
run gpt2_small "${small[@]}"
run gpt2_small_compiled "${small[@]}" --compile true

python3 benchmarks/model_step.py --device cuda --rounds 9 2>&1 | tail -6

CONFIG=accelerate_configs/gpu_8_fsdp.yaml LAUNCH="--num_processes 1" run gpt2_small_fsdp "${small[@]}" --max_steps 20 --save_freq 10
CONFIG=accelerate_configs/gpu_8_fsdp.yaml LAUNCH="--num_processes 1" run gpt2_small_fsdp "${small[@]}" --max_steps 20 --save_freq 10 --checkpoint 10
python3 - "$OUT/gpt2_small_fsdp/metrics.jsonl" <<'PY'
import json, sys
by_step = {}
for line in open(sys.argv[1]):
    r = json.loads(line); by_step.setdefault(r["step"], []).append(r["loss"])
pairs = [v for s, v in by_step.items() if s > 10 and len(v) == 2]
print(f"FSDP resume from step 10: {len(pairs)} steps compared, largest loss difference "
      f"{max(abs(a - b) for a, b in pairs) if pairs else float('nan'):.2e}")
PY

#!/usr/bin/env bash
# Every GPU check in one call of under 8 minutes on one H100 or H200, from the repo root:
#   bash benchmarks/gpu_smoke.sh [PHASE ...]      (results and logs under ${OUT:-/tmp/gpu_smoke})
# Python packages the GPU image lacks (xxhash where absent; optionally liger-kernel and cut-cross-entropy for the
# loss-kernel comparison) are installed from wheels in .whl/ when that folder exists.
# 1. the unit tests that need no process launch, on the GPU machine's torch;
# 2. benchmarks/gpu_step.py: attention and loss kernels, the minimal loop vs the trainer for gpt2-small
#    (compiled and eager) and mini, with tokens/s, ms/step, MFU and peak memory, and --cuda_graph (the whole
#    step as one CUDA graph: mini's speed, losses vs the eager step and a resume; gpt2-small) (PHASEs select);
# 3. FSDP2 with bf16 (gpu_8_fsdp.yaml at one process): gpt2-small for 20 steps, then a resume from its step-10
#    checkpoint: the largest loss difference, and whether the logged losses are full fp32 values;
# 4. benchmarks/generation.py on the GPU, when it exists: tokens/s with and without the KV cache.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_smoke}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, accelerate, pyarrow, tiktoken, xxhash; print('torch', torch.__version__, '| accelerate', accelerate.__version__, '| pyarrow', pyarrow.__version__, '| xxhash', xxhash.VERSION)"

python3 -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_data.py tests/test_checkpoint.py \
  tests/test_schedule.py tests/test_config.py tests/test_tokenizer.py tests/test_metrics.py tests/test_step.py 2>&1 | tail -3

python3 benchmarks/gpu_step.py --budget "${GPU_STEP_BUDGET:-300}" --out "$OUT" ${1:+--only "$@"} 2>&1 \
  | tee "$OUT/gpu_step.log" | grep -vE "^step |^sample|^saved|Generating|tokenizing|^accel_gpt \|"

fsdp() {  # NAME [trainer arguments]: gpt2-small under FSDP2 + bf16 on one GPU, logged to $OUT/fsdp-NAME.log
  local log="$OUT/fsdp-$1.log"; shift
  accelerate launch --config_file accelerate_configs/gpu_8_fsdp.yaml --num_processes 1 -m accel_gpt.train \
    --output_dir "$OUT/fsdp" --data_cache_dir /tmp/gpu_smoke_cache --train_data_path xiyouji --model gpt2-small \
    --batch_size 8 --max_steps 20 --eval_freq 20 --eval_iter 1 --save_freq 10 --warmup_steps 5 "$@" \
    > "$log" 2>&1 || { echo "FSDP run failed:"; tail -5 "$log"; }
}
fsdp new --overwrite true  # a rerun of this script moves the last one's run aside
fsdp resumed --checkpoint 10
python3 - "$OUT/fsdp/metrics.jsonl" <<'PY'
import json, sys
import torch
by_step = {}
for line in open(sys.argv[1]):
    r = json.loads(line); by_step.setdefault(r["step"], []).append(r["loss"])
pairs = [v for s, v in by_step.items() if s > 10 and len(v) == 2]
losses = [v[0] for v in by_step.values()]
in_bf16 = sum(float(torch.tensor(x).bfloat16().float()) == x for x in losses)
print(f"FSDP bf16 resume from step 10: {len(pairs)} steps compared, largest loss difference "
      f"{max(abs(a - b) for a, b in pairs) if pairs else float('nan'):.2e}; {in_bf16} of {len(losses)} logged "
      f"losses are exactly bf16 values (fp32 losses almost never are)")
PY

if [ -f benchmarks/generation.py ]; then
  python3 benchmarks/generation.py --device cuda 2>&1 | tail -8
fi

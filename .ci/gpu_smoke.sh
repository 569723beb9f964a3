#!/usr/bin/env bash
# The GPU paths CI cannot run on CPU, on one GPU: bf16 at ZeRO-2 and ZeRO-3 and fp16 with loss
# scaling (FusedAdam, NCCL), each exported and verified; then a short benchmark against the
# plain loop. Needs the DeepSpeed wheel and its pure-Python dependencies in .whl/ (see
# ../shared/GPU.md) and a prepared data/stdlib. Writes logs and metrics under $OUT.
set -u
OUT=${OUT:-/tmp/gpu_smoke}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

run() {
  local name=$1; shift
  local start=$SECONDS
  timeout 300 deepspeed --num_gpus 1 --master_port $((29500 + RANDOM % 1000)) recipes/pretrain.py \
    --data data/stdlib --model gpt2-micro --seq_len 256 --max_steps 60 --log_interval 10 --eval_interval 30 \
    --output_dir "/tmp/runs/$name" --export_hf "/tmp/runs/${name}_hf" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - start)) s"
  cp "/tmp/runs/$name/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null
  grep -iE "step +60|val_loss|verif|export|error|Traceback" "$OUT/$name.log" | tail -6
}

run zero2_bf16 --deepspeed_config ds_configs/zero2.json
run zero3_bf16 --deepspeed_config ds_configs/zero3.json
run zero2_fp16 --deepspeed_config ds_configs/zero2_fp16.json
python3 tools/generate.py /tmp/runs/zero3_bf16_hf --prompt "def main(" --max_new_tokens 24 2>&1 | tail -3

start=$SECONDS
timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/benchmark.py --ranks 1 --model gpt2 --precision bf16 --seq_len 1024 \
  --global_batch 8 --stages 0 2 3 --max_steps 20 --markdown --output_dir /tmp/runs/bench \
  > "$OUT/benchmark.log" 2>&1
echo "== benchmark: exit $? in $((SECONDS - start)) s"
tail -25 "$OUT/benchmark.log"

#!/usr/bin/env bash
# The GPU check, in one go (about 5 minutes on one GPU): the recipe against the plain PyTorch loop
# and the minimal DeepSpeed loop at ZeRO 0-3, eager and compiled, with a torch.profiler summary
# of one step of each, and the host-sync audit of the recipe's step under
# torch.cuda.set_sync_debug_mode. GPT-2 124M's shape (vocabulary 8192), bf16, seq 1024,
# global batch 8, one rank.
#
#   bash .ci/gpu_bench.sh                 # from the repository root, on a machine with a GPU
#
# Wheels in .whl/ (DeepSpeed and what the GPU image lacks; see docs/deepspeed_and_launchers.md)
# are installed into /tmp/site first when present, for machines without network access.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=python3
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, deepspeed; print('torch', torch.__version__, 'DeepSpeed', deepspeed.__version__)" || exit 1

section() { printf '\n=== %s (%s)\n' "$1" "$(date +%T)"; }

section "data: the default corpus and its tokenizer"
$PY tools/prepare_data.py > "$OUT/prepare.log" 2>&1 || { tail -20 "$OUT/prepare.log"; exit 1; }
tail -1 "$OUT/prepare.log"

# MODEL, SEQ_LEN and STEPS change the shape (a dry run on a CPU: MODEL=gpt2-nano SEQ_LEN=32).
MODEL=${MODEL:-gpt2} SEQ_LEN=${SEQ_LEN:-1024} STEPS=${STEPS:-40}
SHAPE=(--model "$MODEL" --precision bf16 --ranks 1 --global_batch 8 --seq_len "$SEQ_LEN" --max_steps "$STEPS"
       --log_interval 10)

section "eager: plain loop, minimal DeepSpeed and recipe at ZeRO 0-3 (profile of step 25)"
timeout 240 $PY benchmarks/benchmark.py "${SHAPE[@]}" --stages 0 1 2 3 --profile_step 25 --markdown \
  --output_dir "$OUT/eager" 2>&1 | grep -v "^\[round\|^  step\|^  Model\|^  FLOPs\|^  minimal\|^  plain" | tail -60

section "compiled (torch.compile, inductor): plain loop, minimal DeepSpeed and recipe at ZeRO-0"
timeout 240 $PY benchmarks/benchmark.py "${SHAPE[@]}" --stages 0 --torch_compile --no-eager --markdown \
  --output_dir "$OUT/compiled" 2>&1 | grep -v "^\[round\|^  step\|^  Model\|^  FLOPs\|^  minimal\|^  plain" | tail -20

section "host syncs in the recipe's step (torch.cuda.set_sync_debug_mode), ZeRO-0 and ZeRO-2"
for stage in 0 2; do
  $PY - "$stage" "$OUT" <<'EOF'
import json, sys
stage, out = sys.argv[1], sys.argv[2]
cfg = json.load(open(f"ds_configs/zero{stage}.json"))
cfg.update(train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=1)
json.dump(cfg, open(f"{out}/audit_zero{stage}.json", "w"))
EOF
  timeout 120 $PY tests/scripts/sync_audit.py "$OUT/sync_zero$stage.json" recipes/pretrain.py \
    --deepspeed_config "$OUT/audit_zero$stage.json" --model "$MODEL" --seq_len "$SEQ_LEN" --max_steps 12 --log_interval 12 \
    --eval_interval 0 --eval_batches 1 --output_dir "$OUT/audit_run$stage" --overwrite > "$OUT/audit$stage.log" 2>&1 \
    || { tail -20 "$OUT/audit$stage.log"; continue; }
  $PY - "$OUT/sync_zero$stage.json" "$stage" <<'EOF'
import json, sys
audit = json.load(open(sys.argv[1]))
print(f"ZeRO-{sys.argv[2]}: {audit['steps']} steps audited")
for s in audit["syncs"]:
    print(f"  {s['owner']:12s} {s['calls']:5d} x {s['what']:34s} {s['site']}")
if not audit["syncs"]:
    print("  none")
EOF
done
section "done"

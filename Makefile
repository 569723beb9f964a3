# Two commands do everything: `make quickstart` (set up, prepare data, pretrain on 2 ranks)
# and `make test` (set up, run the whole test suite). PYTHON picks the interpreter/environment.
PYTHON ?= python3
RANKS ?= 2
# A free port for each launch, so two demos on one machine do not clash (PORT=29500 to pin one).
PORT ?= $(shell $(PYTHON) -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
# Without a GPU, name DeepSpeed's CPU accelerator: it then says nothing about having looked for one.
ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || echo DS_ACCELERATOR=cpu)
# The launcher as a module of $(PYTHON): its environment, activated or not.
LAUNCH = $(ACCELERATOR) $(PYTHON) -m deepspeed.launcher.runner --quiet --num_gpus $(RANKS) --master_port $(PORT)

.PHONY: install cluster-packages data quickstart finetune-demo lora-demo dpo-demo kto-demo grpo-demo test test-quick test-docs

install:
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-deps -e .

# What the cluster tests start (a one-host Slurm, mpirun): Debian's packages, as root. Without them
# `make test` skips those tests and says why.
CLUSTER_PACKAGES = slurm-wlm munge openmpi-bin
cluster-packages:
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(CLUSTER_PACKAGES) \
		|| (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(CLUSTER_PACKAGES))

data:
	$(PYTHON) tools/prepare_data.py

quickstart: install data
	$(LAUNCH) recipes/pretrain.py --deepspeed_config ds_configs/zero2.json \
		--data data/stdlib --model gpt2-nano --output_dir runs/quickstart --max_steps 200 --overwrite \
		--export_hf exported/quickstart

# Fine-tune the quickstart's exported model on the built-in demo task, export, and ask it something.
finetune-demo:
	$(LAUNCH) recipes/finetune.py --deepspeed_config ds_configs/zero3.json \
		--model_name_or_path exported/quickstart --data data/sft_demo/train.jsonl --output_dir runs/finetune \
		--max_steps 150 --overwrite --export_hf exported/finetuned
	$(PYTHON) tools/generate.py exported/finetuned --chat --temperature 0 --max_new_tokens 40 \
		--prompt "In Python's json module, what does dumps(obj, *, indent=None) do?"

# The same task with LoRA adapters on the frozen quickstart model: merged model and adapter exported.
lora-demo:
	$(LAUNCH) recipes/finetune.py --deepspeed_config ds_configs/zero3.json \
		--model_name_or_path exported/quickstart --data data/sft_demo/train.jsonl --output_dir runs/lora \
		--use_peft --lora_r 16 --max_steps 150 --overwrite --export_hf exported/lora_merged \
		--export_adapter exported/lora_adapter
	$(PYTHON) tools/generate.py exported/lora_merged --chat --temperature 0 --max_new_tokens 40 \
		--prompt "In Python's json module, what does dumps(obj, *, indent=None) do?"

# Preference tuning (DPO) of the fine-tuning demo's export on pairs built from the same task, with
# the NLL term on the chosen answers (--rpo_alpha) that keeps their likelihood from falling: held-out
# reward accuracy, margin and response loss at step 0 and after training are in runs/dpo/metrics.jsonl;
# then the exported model answers the fine-tuning demo's question.
dpo-demo:
	$(LAUNCH) recipes/dpo.py --deepspeed_config ds_configs/zero3_dpo.json \
		--model_name_or_path exported/finetuned --data data/dpo_demo/train.jsonl --output_dir runs/dpo \
		--beta 0.1 --rpo_alpha 1 --max_steps 100 --eval_interval 50 --eval_batches 19 --overwrite \
		--export_hf exported/dpo
	$(PYTHON) tools/generate.py exported/dpo --chat --temperature 0 --max_new_tokens 40 \
		--prompt "In Python's json module, what does dumps(obj, *, indent=None) do?"

# KTO from the fine-tuning demo's export on the DPO demo's pairs unpaired (each pair a desirable and an
# undesirable row): held-out reward margin and response loss at step 0 and after training are in
# runs/kto/metrics.jsonl; then the exported model answers the fine-tuning demo's question.
kto-demo:
	$(LAUNCH) recipes/kto.py --deepspeed_config ds_configs/zero3_dpo.json \
		--model_name_or_path exported/finetuned --data data/kto_demo/train.jsonl --output_dir runs/kto \
		--beta 0.1 --max_steps 100 --eval_interval 50 --eval_batches 38 --overwrite --export_hf exported/kto
	$(PYTHON) tools/generate.py exported/kto --chat --temperature 0 --max_new_tokens 40 \
		--prompt "In Python's json module, what does dumps(obj, *, indent=None) do?"

# GRPO from the fine-tuning demo's export: the demo's rewards (gpt_recipes/data/grpo_rewards.py) score
# answers against the function's docstring and its form; the held-out mean reward (greedy) at step 0
# and at the end is in the log and runs/grpo/metrics.jsonl; then the exported model answers.
grpo-demo:
	$(LAUNCH) recipes/grpo.py --deepspeed_config ds_configs/zero3_grpo.json \
		--model_name_or_path exported/finetuned --data data/grpo_demo/train.jsonl --output_dir runs/grpo \
		--num_generations 4 --max_completion_length 24 --max_steps 120 --eval_interval 40 --eval_batches 16 \
		--overwrite --export_hf exported/grpo
	$(PYTHON) tools/generate.py exported/grpo --chat --temperature 0 --max_new_tokens 40 \
		--prompt "In Python's json module, what does dumps(obj, *, indent=None) do?"

test: install
	$(PYTHON) -m pytest tests --durations=30

test-quick:
	$(PYTHON) -m pytest tests -m "not slow"

# Every recipe command README.md and docs/ show, run as written through its first optimizer step.
test-docs: install
	$(PYTHON) -m pytest tests/test_docs.py --docs-walk -m docs_walk -s

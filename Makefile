# Two commands do everything: `make quickstart` (set up, prepare data, pretrain on 2 ranks)
# and `make test` (set up, run the whole test suite). PYTHON picks the interpreter/environment.
PYTHON ?= python3
RANKS ?= 2

.PHONY: install data quickstart test test-quick

install:
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-deps -e .

data:
	$(PYTHON) tools/prepare_data.py

quickstart: install data
	deepspeed --num_gpus $(RANKS) recipes/pretrain.py --deepspeed_config ds_configs/zero2.json \
		--data data/stdlib --model gpt2-nano --output_dir runs/quickstart --max_steps 200 --overwrite \
		--export_hf exported/quickstart

test: install
	$(PYTHON) -m pytest tests

test-quick:
	$(PYTHON) -m pytest tests -m "not slow"

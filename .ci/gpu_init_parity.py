"""The same seed gives the same initial weights at ZeRO-2 (built unpartitioned, on the GPU when
there is one) and ZeRO-3 (built partitioned inside zero.Init). bf16 configs make zero.Init store
bf16 weights, so weights are compared after rounding to bf16. Run: python3 .ci/gpu_init_parity.py"""
import json

import deepspeed
import torch

from gpt_recipes.models.causal_lm import build_config, build_model
from gpt_recipes.parallel import distributed

distributed.init(distributed.environment())
config = build_config("gpt2-micro", vocab_size=8192, eos_token_id=0)
weights = {}
for name, stage, device in (("ZeRO-2", 2, None), ("ZeRO-2 built on the CPU", 2, "cpu"), ("ZeRO-3", 3, None)):
    cfg = json.load(open(f"ds_configs/zero{stage}.json"))
    distributed.seed_everything(1234)
    model = build_model(config, cfg, device=device)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        weights[name] = {n: p.detach().to(torch.bfloat16).float().cpu().clone() for n, p in model.named_parameters()}


def worst(a: str, b: str) -> float:
    return max((weights[a][n] - weights[b][n]).abs().max().item() for n in weights[a])


where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
for other in ("ZeRO-2", "ZeRO-2 built on the CPU"):
    print(f"{other} vs ZeRO-3 initial weights (as bf16) on {where}: max |difference| {worst(other, 'ZeRO-3')}")
assert worst("ZeRO-2", "ZeRO-3") == 0, "initial weights differ"

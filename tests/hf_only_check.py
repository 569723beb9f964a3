"""Load an exported folder with nothing but transformers, in its own process, and report what it computes.

usage: python hf_only_check.py EXPORT_DIR EXPORT_CHECK_PT   (prints one JSON line)
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

folder, check_file = sys.argv[1], sys.argv[2]
check = torch.load(check_file)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
with torch.no_grad():
    logits = model(input_ids=check["input_ids"]).logits.float()
    prompt_len = check["generated"].shape[1] - 16
    generated = model.generate(check["input_ids"][:1, :prompt_len], max_new_tokens=16, min_new_tokens=16,
                               do_sample=False)
text = pipeline("text-generation", model=folder)("def main(", max_new_tokens=8, do_sample=False)[0]["generated_text"]
print(json.dumps({
    "max_logit_diff": (logits - check["logits"]).abs().max().item(),
    "same_greedy_tokens": torch.equal(generated, check["generated"]),
    "dtype": str(model.dtype),
    "class": type(model).__name__,
    "pipeline_text": text,
    "vocab": len(tokenizer),
    "foreign_modules": sorted(m for m in ("gpt_recipes", "deepspeed") if m in sys.modules),
}))

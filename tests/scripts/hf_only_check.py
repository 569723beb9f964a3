"""Load an exported folder with nothing but transformers (and peft for an adapter), in a process of
its own, and report what it computes.

usage: python hf_only_check.py EXPORT_DIR EXPORT_CHECK_PT [--adapter]   (prints one JSON line)
       python hf_only_check.py --serve   (reads such requests as JSON lines on stdin, answers each with
                                          one JSON line: the tests keep one such process for a session)

With --adapter, EXPORT_DIR is a LoRA adapter: its base (named in adapter_config.json) is loaded
at the trained engine's dtype and peft.PeftModel.from_pretrained puts the adapter on it.
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline


def report(folder: str, check_file: str, adapter: bool) -> dict:
    check = torch.load(check_file)
    if adapter:
        from peft import PeftConfig, PeftModel

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[check["dtype"]]
        base = AutoModelForCausalLM.from_pretrained(PeftConfig.from_pretrained(folder).base_model_name_or_path,
                                                    dtype=dtype)
        model = PeftModel.from_pretrained(base, folder).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        logits = model(input_ids=check["input_ids"]).logits.float()
        prompt_len = check["generated"].shape[1] - 16
        generated = model.generate(input_ids=check["input_ids"][:1, :prompt_len], max_new_tokens=16,
                                   min_new_tokens=16, do_sample=False)
    text = pipeline("text-generation", model=model, tokenizer=tokenizer)("def main(", max_new_tokens=8,
                                                                         do_sample=False)[0]["generated_text"]
    return {
        "max_logit_diff": (logits - check["logits"]).abs().max().item(),
        "same_greedy_tokens": torch.equal(generated, check["generated"]),
        "dtype": str(model.dtype),
        "class": type(model).__name__,
        "pipeline_text": text,
        "vocab": len(tokenizer),
        "foreign_modules": sorted(m for m in ("gpt_recipes", "deepspeed") if m in sys.modules),
    }


if sys.argv[1:] == ["--serve"]:
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = report(request["folder"], request["check"], request["adapter"])
        except Exception as err:  # said to the test, which fails on it; the next request still gets an answer
            answer = {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps(answer), flush=True)
else:
    print(json.dumps(report(sys.argv[1], sys.argv[2], "--adapter" in sys.argv[3:])))

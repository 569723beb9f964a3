#!/usr/bin/env python
"""Train a Hugging Face causal LM with GRPO (group-relative policy optimisation) against reward functions.

    deepspeed --num_gpus 2 recipes/grpo.py --deepspeed_config ds_configs/zero3_grpo.json \\
        --model_name_or_path exported/finetuned --data data/grpo_demo/train.jsonl --output_dir runs/grpo \\
        --reward_funcs gpt_recipes.data.grpo_rewards:reference_overlap my_rewards.py:is_valid_json \\
        --num_generations 8 --max_steps 60 --export_hf exported/grpo

Each step takes global batch / G prompts; every rank samples G completions for its share from the
live model (under ZeRO-3, gathering the partitioned layers as it goes), the reward functions
score them, advantages are normalised within each prompt's group, and the clipped policy loss
is taken over completion tokens. GRPO's own flags take TRL's names (--num_generations,
--max_completion_length, --temperature, --top_p, --beta, --epsilon, --loss_type,
--scale_rewards, --reward_funcs, --reward_weights); everything else is as for the other
recipes, LoRA (--use_peft) included. Reward functions have TRL's signature,
f(prompts, completions, **columns) -> list[float | None]: the rows' other columns arrive as
keyword lists. Evaluation is the held-out prompts' mean reward, greedily (val_reward); the best
checkpoint is the most rewarded.
"""

from gpt_recipes.args import parse_args
from gpt_recipes.data import sft
from gpt_recipes.data.sft_demo import ensure_prompt_demo
from gpt_recipes.errors import UserError, cli_entry
from gpt_recipes.pretrained import check_starting_model
from gpt_recipes.runner import Job, execute, make_batches, plan_run
from gpt_recipes.train import grpo


@cli_entry
def main() -> None:
    args = parse_args(grpo.GRPOArgs, description=__doc__)

    # 1. Check every input before any rank starts: flags, DeepSpeed JSON, output folders, model,
    #    GRPO's settings and the reward functions (imported, signatures checked).
    run = plan_run(args)
    args.check_batch(run.batch)
    rewards = grpo.load_reward_funcs(args.reward_funcs, args.reward_weights)
    start = check_starting_model(args, run)
    max_prompt = start.seq_len - args.max_completion_length
    if max_prompt < 1:
        raise UserError(f"--max_completion_length {args.max_completion_length} leaves no room for a prompt in the "
                        f"model's {start.seq_len} positions")

    # 2. ... and the prompts, rendered with the chat template up to the answer, in the global batch
    #    order (each step's prompts the same for any layout of ranks).
    ensure_prompt_demo(args.data)
    train_rows, val_rows = sft.read_split(args.data, args.val_data, args.val_fraction)
    train, val = (grpo.Prompts(rows, start.tokenizer, max_prompt) for rows in (train_rows, val_rows))
    per_step = args.prompts_per_step(run.batch)
    run.say(f"Prompts: {len(train)} for training, {len(val)} held out; {per_step} prompts x {args.num_generations} "
            f"completions per step (global batch {run.batch.global_batch})")
    batches = make_batches(args, run, train, val, args.val_data or args.data, per_step=per_step)

    # 3. Start the ranks, load the starting model (under ZeRO-3 each rank only its partition),
    #    generate, score and train at each step.
    job = Job("grpo", grpo.GRPO(args, rewards, start), start.config, start.tokenizer, start.seq_len,
              start.builder(run, args.seed), weights=start.weights, data_fingerprint=sft.rows_digest(train_rows),
              data={"train": args.data, "val": args.val_data, "train_prompts": len(train), "val_prompts": len(val)})
    execute(args, run, job, batches)


if __name__ == "__main__":
    main()

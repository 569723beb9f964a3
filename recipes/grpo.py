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
keyword lists. Evaluation is the held-out prompts' mean reward, greedily (val_reward; val_loss
is its negative, so the best checkpoint is the most rewarded).
"""

from dataclasses import asdict

from gpt_recipes.args import GRPOArgs, parse_args
from gpt_recipes.data import sft
from gpt_recipes.data.sft_demo import ensure_prompt_demo
from gpt_recipes.data.tokens import GlobalBatchOrder, eval_micro_batches
from gpt_recipes.ds_config import BatchPlan
from gpt_recipes.errors import UserError, cli_entry
from gpt_recipes.pretrained import check_starting_model
from gpt_recipes.runner import Job, execute, plan_epochs, plan_run
from gpt_recipes.train import grpo
from gpt_recipes.train.loop import Batches


@cli_entry
def main() -> None:
    args = parse_args(GRPOArgs, description=__doc__)

    # 1. Check every input before any rank starts: flags, DeepSpeed JSON, output folders, model,
    #    GRPO's settings and the reward functions (imported, signatures checked).
    run = plan_run(args)
    settings = grpo.GRPOSettings(args.num_generations, args.max_completion_length, args.temperature, args.top_p,
                                 args.beta, args.epsilon, args.loss_type, args.scale_rewards)
    settings.check(run.batch)
    rewards = grpo.load_reward_funcs(args.reward_funcs, args.reward_weights)
    start = check_starting_model(args, run, args.model_name_or_path, pad_to_multiple_of=1)
    max_prompt = start.seq_len - args.max_completion_length
    if max_prompt < 1:
        raise UserError(f"--max_completion_length {args.max_completion_length} leaves no room for a prompt in the "
                        f"model's {start.seq_len} positions")

    # 2. ... and the prompts, rendered with the chat template up to the answer.
    ensure_prompt_demo(args.data)
    train_rows, val_rows = sft.read_split(args.data, args.val_data, args.val_fraction)
    train, val = (grpo.Prompts(rows, start.tokenizer, max_prompt) for rows in (train_rows, val_rows))
    G = settings.num_generations
    run.say(f"Prompts: {len(train)} for training, {len(val)} held out; {settings.prompts_per_step(run.batch)} "
            f"prompts x {G} completions per step (global batch {run.batch.global_batch})")
    batches = prompt_batches(args, run, train, val, settings)

    # 3. Start the ranks, load the starting model (under ZeRO-3 each rank only its partition),
    #    generate, score and train at each step.
    def make_step(engine, batches, stage):
        # The KL term's starting model: under LoRA the base with the adapters disabled, else a frozen copy.
        reference = None
        if settings.beta > 0 and start.adapter is None:
            reference = grpo.reference_engine(start.builder(run, args.seed), run.ds_cfg)
        kl = ("the base with the adapters disabled" if start.adapter else "a frozen copy of the starting model"
              + (", partitioned" if stage == 3 else ""))
        run.say(f"GRPO: {settings.loss_type} loss, epsilon {settings.epsilon:g}, beta {settings.beta:g}"
                + (f" (KL to {kl})" if settings.beta > 0 else " (no KL term)")
                + f"; rewards: {', '.join(f'{r.name} x {r.weight:g}' for r in rewards)}; sampling at temperature "
                f"{settings.temperature:g}, top_p {settings.top_p:g}, up to {settings.max_completion_length} tokens")
        return grpo.GRPOStep(batches, run.batch, run.env, settings, rewards, start.tokenizer, start.pad_id, args.seed,
                             zero3=stage == 3, reference=reference)

    job = Job("grpo", start.config, start.tokenizer, start.seq_len, train, val, start.builder(run, args.seed),
              adapter=start.adapter, make_step=make_step, data_fingerprint=sft.rows_digest(train_rows),
              record={"data": {"train": args.data, "val": args.val_data, "train_prompts": len(train),
                               "val_prompts": len(val)}, "grpo": asdict(settings),
                      "reward_funcs": [{"name": r.name, "weight": r.weight} for r in rewards]})
    execute(args, run, job, batches)


def prompt_batches(args: GRPOArgs, run, train: grpo.Prompts, val: grpo.Prompts,
                   settings: grpo.GRPOSettings) -> Batches:
    """The prompts of each step in the global batch order (the same for any layout of ranks), and
    this rank's held-out prompts in micro-batches."""
    G = settings.num_generations
    plan_epochs(args, run, len(train) * G)  # --num_epochs counts passes over the prompts
    per_step = settings.prompts_per_step(run.batch)
    order = GlobalBatchOrder(len(train), BatchPlan(micro_batch=per_step, grad_accum=1, world_size=1), args.seed)
    plan = run.batch
    val_batches = eval_micro_batches(len(val), args.eval_batches * per_step, plan.micro_batch,
                                     plan.data_rank(run.env.rank), plan.world_size)
    if not val_batches:
        raise UserError(f"the held-out prompts are fewer than the data-parallel ranks ({plan.world_size})")
    return Batches(train, order, val, val_batches)


if __name__ == "__main__":
    main()

"""What the loop says of the best checkpoint, for a minimised and a maximised metric."""

from gpt_recipes.checkpoints.paths import BestMetric
from gpt_recipes.train.loop import best_note

REWARD = BestMetric("val_reward", higher_is_better=True)


def test_a_save_names_the_best_saved_checkpoint_and_a_better_evaluation_without_one():
    # GRPO's demo: evaluations at 0, 40, 80, 120 (step 80 highest), one checkpoint, at step 120.
    line = best_note(REWARD, True, (1.21, 80), 40)
    assert line == (" (the best saved checkpoint by highest val_reward: best names it); step 80 evaluated best "
                    "(val_reward 1.21) but has no checkpoint: --save_interval 40 saves one at each evaluation")
    assert best_note(BestMetric(), True, None, 50) == " (the best saved checkpoint by lowest val_loss: best names it)"
    assert best_note(BestMetric(), False, None, 50) == ""


def test_which_value_is_better_follows_the_metric():
    assert REWARD.better(1.2, 1.1) and not REWARD.better(1.0, 1.1)
    assert BestMetric().better(1.0, 1.1) and not BestMetric().better(1.2, 1.1)
    assert REWARD.better(0.5, None) and REWARD.better(0.5, float("nan"))

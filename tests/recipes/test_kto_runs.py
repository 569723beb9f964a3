"""KTO on real ranks at ZeRO-3 (fp32): 2 ranks x 2 rows against 1 rank x 4 (losses, gradient norms, the
KL estimate), the starting point, the export checked against the engine, exact resume after SIGTERM
reusing the stored reference, and bad rows stopped in one line before any rank starts."""

import json

import pytest

from gpt_recipes.data.kto_demo import build_unpaired
from gpt_recipes.data.sft_demo import build_preferences
from tests.helpers import ds_json, hf_only, launch, read_metrics, run_here

pytestmark = pytest.mark.slow

STEPS = 6
PARITY_TOL = 2e-5  # fp32 without clipping: summation order only


@pytest.fixture(scope="module")
def rows(tmp_path_factory, demo):
    """96 training and 48 held-out rows of the demo KTO set (the demo's pairs, unpaired)."""
    out = tmp_path_factory.mktemp("kto_rows")
    build_preferences(demo, out / "pairs")
    build_unpaired(out / "pairs", out / "all")
    for split, n in (("train", 96), ("val", 48)):
        lines = (out / "all" / f"{split}.jsonl").read_text().splitlines()[:n]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return out


def kto_args(cfg: str, base, rows, out, *extra: str) -> list[str]:
    return ["--deepspeed_config", cfg, "--model_name_or_path", str(base), "--data", str(rows / "train.jsonl"),
            "--val_data", str(rows / "val.jsonl"), "--output_dir", str(out), "--max_steps", str(STEPS),
            "--log_interval", "1", "--eval_interval", "3", "--eval_batches", "4", "--save_interval", "2",
            "--truncate", "--beta", "0.5", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pretrained, rows):
    tmp = tmp_path_factory.mktemp("kto")
    one = launch("recipes/kto.py", kto_args(ds_json(tmp, 3, micro=4, fp32=True), pretrained, rows, tmp / "one"),
                 ranks=1)
    two = launch("recipes/kto.py", kto_args(ds_json(tmp, 3, micro=2, fp32=True), pretrained, rows, tmp / "two",
                                            "--export_hf", str(tmp / "hf")))
    return tmp, one, two


def test_two_ranks_train_as_one_rank(runs):
    tmp, _, two = runs
    one, two_lines = read_metrics(tmp / "one")[0], read_metrics(tmp / "two")[0]
    assert [r["step"] for r in one] == [r["step"] for r in two_lines] == list(range(1, STEPS + 1))
    worst = 0.0
    for a, b in zip(one, two_lines):
        worst = max(worst, abs(a["loss"] - b["loss"]), abs(a["kl"] - b["kl"]),
                    abs(a["grad_norm"] - b["grad_norm"]) / a["grad_norm"])
    assert worst <= PARITY_TOL, worst
    assert one[-1]["kl"] > 0 and one[-1]["rewards/chosen"] != 0.0, one[-1]  # the policy has moved
    print(f"KTO parity, 2 ranks x 2 against 1 rank x 4 at ZeRO-3 (loss, kl, relative grad norm): {worst:.2e}")


def test_the_start_is_the_reference_and_the_margin_grows(runs):
    tmp, one, two = runs
    evals = read_metrics(tmp / "two")[1]
    start, end = evals[0], evals[-1]
    # At step 0 the policy is the reference: every reward and the KL estimate are 0, each row's loss 1/2.
    assert start["step"] == 0 and abs(start["val_loss"] - 0.5) < 1e-6, start
    assert abs(start["val_rewards/margins"]) < 1e-6 and start["val_kl"] == 0.0, start
    assert end["val_rewards/margins"] > start["val_rewards/margins"], (start, end)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl",
                "nll_chosen"):
        assert f"val_{key}" in end, key
    assert "Reference log-probabilities: one pass of the starting model over 96 + 48 rows" in two.stdout
    assert "reference point is the KL estimate" in two.stdout and "| kl " in two.stdout
    config = json.loads((tmp / "two" / "config.json").read_text())
    assert config["objective"] == "kto" and config["kto"] == {"beta": 0.5, "desirable_weight": 1.0,
                                                               "undesirable_weight": 1.0}


def test_the_export_reproduces_the_engine(runs):
    tmp, _, _ = runs
    record = [json.loads(line) for line in (tmp / "two" / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["export_same_greedy_tokens"] and record["export_logit_diff_vs_engine"] <= 1e-4, record
    seen = hf_only(tmp / "hf", tmp / "two" / "export_check.pt")  # plain transformers, in a process of its own
    assert seen["same_greedy_tokens"] and seen["max_logit_diff"] <= 1e-4 and not seen["foreign_modules"], seen


def test_a_stopped_run_resumes_exactly(runs, pretrained, rows, tmp_path):
    tmp, _, _ = runs
    out = tmp_path / "part"
    args = kto_args(ds_json(tmp_path, 3, micro=2, fp32=True), pretrained, rows, out)
    proc = launch("recipes/kto.py", args, check=False, fault="sigterm@2:1")
    assert proc.returncode == 143, proc.stderr[-3000:]
    resumed = launch("recipes/kto.py", [*args, "--resume"])
    assert "Reference log-probabilities: reusing" in resumed.stdout
    full, part = read_metrics(tmp / "two")[0], read_metrics(out)[0]
    assert [r["step"] for r in part] == list(range(1, STEPS + 1))
    for a, b in zip(full, part):
        for key in ("loss", "kl", "rewards/margins"):
            assert abs(a[key] - b[key]) <= 1e-6, (key, a, b)


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "q", "completion": "a"}, "row 2: a KTO row needs 'prompt', 'completion' and 'label' (missing label)"),
    ({"prompt": "q", "completion": "a", "label": "yes"}, "row 2: 'label' must be true (a desirable completion) or "
                                                         "false (an undesirable one), not 'yes'"),
    (None, "every row is desirable (label true); KTO needs rows of both kinds"),
])
def test_bad_rows_stop_in_one_line(pretrained, rows, tmp_path, bad, message):
    data = tmp_path / "bad.jsonl"
    good = [json.loads(line) for line in (rows / "train.jsonl").read_text().splitlines()]
    desirable = [r for r in good if r["label"]][:3]
    data.write_text("\n".join(json.dumps(r) for r in (desirable if bad is None else [desirable[0], bad, *good])) + "\n")
    args = kto_args(ds_json(tmp_path, 3, micro=2), pretrained, rows, tmp_path / "out")
    args[args.index("--data") + 1] = str(data)
    proc = run_here("recipes/kto.py", args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()

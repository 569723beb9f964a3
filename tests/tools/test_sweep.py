"""tools/sweep_configs.py: one short run per config, then the comparison."""

import json

import pytest

from tests.helpers import REPO, ds_json, load_script, run_python


def test_rounds_run_the_configs_in_turn_and_a_spread_wider_than_the_gaps_is_said():
    sweep = load_script("tools/sweep_configs.py")
    assert [(k, c.name) for k, c in sweep.run_order([REPO / "a.json", REPO / "b.json"], 2)] == \
        [(1, "a.json"), (1, "b.json"), (2, "a.json"), (2, "b.json")]
    noisy = sweep.spread_lines({"zero0": [100.0, 120.0, 110.0], "zero3": [115.0, 118.0, 116.0]})
    assert noisy[1] == "  zero0: 110 [100 - 120], spread 18.2%"
    assert noisy[-1].startswith("note: the spread within a config (up to 18.2%) is larger than the smallest "
                                "difference between configs (5.5%)")
    assert not any(line.startswith("note") for line in sweep.spread_lines({"a": [100.0, 101.0], "b": [150.0, 152.0]}))
    assert sweep.spread_lines({"a": [100.0], "b": [150.0]})[-1].startswith("note: one round per config measures no "
                                                                           "spread")



def test_models_multiply_the_runs_of_a_round():
    sweep = load_script("tools/sweep_configs.py")
    a, ep = REPO / "zero2.json", REPO / "zero2_ep2.json"
    assert sweep.entries([a], []) == [("zero2", a, [])]
    assert [(name, args) for name, _, args in sweep.entries([a, ep], ["llama-nano", "runs/m.json"])] == [
        ("zero2_llama-nano", ["--model", "llama-nano"]), ("zero2_m", ["--model", "runs/m.json"]),
        ("zero2_ep2_llama-nano", ["--model", "llama-nano"]), ("zero2_ep2_m", ["--model", "runs/m.json"])]


@pytest.mark.slow
def test_sweep_runs_each_config_and_summarises(tmp_path, tiny_data, tiny_model):
    configs = [ds_json(tmp_path, 0, micro=2, fp32=True, name="_a"), ds_json(tmp_path, 2, micro=2, name="_b")]
    broken = tmp_path / "broken.json"
    broken.write_text('{"train_micro_batch_size_per_gpu": 2,,}')
    out = tmp_path / "sweep"
    proc = run_python("tools/sweep_configs.py", [*configs, str(broken), "--output_dir", str(out), "--ranks", "1",
                                                 "--max_steps", "4", "--log_interval", "1", "--repeats", "1", "--",
                                                 "--data", str(tiny_data), "--model", str(tiny_model),
                                                 "--eval_batches", "1"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    names = [p.split("/")[-1][:-5] for p in configs]
    started = [line.split("] ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("[")]
    assert [s.split("/")[-1] for s in started] == [f"{n}.json" for n in sorted([*names, "broken"])]
    table = proc.stdout[proc.stdout.index("tokens/s (median)"):]
    for name in names:
        assert any(line.startswith(name) for line in table.splitlines())
        lines = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in lines) == 4
        assert f"  {name}: " in proc.stdout  # its median over the rounds
    # Rounds and their spread: test_rounds_run_the_configs_in_turn_and_a_spread_wider_than_the_gaps_is_said.
    assert "tokens/s over 1 interleaved round(s)" in proc.stdout
    assert "broken (" in proc.stdout and "failed (exit 2)" in proc.stdout
    assert (out / "loss_vs_tokens.png").stat().st_size > 0 and (out / "tokens_per_sec.png").stat().st_size > 0

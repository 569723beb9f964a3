"""tools/sweep_configs.py: one short run per config, then the comparison."""

import json

import pytest

from tests.helpers import ds_json, run_python

pytestmark = pytest.mark.slow


def test_sweep_runs_each_config_and_summarises(tmp_path, tiny_data, tiny_model):
    configs = [ds_json(tmp_path, 0, micro=2, fp32=True, name="_a"), ds_json(tmp_path, 2, micro=2, name="_b")]
    broken = tmp_path / "broken.json"
    broken.write_text('{"train_micro_batch_size_per_gpu": 2,,}')
    out = tmp_path / "sweep"
    proc = run_python("tools/sweep_configs.py", [*configs, str(broken), "--output_dir", str(out), "--ranks", "1",
                                                 "--max_steps", "4", "--log_interval", "1", "--",
                                                 "--data", str(tiny_data), "--model", str(tiny_model),
                                                 "--eval_batches", "1"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    names = [p.split("/")[-1][:-5] for p in configs]
    table = proc.stdout[proc.stdout.index("tokens/s (median)"):]
    for name in names:
        assert any(line.startswith(name) for line in table.splitlines())
        lines = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in lines) == 4
    assert "broken.json: failed (exit 2)" in proc.stdout
    assert (out / "loss_vs_tokens.png").stat().st_size > 0 and (out / "tokens_per_sec.png").stat().st_size > 0

"""The benchmark's reference: benchmarks/plain_pytorch_loop.py."""

import pytest

from tests.helpers import read_metrics, run_python


@pytest.mark.slow
def test_plain_loop_with_and_without_the_fused_loss(tmp_path, tiny_data, tiny_model):
    """The reference loop trains the same with either loss."""
    losses = {}
    for name, extra in (("fused", []), ("plain", ["--no-fused_loss"])):
        out = tmp_path / name
        proc = run_python("benchmarks/plain_pytorch_loop.py", ["--data", str(tiny_data), "--model", str(tiny_model),
                                                          "--seq_len", "64", "--global_batch", "4", "--max_steps", "6",
                                                          "--log_interval", "1", "--output_dir", str(out), *extra])
        assert proc.returncode == 0, proc.stderr[-2000:]
        train, _ = read_metrics(out)
        assert [r["step"] for r in train] == list(range(1, 7)) and all(r["tokens_per_sec"] > 0 for r in train)
        losses[name] = [r["loss"] for r in train]
    assert losses["fused"] == pytest.approx(losses["plain"], abs=1e-5)
    assert losses["fused"][-1] < losses["fused"][0] - 0.1  # it learns

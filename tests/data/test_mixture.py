"""Weighted mixtures of data folders: shares, epochs per source, layout independence, checks."""


import numpy as np
import pytest

from gpt_recipes.data.mixture import MixedWindows, MixtureOrder, check_sources
from gpt_recipes.data.tokens import DataMeta
from gpt_recipes.ds_config import BatchPlan
from gpt_recipes.errors import UserError


class Split:
    """A stand-in for PackedTokens: n windows of seq_len 4 whose tokens name their window."""

    def __init__(self, n: int, base: int):
        self.seq_len = 4
        self.tokens = np.repeat(np.arange(base, base + n + 1), 4)[: n * 4 + 1]
        self.n = n

    def __len__(self):
        return self.n


WEIGHTS = [0.5, 0.3, 0.2]


def _order(plan, sizes=(50, 1000, 7), events=None):
    windows = MixedWindows([Split(n, 1000 * k) for k, n in enumerate(sizes)], ["a", "b", "c"])
    return MixtureOrder(windows, WEIGHTS, plan, seed=3, on_new_epoch=lambda *e: events.append(e) if events is not None
                        else None), windows


def test_shares_follow_the_weights_within_one_sample_at_every_step():
    order, _ = _order(BatchPlan(3, 1, 2))
    for step in range(400):
        taken = order.taken_before(step)
        assert taken.sum() == 6 * step
        assert np.abs(taken - np.array(WEIGHTS) * 6 * step).max() < 1.0
    assert order.source_tokens(400) == {"a": 1200 * 4, "b": 720 * 4, "c": 480 * 4}


def test_each_source_sees_every_window_once_per_epoch_and_says_when_it_starts_again():
    events = []
    order, windows = _order(BatchPlan(3, 1, 2), events=events)
    batches = [order.global_batch(s) for s in range(100)]
    c = windows.offsets[2]
    for step in range(1, 100):
        taken = order.taken_before(step)[2]
        if taken % 7 == 0:  # whole epochs of source c: each of its 7 windows seen equally often
            seen = np.concatenate([b[b >= c] for b in batches[:step]])
            assert np.bincount(seen - c, minlength=7).tolist() == [taken // 7] * 7
    assert not np.array_equal(order._permutation(2, 0), order._permutation(2, 1))  # re-permuted each epoch
    # (source, epoch, step): said once, at the step whose batch starts the epoch
    start_c = next(s for s in range(100) if order.taken_before(s + 1)[2] > 7)
    start_a = next(s for s in range(100) if order.taken_before(s + 1)[0] > 50)
    assert ("c", 1, start_c) in events and ("a", 1, start_a) in events
    assert len(events) == len(set(events))


def test_global_batches_do_not_depend_on_the_layout():
    reference, _ = _order(BatchPlan(4, 1, 1))
    for plan in (BatchPlan(2, 1, 2), BatchPlan(1, 2, 2), BatchPlan(1, 4, 1)):
        order, _ = _order(plan)
        for step in (0, 1, 7, 30):
            assert np.array_equal(order.global_batch(step), reference.global_batch(step))
            parts = [order.micro_batch(step, r, m) for r in range(plan.world_size) for m in range(plan.grad_accum)]
            assert np.array_equal(np.concatenate(parts), reference.global_batch(step))
    resumed, _ = _order(BatchPlan(2, 1, 2))
    assert np.array_equal(resumed.global_batch(57), reference.global_batch(57))  # straight to step 57


def test_windows_come_from_their_source():
    _, windows = _order(BatchPlan(4, 1, 1))
    inputs, targets = windows.batch(np.array([3, windows.offsets[1] + 5, windows.offsets[2]]))
    assert inputs["input_ids"][:, 0].tolist() == [3, 1005, 2000]
    assert [windows.source_of(i) for i in (0, 49, 50, 1049, 1050)] == [0, 0, 1, 1, 2]


def _folder(tmp_path, name, tokenizer_text):
    root = tmp_path / name
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "tokenizer.json").write_text(tokenizer_text)
    return DataMeta(root, {"tokenizer_source": f"tokenizer {tokenizer_text}"})


def test_mixture_checks(tmp_path):
    a, b = _folder(tmp_path, "a", "one"), _folder(tmp_path, "b", "one")
    sources, weights = check_sources([a, b], [3, 1])
    assert [s.name for s in sources] == ["a", "b"] and weights == [0.75, 0.25]
    assert check_sources([a, b], [])[1] == [0.5, 0.5]
    with pytest.raises(UserError, match="different tokenizers"):
        check_sources([a, _folder(tmp_path, "c", "two")], [])
    with pytest.raises(UserError, match="must all be positive, got 0"):
        check_sources([a, b], [1, 0])
    with pytest.raises(UserError, match="2 weights for 3 --data folders"):
        check_sources([a, b, a], [1, 1])
    with pytest.raises(UserError, match="share the name 'a'"):
        check_sources([a, _folder(tmp_path / "x", "a", "one")], [])


@pytest.fixture(scope="module")
def library_source(tmp_path_factory, tiny_data):
    """A second source, other modules of the standard library, prepared with tiny_data's tokenizer."""
    from gpt_recipes.data.prepare import PrepareOptions, prepare
    from gpt_recipes.data.sources import default_corpus_files

    files = [str(p) for p in default_corpus_files() if p.parent.name in ("unittest", "importlib")]
    out = tmp_path_factory.mktemp("mixture") / "library"
    prepare(PrepareOptions(inputs=files, output=str(out), tokenizer=str(tiny_data / "tokenizer"), val_fraction=0.1,
                           num_proc=1))
    return out


@pytest.mark.slow
def test_a_mixture_trains_alike_on_any_layout_and_resumes_exactly(tmp_path, tiny_data, tiny_model, library_source):
    from tests.helpers import ds_json, launch, read_metrics, run_python

    def args(cfg, out):
        return ["--deepspeed_config", cfg, "--data", str(tiny_data), str(library_source), "--data_weights", "3", "1",
                "--model", str(tiny_model), "--output_dir", str(out), "--max_steps", "8", "--seq_len", "64",
                "--log_interval", "1", "--eval_interval", "4", "--save_interval", "4"]

    proc = run_python("recipes/pretrain.py", args(ds_json(tmp_path, 2, 4, fp32=True), tmp_path / "1x4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two_by_two = args(ds_json(tmp_path, 2, 2, fp32=True), tmp_path / "2x2")
    launch("recipes/pretrain.py", two_by_two)
    (ref_train, ref_evals), (train, evals) = read_metrics(tmp_path / "1x4"), read_metrics(tmp_path / "2x2")
    for a, b in zip(ref_train, train):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and a["source_tokens"] == b["source_tokens"], (a, b)
    for a, b in zip(ref_evals, evals):
        assert a["val_loss_by_source"].keys() == {tiny_data.name, library_source.name}
        for name, loss in a["val_loss_by_source"].items():
            assert abs(loss - b["val_loss_by_source"][name]) < 1e-5
    shares = train[-1]["source_tokens"]
    assert sum(shares.values()) == train[-1]["tokens"] == 8 * 4 * 64
    assert abs(shares[tiny_data.name] - 0.75 * train[-1]["tokens"]) < 64  # within one window
    assert ref_train[-1]["loss"] < ref_train[0]["loss"]

    resumed = args(ds_json(tmp_path, 2, 2, fp32=True), tmp_path / "resumed")
    stopped = launch("recipes/pretrain.py", resumed, check=False, fault="sigterm@4:1")
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    launch("recipes/pretrain.py", resumed + ["--resume"])
    for a, b in zip(train[4:], read_metrics(tmp_path / "resumed")[0][4:]):
        assert a["loss"] == b["loss"] and a["source_tokens"] == b["source_tokens"], (a, b)


def test_mixture_flags_are_checked_before_training(tmp_path, tiny_data):
    from tests.helpers import run_here

    proc = run_here("recipes/pretrain.py", ["--data", str(tiny_data), "--data_weights", "2",
                                              "--output_dir", str(tmp_path / "out")])
    assert proc.returncode == 2 and "--data_weights weighs several --data folders" in proc.stderr, proc.stderr

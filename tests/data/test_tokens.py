import numpy as np
import pytest
import torch

from gpt_recipes.data.tokens import GlobalBatchOrder, PackedTokens, eval_micro_batches, read_meta, token_dtype
from gpt_recipes.ds_config import BatchPlan
from gpt_recipes.errors import UserError


def test_token_dtype_fits_vocabulary():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_windows_are_contiguous_and_shifted(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(100, dtype=np.uint16).tofile(path)
    tokens = PackedTokens([path], np.dtype(np.uint16), seq_len=8)
    assert len(tokens) == (100 - 1) // 8
    inputs, targets = tokens.batch(np.array([0, 3]))
    inputs = inputs["input_ids"]
    assert tokens.num_tokens(np.array([0, 3])) == 16
    assert inputs.tolist() == [list(range(0, 8)), list(range(24, 32))]
    assert targets.tolist() == [list(range(1, 9)), list(range(25, 33))]
    # the last window ends inside the stream
    last_in, last_tgt = tokens.batch(np.array([len(tokens) - 1]))
    assert int(last_tgt[0, -1]) <= 99


def test_shards_read_as_one_stream(tmp_path):
    """Windows that span the end of one shard and the start of the next read the same as from one file;
    an empty shard (a part with no validation documents) is skipped."""
    stream = np.arange(100, dtype=np.uint16)
    paths = []
    for i, (a, b) in enumerate([(0, 13), (13, 13), (13, 50), (50, 100)]):
        paths.append(tmp_path / f"{i}.bin")
        stream[a:b].tofile(paths[-1])
    stream.tofile(tmp_path / "one.bin")
    one, sharded = (PackedTokens(p, np.dtype(np.uint16), seq_len=8) for p in ([tmp_path / "one.bin"], paths))
    assert len(one) == len(sharded) == 12
    everything = np.arange(len(one))
    for a, b in zip(one.batch(everything), sharded.batch(everything)):
        a, b = (a["input_ids"], b["input_ids"]) if isinstance(a, dict) else (a, b)
        assert torch.equal(a, b)


def _samples_seen(order: GlobalBatchOrder, plan: BatchPlan, step: int) -> list[int]:
    """All samples of one step, rank-major then micro-step: the global batch as ranks read it."""
    return [int(i) for rank in range(plan.world_size) for m in range(plan.grad_accum)
            for i in order.micro_batch(step, rank, m)]


@pytest.mark.parametrize("plan", [BatchPlan(2, 1, 2), BatchPlan(4, 1, 1), BatchPlan(2, 2, 1), BatchPlan(1, 2, 2)])
def test_global_batches_do_not_depend_on_ranks_or_accumulation(plan):
    reference = GlobalBatchOrder(103, BatchPlan(4, 1, 1), seed=7)
    order = GlobalBatchOrder(103, plan, seed=7)
    for step in range(60):  # spans several epochs
        assert _samples_seen(order, plan, step) == reference.global_batch(step).tolist()


def test_ranks_read_disjoint_parts_and_an_epoch_has_no_repeats():
    plan = BatchPlan(micro_batch=3, grad_accum=2, world_size=2)
    order = GlobalBatchOrder(100, plan, seed=0)
    assert order.batches_per_epoch == 100 // 12
    seen: list[int] = []
    for step in range(order.batches_per_epoch):
        per_rank = [set(np.concatenate([order.micro_batch(step, r, m) for m in range(2)]).tolist()) for r in range(2)]
        assert not per_rank[0] & per_rank[1]
        assert all(len(p) == 6 for p in per_rank)
        seen += _samples_seen(order, plan, step)
    assert len(seen) == len(set(seen)) == 96


def test_order_is_seeded_and_changes_per_epoch():
    plan = BatchPlan(4, 1, 1)
    a, b, c = GlobalBatchOrder(40, plan, 1), GlobalBatchOrder(40, plan, 1), GlobalBatchOrder(40, plan, 2)
    assert a.global_batch(3).tolist() == b.global_batch(3).tolist()
    assert a.global_batch(3).tolist() != c.global_batch(3).tolist()
    assert a.global_batch(0).tolist() != a.global_batch(a.batches_per_epoch).tolist()


def test_order_needs_one_global_batch():
    with pytest.raises(UserError, match="fewer than one global batch"):
        GlobalBatchOrder(7, BatchPlan(4, 1, 2), seed=0)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_batches_are_disjoint_and_even(world):
    parts = [eval_micro_batches(50, 40, micro_batch=4, rank=r, world_size=world) for r in range(world)]
    assert len({len(p) for p in parts}) == 1  # same number of forward passes on every rank
    flat = [int(i) for p in parts for b in p for i in b]
    assert sorted(flat) == list(range(40 // world * world))


def test_read_meta_errors(tmp_path, tiny_data):
    with pytest.raises(UserError, match="does not exist"):
        read_meta(tmp_path / "missing")
    with pytest.raises(UserError, match="no meta.json"):
        read_meta(tmp_path)
    meta = read_meta(tiny_data)
    assert meta.split_tokens("train") > 0 and meta.split_tokens("val") > 0


def test_truncated_token_file_is_reported(tmp_path, tiny_data):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(tiny_data, copy)
    with open(copy / "train.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UserError, match="train.bin is truncated or corrupt"):
        read_meta(copy)


@pytest.mark.parametrize("edit, match", [
    ({"dtype": "float32"}, "gives the token dtype as 'float32', not one of uint16, uint32"),
    ({"dtype": "foo"}, "gives the token dtype as 'foo'"),
    ({"splits": None}, "lacks the train split's files and token counts"),
    ({"splits": {"train": {"file": "train.bin", "tokens": -1}}}, "lacks the train split's files and token counts"),
    ("{", "is not valid JSON"),
    ([], "is not a JSON object"),
])
def test_a_meta_json_that_parses_but_is_wrong(tmp_path, tiny_data, edit, match):
    """Read as garbage before: a float32 dtype turned the token file into nonsense ids."""
    import json
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(tiny_data, copy)
    meta = json.loads((copy / "meta.json").read_text())
    if isinstance(edit, dict):
        meta.update({k: v for k, v in edit.items() if v is not None})
        for k in [k for k, v in edit.items() if v is None]:
            meta.pop(k)
        text = json.dumps(meta)
    else:
        text = edit if isinstance(edit, str) else json.dumps(edit)
    (copy / "meta.json").write_text(text)
    with pytest.raises(UserError, match=match):
        read_meta(copy)


def test_a_data_folder_without_its_tokenizer(tmp_path, tiny_data):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(tiny_data, copy, ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(UserError, match="has no tokenizer in tokenizer/"):
        read_meta(copy)

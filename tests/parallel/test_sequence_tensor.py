"""How a sequence-parallel rank splits a sample."""

import torch

from gpt_recipes.parallel import sequence_tensor


def test_shards_put_back_together_are_the_sample():
    ids = torch.arange(24).view(2, 12)
    targets = ids + 100
    mask = torch.ones(2, 1, 12, 12, dtype=torch.bool).tril()
    parts = [sequence_tensor.shard_sequence({"input_ids": ids, "attention_mask": mask}, targets, 3, r) for r in range(3)]
    assert torch.equal(torch.cat([p[0]["input_ids"] for p in parts], 1), ids)
    assert torch.equal(torch.cat([p[1] for p in parts], 1), targets)
    assert torch.equal(torch.cat([p[0]["position_ids"] for p in parts], 1), torch.arange(12).expand(2, 12))
    assert all(p[0][sequence_tensor.SEQUENCE_MASK] is mask for p in parts)  # a packed batch's mask goes whole
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])  # packed: positions restart per example
    local, _ = sequence_tensor.shard_sequence({"input_ids": ids[:1, :6], "position_ids": positions}, targets[:1, :6], 2, 1)
    assert local["position_ids"].tolist() == [[0, 1, 0]] and "attention_mask" not in local

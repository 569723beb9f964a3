import pytest
import torch

from gpt_recipes.models import loss as loss_module
from gpt_recipes.models.causal_lm import build_config, build_model
from gpt_recipes.models.loss import CausalLMLoss, fused_unavailable, linear_cross_entropy, lm_loss

VOCAB = 1000


def _model(spec, dtype=torch.float32):
    torch.manual_seed(0)
    return build_model(build_config(spec, VOCAB, 0)).to(dtype)


def _loss_and_grads(model, fused, inputs, targets, reduction="mean"):
    model.zero_grad(set_to_none=True)
    loss = CausalLMLoss(model, fused)(model, inputs, targets, reduction)
    loss.backward()
    return loss.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 48))
    targets = torch.roll(ids, -1, dims=1)
    targets[0, :20] = -100  # a prompt without loss, as fine-tuning has
    targets[:, -1] = -100
    return {"input_ids": ids}, targets


@pytest.mark.parametrize("spec", ["tiny_model", "tiny_llama"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_loss_equals_the_logits_loss(spec, reduction, request, monkeypatch):
    """Same loss and gradients for every parameter (the output layer tied for GPT-2, untied for
    the tiny Llama), over several chunks, with ignored targets."""
    monkeypatch.setitem(loss_module.CHUNK_ELEMENTS, "cpu", 50 * VOCAB)  # 50 rows a chunk: 3 chunks, one ragged
    model = _model(str(request.getfixturevalue(spec)))
    inputs, targets = _batch()
    plain, plain_grads = _loss_and_grads(model, False, inputs, targets, reduction)
    fused, fused_grads = _loss_and_grads(model, True, inputs, targets, reduction)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_loss_in_bf16_stays_within_rounding(tiny_model):
    model = _model(str(tiny_model), torch.bfloat16)
    inputs, targets = _batch()
    plain, plain_grads = _loss_and_grads(model, False, inputs, targets)
    fused, fused_grads = _loss_and_grads(model, True, inputs, targets)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-3)
    for name, grad in plain_grads.items():
        scale = grad.abs().max().item()
        assert (fused_grads[name] - grad).abs().max().item() <= 0.02 * scale + 1e-6, name


def test_fused_loss_under_autocast_matches(tiny_model):
    model = _model(str(tiny_model))
    inputs, targets = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = CausalLMLoss(model, False)(model, inputs, targets)
        fused = CausalLMLoss(model, True)(model, inputs, targets)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-3)


def test_linear_cross_entropy_is_cross_entropy_of_the_projection():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 7, 16, dtype=torch.float64), torch.randn(30, 16, dtype=torch.float64)
    targets = torch.randint(0, 30, (2, 7))
    targets[1, 3] = -100
    expected = lm_loss(hidden @ weight.t(), targets).double()
    got = linear_cross_entropy(hidden.float(), weight.float(), targets)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_evaluation_without_grad_computes_no_gradients(tiny_model, monkeypatch):
    model = _model(str(tiny_model))
    inputs, targets = _batch()
    asked = []
    chunked = loss_module._chunked_cross_entropy
    monkeypatch.setattr(loss_module, "_chunked_cross_entropy",
                        lambda *args, want_grads: asked.append(want_grads) or chunked(*args, want_grads=want_grads))
    with torch.no_grad():
        fused = CausalLMLoss(model, True)(model, inputs, targets, "sum")
    assert not fused.requires_grad and asked == [False]
    CausalLMLoss(model, True)(model, inputs, targets, "sum").backward()  # training still takes them
    assert asked == [False, True] and model.get_output_embeddings().weight.grad is not None
    model.zero_grad()
    assert fused.item() == pytest.approx(lm_loss(model(**inputs).logits, targets, "sum").item(), rel=1e-6)


def test_where_the_fused_loss_does_not_apply(tiny_model, tiny_llama):
    gpt2 = _model(str(tiny_model))
    assert fused_unavailable(gpt2, 2) is None
    assert fused_unavailable(_model(str(tiny_llama)), 0) is None
    assert "ZeRO-3" in fused_unavailable(gpt2, 3)
    gpt2.config.model_type = "gpt_neo"  # logits from a model type the fused loss is not known to match
    assert "not one whose logits" in fused_unavailable(gpt2, 0)

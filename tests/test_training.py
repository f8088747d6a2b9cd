"""Training on the PyTorch path: gradients, dropout, drop_path, gradient checkpointing."""

import torch

from tests._models import hf_and_ours, rel_err


def _grads(model, pixels, labels):
    model.zero_grad()
    model(pixels, labels=labels).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_gradients_match_transformers(tmp_path):
    hf, ours = hf_and_ours(tmp_path, "Dinov2ForImageClassification", num_labels=3)
    hf.train(), ours.train()
    pixels, labels = torch.randn(2, 3, 70, 56), torch.randint(0, 3, (2,))
    ref, got = _grads(hf, pixels, labels), _grads(ours, pixels, labels)
    assert ref.keys() == got.keys()
    for name in ref:
        if name.endswith("key.bias"):
            # Softmax ignores a shift shared by all keys: the true gradient is zero.
            assert got[name].abs().max() < 1e-7 and ref[name].abs().max() < 1e-7
            continue
        assert rel_err(got[name], ref[name]) <= 1e-5, name


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    _, ours = hf_and_ours(tmp_path, "Dinov2ForImageClassification", num_labels=3)
    ours.train()
    pixels, labels = torch.randn(2, 3, 56, 56), torch.randint(0, 3, (2,))
    plain = _grads(ours, pixels, labels)
    ours.gradient_checkpointing_enable()
    checkpointed = _grads(ours, pixels, labels)
    for name in plain:
        assert rel_err(checkpointed[name], plain[name]) <= 1e-6, name


def test_dropout_and_drop_path_act_only_in_training(tmp_path):
    _, ours = hf_and_ours(
        tmp_path,
        hidden_dropout_prob=0.2,
        attention_probs_dropout_prob=0.2,
        drop_path_rate=0.3,
    )
    pixels = torch.randn(4, 3, 56, 56)
    with torch.no_grad():
        evaluated = ours(pixels).last_hidden_state
        assert torch.equal(evaluated, ours(pixels).last_hidden_state)
        ours.train()
        torch.manual_seed(0)
        first = ours(pixels).last_hidden_state
        torch.manual_seed(1)
        second = ours(pixels).last_hidden_state
    assert rel_err(first, evaluated) > 1e-3 and rel_err(first, second) > 1e-3

"""The loss over sequence chunks equals the full-logits loss, value and every gradient, on the tiny model."""
import pytest
import torch
import torch.nn.functional as F

from clusterctl.training import loss


def batch():
    torch.manual_seed(0)
    ids = torch.randint(0, 600, (2, 37))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = loss.IGNORE
    labels[0, :5] = loss.IGNORE                                   # a prompt: not trained
    return ids, labels


def loss_and_grads(tiny_model, chunk_tokens=None):
    """The summed token loss and every gradient: full logits (chunk_tokens None) or chunked."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.train()
    ids, labels = batch()
    if chunk_tokens is None:
        logits = model(input_ids=ids).logits
        value = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=loss.IGNORE,
                                reduction="sum")
    else:
        vocab = model.config.vocab_size
        head = loss.install(model, vocab, budget=chunk_tokens * vocab * loss.BYTES_PER_LOGIT)
        assert head.chunk == chunk_tokens
        with head.loss_for(labels):
            value = model(input_ids=ids).logits
        assert value.dim() == 0                                     # no [tokens x vocab] tensor came out
    value.backward()
    return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def reference(tiny_model):
    return loss_and_grads(tiny_model)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 1000])
def test_same_loss_and_gradients(tiny_model, reference, chunk_tokens):
    full, full_grads = reference
    chunked, chunked_grads = loss_and_grads(tiny_model, chunk_tokens)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-4)
    assert full_grads.keys() == chunked_grads.keys() and "lm_head.weight" in full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_the_head_keeps_the_weight_name_and_projects_outside_the_loss(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    before = model.lm_head.weight
    head = loss.install(model, model.config.vocab_size)
    assert head.weight is before and "lm_head.weight" in model.state_dict()
    ids = torch.randint(0, 600, (1, 9))
    assert model(input_ids=ids).logits.shape == (1, 9, model.config.vocab_size)    # eval, generation


def test_chunk_size_follows_the_vocabulary():
    assert loss.chunk_tokens(129_280) == (1 << 30) // (129_280 * 14) == 593
    assert loss.chunk_tokens(10**12) == 1

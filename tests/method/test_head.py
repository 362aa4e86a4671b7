"""The response loss over token chunks (hf_lwf.method.head) against the plain loss from the model's full logits."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import FORGET_PROMPTS, tiny_gpt2, tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import hf_lwf.method.common as common
import hf_lwf.method.head as head_module
from hf_lwf.method.common import batch_losses, sequence_losses
from hf_lwf.method.confidence import batch_confidence
from hf_lwf.method.fisher import ScoringTerms, empirical_fisher, trainable_parameters
from hf_lwf.method.head import (
    chunked_cross_entropy,
    linear_head,
    response_losses,
    select_labelled,
)
from hf_lwf.method.selfgen import collate_self_data, encode_prompt
from hf_lwf.method.unlearn import ascent_step


def _batch(tokenizer):
    responses = [[40, 41, 42, 1], [50, 51], [60, 61, 62, 63, 64, 65, 1], [70, 40, 40]]
    rows = [{"prompt_ids": encode_prompt(tokenizer, p), "response_ids": r} for p, r in zip(FORGET_PROMPTS, responses)]
    return collate_self_data(rows, tokenizer.pad_token_id)


def _hidden_and_labels(vocab=37, batch=3, length=9, size=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, size, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, size, generator=g) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[0, :4] = -100  # a prompt
    labels[1, :] = -100  # a row with nothing labelled: loss 0
    labels[2, 7:] = -100  # padding
    return hidden, weight, labels


def _plain(hidden, weight, labels):
    """The reference: the whole [batch, tokens, vocab] logits in fp32, then sequence_losses."""
    return sequence_losses(F.linear(hidden.double(), weight.double()).float(), labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 2, 5, 1000])
@pytest.mark.parametrize("unit", [False, True])
def test_chunked_loss_matches_the_whole_logits(dtype, tokens, unit):
    hidden, weight, labels = _hidden_and_labels(dtype=dtype)
    vocab = weight.shape[0]
    selection = select_labelled(hidden, labels)
    assert selection.width == 6 and selection.hidden.shape[0] == 5 + 0 + 6  # the next tokens of rows 0, 1, 2
    losses = chunked_cross_entropy(selection, weight, tokens * vocab, unit=unit)
    reference = _plain(hidden, weight, labels)
    # fp32: the same numbers up to fp32 rounding; bf16: the plain loss's logits are fp32 here, the chunked loss
    # rounds its 16-bit matmul's output on the CPU (no fp32-output matmul there), as the model's own layer does
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(losses, reference, rtol=tolerance, atol=tolerance)
    assert float(losses[1]) == 0.0
    upstream = torch.tensor([0.7, -1.3, 2.0])
    grads = torch.autograd.grad((losses * upstream).sum(), [hidden] if unit else [hidden, weight])
    expected = torch.autograd.grad((reference * upstream).sum(), [hidden] if unit else [hidden, weight])
    for got, want in zip(grads, expected):
        assert got.dtype == want.dtype
        scale = float(want.abs().max())
        assert float((got.double() - want.double()).abs().max()) <= (1e-6 if dtype == torch.float32 else 2e-2) * scale


def test_chunked_loss_follows_an_enclosing_autocast():
    """Under bf16 autocast the output layer's matmuls run in bf16 as the model's own call would (fp32 weights)."""
    hidden, weight, labels = _hidden_and_labels()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = chunked_cross_entropy(select_labelled(hidden, labels), weight, 3 * weight.shape[0])
        reference = sequence_losses(F.linear(hidden, weight), labels)
    torch.testing.assert_close(losses, reference, rtol=1e-5, atol=1e-5)
    g, = torch.autograd.grad(losses.sum(), [weight])
    want, = torch.autograd.grad(reference.sum(), [weight])
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_response_losses_match_batch_losses_with_their_gradients(tokenizer, build):
    model = build(len(tokenizer), seed=4)
    batch = _batch(tokenizer)
    assert linear_head(model, batch) is model.lm_head
    params = trainable_parameters(model)
    chunked = response_losses(model, batch, chunk_elements=2 * model.config.vocab_size)
    plain = batch_losses(model, batch)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    upstream = torch.linspace(-1.0, 2.0, chunked.shape[0])
    for got, want in zip(torch.autograd.grad((chunked * upstream).sum(), list(params.values())),
                         torch.autograd.grad((plain * upstream).sum(), list(params.values()))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_a_head_whose_output_is_transformed_takes_the_plain_loss(tokenizer):
    """A hook that changes the output layer's output (as soft-capping would) is seen by the probe."""
    model = tiny_llama(len(tokenizer), seed=5)
    model.lm_head.register_forward_hook(lambda module, args, output: 30.0 * torch.tanh(output / 30.0))
    batch = _batch(tokenizer)
    assert linear_head(model, batch) is None
    torch.testing.assert_close(response_losses(model, batch), batch_losses(model, batch))


def test_a_config_that_scales_the_logits_takes_the_plain_loss(tokenizer):
    model = tiny_llama(len(tokenizer), seed=5)
    model.config.final_logit_softcapping = 30.0
    assert linear_head(model, _batch(tokenizer)) is None


class _LargestFloat32(TorchDispatchMode):
    """The largest fp32 tensor any op allocates (views and in-place results are not allocations), and the most rows
    of one with ``vocab`` in its last dimension."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest, self.vocab_rows = vocab, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.dtype == torch.float32
                    and t.untyped_storage().data_ptr() not in inputs):
                self.largest = max(self.largest, t.numel())
                if t.dim() and t.shape[-1] == self.vocab:
                    self.vocab_rows = max(self.vocab_rows, t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("what", ["deviation", "alignment", "fisher", "ascent"])
def test_no_pass_holds_fp32_logits_of_the_whole_batch(tokenizer, monkeypatch, what):
    """Scoring, the empirical Fisher and the ascent form at most a chunk of logits (3 tokens here) at a time: no fp32
    tensor of [batch, tokens, vocab] (or larger) is ever created, in the forward or the backward."""
    monkeypatch.setattr(head_module, "LOSS_CHUNK_ELEMENTS_CPU", 3 * 512)
    model = tiny_llama(512, seed=6)  # vocab 512 > anything else's last dimension (hidden 32, MLP 64)
    batch = _batch(tokenizer)
    size, length = batch["input_ids"].shape
    whole = size * (length - 1) * 512
    params = trainable_parameters(model)
    g = torch.Generator().manual_seed(0)
    terms = ScoringTerms.explicit({n: torch.randn(p.shape, generator=g) for n, p in params.items()},
                                  {n: torch.rand(p.shape, generator=g) for n, p in params.items()})
    chunk = 4096  # per-sample gradient numbers at once (the lm_head's row blocks)

    def run():
        if what in ("deviation", "alignment"):
            a, n = batch_confidence(model.eval(), batch, terms, norms=what == "deviation", chunk_elements=chunk)
            assert bool(torch.isfinite(a).all())
        elif what == "fisher":
            examples = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(size)]
            fisher, _ = empirical_fisher(model.eval(), examples, batch_size=size, chunk_elements=chunk)
            assert all(bool(torch.isfinite(f).all()) for f in fisher.values())
        else:
            before = model.lm_head.weight.detach().clone()
            sgd = torch.optim.SGD(model.parameters(), lr=1e-2)
            result = ascent_step(model.train(), batch, sgd, coef=1.0, loss_cap=100.0, max_grad_norm=1.0)
            assert result["applied"] == 1 and not torch.equal(before, model.lm_head.weight)

    run()  # the first pass checks the classes and probes the output layer
    with _LargestFloat32(512) as watch:
        run()
    assert watch.vocab_rows <= 3, watch.vocab_rows  # logits and their gradient: 3 tokens at a time
    assert watch.largest < whole, (watch.largest, whole)


def test_the_gpu_branch_emulated_on_the_cpu_matches_the_plain_loss(tokenizer, monkeypatch):
    """The fp32-output matmul of 16-bit tensors (a GPU's) emulated on the CPU: the bf16 branches agree with the
    plain loss of the same bf16 model (logits rounded to bf16 there, so to bf16 precision)."""
    monkeypatch.setattr(common, "_native_f32_output", lambda device: True)
    monkeypatch.setattr(head_module, "_native_f32_output", lambda device: True)
    monkeypatch.setattr(common, "_mm_out_f32", lambda a, b: (torch.bmm if a.dim() == 3 else torch.mm)(a.float(), b.float()))
    model = tiny_llama(len(tokenizer), seed=7).to(torch.bfloat16)
    batch = _batch(tokenizer)
    reference = batch_losses(copy.deepcopy(model).double(), batch)
    chunked = response_losses(model, batch, chunk_elements=2 * model.config.vocab_size)
    plain = batch_losses(model, batch)
    # closer to the fp64 loss than the plain bf16 logits are (fp32 logits here)
    assert float((chunked.double() - reference).abs().max()) <= float((plain.double() - reference).abs().max()) + 1e-3

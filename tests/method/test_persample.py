"""Per-layer per-sample gradients (one batched pass) against plain per-sample backward references."""

import copy
import gc

import pytest
import torch
import torch.nn.functional as F
from conftest import FORGET_PROMPTS, LEARN_TEXTS, tiny_gpt2, tiny_llama

from hf_lwf.method.confidence import batch_confidence, reference_confidence, score_self_data

from hf_lwf.method.common import sequence_losses
from hf_lwf.method.fisher import (
    ScoringTerms,
    bias_corrected,
    empirical_fisher,
    empirical_fisher_reference,
    intended_update,
    kth_largest,
    masked_fisher,
    snapshot,
    trainable_parameters,
    update_mask,
    weighted_direction,
)
from hf_lwf.method.persample import FisherConsumer, per_sample_pass
from hf_lwf.method.selfgen import collate_self_data, encode_prompt


def _batch(tokenizer, n=4):
    responses = [[40, 41, 42, 1], [50, 51], [60, 61, 62, 63, 64, 65, 1], [70, 40, 40]]
    rows = [
        {"prompt_ids": encode_prompt(tokenizer, p), "response_ids": r}
        for p, r in zip(FORGET_PROMPTS, responses)
    ][:n]
    return collate_self_data(rows, tokenizer.pad_token_id)


def _state(model, seed=0):
    """An online-Fisher-like F, a reference theta_ref a small step away from the live weights."""
    g = torch.Generator().manual_seed(seed)
    params = trainable_parameters(model)
    fisher = {n: torch.rand(p.shape, generator=g) * 1e-2 for n, p in params.items()}
    reference = {n: p.detach().float() - torch.randn(p.shape, generator=g) * 1e-3 for n, p in params.items()}
    return fisher, reference


def _reference_terms(model, batch, fisher, reference, mask_ratio, lr=0.1):
    delta = intended_update(snapshot(model), reference)
    mask = update_mask(fisher, delta, mask_ratio)
    w, fm = weighted_direction(fisher, delta, mask), masked_fisher(fisher, mask)
    a = reference_confidence(model, batch, w, fm, 1.0, "alignment")
    dev = reference_confidence(model, batch, w, fm, lr, "deviation")
    n = (dev - lr * a) / (0.5 * lr**2)
    return a, n, mask


def _assert_rel(actual, expected, rtol=1e-3):
    actual, expected = actual.double(), expected.double()
    scale = float(expected.abs().max())
    assert scale > 0
    assert float(((actual - expected).abs() / (expected.abs() + 1e-6 * scale)).max()) <= rtol, (actual, expected)


@pytest.mark.parametrize("mask_ratio", [1.0, 0.3])
def test_batched_confidence_matches_the_reference(model, tokenizer, mask_ratio):
    batch = _batch(tokenizer)
    fisher, reference = _state(model)
    a_ref, n_ref, mask = _reference_terms(model, batch, fisher, reference, mask_ratio)
    terms = ScoringTerms.from_state(fisher, model=model, reference=reference, mask_ratio=mask_ratio)
    if mask is not None:  # the streamed threshold selects exactly the top-k mask
        kept = sum(int(m.sum()) for m in mask.values())
        assert kept == sum(int((terms.chunk(n)[1] != 0).sum()) for n in fisher)
    a, n = batch_confidence(model, batch, terms)
    _assert_rel(a, a_ref)
    _assert_rel(n, n_ref)
    a_only, none = batch_confidence(model, batch, terms, norms=False)
    assert none is None
    _assert_rel(a_only, a_ref)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_tied_embedding_gradient_is_summed_before_squaring(tokenizer):
    gpt2 = tiny_gpt2(len(tokenizer), seed=2).eval()
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    batch = _batch(tokenizer)
    name = "transformer.wte.weight"
    curvature = {name: torch.ones_like(gpt2.lm_head.weight)}
    consumer_terms = ScoringTerms.explicit({}, curvature)
    _, n = batch_confidence(gpt2, batch, consumer_terms)
    expected = []
    for i in range(4):
        gpt2.zero_grad()
        logits = gpt2(input_ids=batch["input_ids"][i : i + 1], attention_mask=batch["attention_mask"][i : i + 1]).logits
        sequence_losses(logits, batch["labels"][i : i + 1])[0].backward()
        expected.append(gpt2.lm_head.weight.grad.double().pow(2).sum())
    gpt2.zero_grad(set_to_none=True)
    _assert_rel(n, torch.stack(expected), rtol=1e-4)


@pytest.mark.parametrize("chunk_elements", [1, 5000])
def test_chunking_does_not_change_the_result(model, tokenizer, chunk_elements):
    batch = _batch(tokenizer)
    fisher, reference = _state(model, seed=3)
    terms = ScoringTerms.from_state(fisher, model=model, reference=reference)
    a, n = batch_confidence(model, batch, terms)
    a_c, n_c = batch_confidence(model, batch, terms, chunk_elements=chunk_elements)
    torch.testing.assert_close(a_c, a, rtol=1e-5, atol=0)
    torch.testing.assert_close(n_c, n, rtol=1e-5, atol=0)


def test_scoring_terms_apply_bias_correction_and_delta_per_block(llama):
    fisher, reference = _state(llama, seed=4)
    scale = 1 / (1 - 0.9**3)
    terms = ScoringTerms.from_state(fisher, model=llama, reference=reference, scale=scale)
    corrected = {n: f * scale for n, f in fisher.items()}
    delta = intended_update(snapshot(llama), reference)
    for name in fisher:
        w, fm = terms.chunk(name)
        torch.testing.assert_close(w, corrected[name] * delta[name], rtol=1e-6, atol=0)
        torch.testing.assert_close(fm, corrected[name], rtol=1e-6, atol=0)
        rows = slice(1, 3)
        torch.testing.assert_close(terms.chunk(name, rows)[0], w[rows])
    # bf16 state: the same terms up to bf16 rounding.
    low = ScoringTerms.from_state({n: f.bfloat16() for n, f in fisher.items()}, model=llama,
                                  reference={n: r.bfloat16() for n, r in reference.items()}, scale=scale)
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(low.chunk(name)[1], corrected[name], rtol=1e-2, atol=0)
    early = ScoringTerms.from_state(fisher, delta=delta)
    torch.testing.assert_close(early.chunk(name)[0], fisher[name] * delta[name])
    with pytest.raises(ValueError, match="delta"):
        ScoringTerms.from_state(fisher)


@pytest.mark.parametrize("k", [1, 2, 7, 30, 59, 60])
def test_kth_largest_is_exact(k):
    g = torch.Generator().manual_seed(k)
    values = {"a": torch.rand(5, 4, generator=g) * 10, "b": torch.rand(40, generator=g) * 1e-3}
    values["b"][3] = 0.0
    flat = torch.cat([v.reshape(-1) for v in values.values()])
    assert kth_largest(lambda n: values[n], values, k) == float(flat.sort(descending=True).values[k - 1])


def test_batched_confidence_under_peft_lora(tokenizer):
    peft = pytest.importorskip("peft")
    base = tiny_llama(len(tokenizer), seed=5)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.1,
                             init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    model.enable_input_require_grads()
    model.eval()
    names = set(trainable_parameters(model))
    assert names and all("lora_" in n for n in names)
    batch = _batch(tokenizer)
    fisher, reference = _state(model, seed=6)
    a_ref, n_ref, _ = _reference_terms(model, batch, fisher, reference, 1.0)
    a, n = batch_confidence(model, batch, ScoringTerms.from_state(fisher, model=model, reference=reference))
    _assert_rel(a, a_ref)
    _assert_rel(n, n_ref)
    assert all(p.requires_grad == (n in names) for n, p in model.named_parameters())


def test_score_self_data_under_gradient_checkpointing(tokenizer):
    model = tiny_llama(len(tokenizer), seed=7)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    batch = _batch(tokenizer)
    fisher, reference = _state(model, seed=8)
    terms = ScoringTerms.from_state(fisher, model=model, reference=reference)
    rows = [{"prompt_ids": encode_prompt(tokenizer, p), "response_ids": [40 + i, 41, 1]}
            for i, p in enumerate(FORGET_PROMPTS)]
    scores = score_self_data(model, rows, tokenizer.pad_token_id, terms, None, 0.1, "deviation", batch_size=3,
                             show_progress=False)
    assert model.training
    model.eval()
    delta = intended_update(snapshot(model), reference)
    expected = torch.cat([
        reference_confidence(model, collate_self_data([r], tokenizer.pad_token_id), weighted_direction(fisher, delta, None),
                             fisher, 0.1, "deviation")
        for r in rows
    ])
    _assert_rel(scores, expected)
    del batch


class _Odd(torch.nn.Module):
    """No per-sample rule and no vmap: data-dependent control flow forces the per-sample backward fallback."""

    def __init__(self, dim):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        if float(x.abs().sum()) > -1:  # .item()-like: vmap cannot trace it
            return x * self.scale
        return x


class OffsetRMSNorm(torch.nn.Module):
    """Gemma-style ``(1 + w) * xhat``: the RMSNorm rule's check fails and the generic path takes over."""

    def __init__(self, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(-0.5, 0.5, dim))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (1.0 + self.weight) * h


class _SquaredLinear(torch.nn.Linear):
    """A Linear subclass whose forward is not ``x W^T + b``: its class fails the rule check and takes vmap."""

    def forward(self, x):
        return F.linear(x, self.weight * self.weight.abs(), self.bias)


class _Gated(torch.nn.Module):
    """Called as ``f(x, gate)`` with a per-sample second tensor: the fallback must split both arguments."""

    def __init__(self, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(-1.0, 1.0, dim))

    def forward(self, x, gate):
        return x * torch.sigmoid(gate * self.weight)


class _Toy(torch.nn.Module):
    """A linear layer with bias called twice, an odd layer and a LayerNorm: every rule and the fallback."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim, padding_idx=0)
        self.shared = torch.nn.Linear(dim, dim)
        self.odd = _Odd(dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.rms = OffsetRMSNorm(dim)
        self.squared = _SquaredLinear(dim, dim)
        self.gated = _Gated(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        h = self.embed(input_ids)
        h = torch.tanh(self.shared(h))
        h = self.shared(self.odd(h))
        h = self.gated(self.squared(h), h.flip(1))
        return type("Out", (), {"logits": self.head(self.rms(self.norm(h)))})()


def test_every_rule_and_the_fallback_on_a_toy_model():
    torch.manual_seed(0)
    toy = _Toy()
    batch = {"input_ids": torch.tensor([[3, 4, 5, 0], [6, 6, 7, 8]]), "attention_mask": torch.ones(2, 4, dtype=torch.long),
             "labels": torch.tensor([[-100, 4, 5, -100], [-100, 6, 7, 8]])}
    _matches_reference(toy, batch, rtol=1e-4)
    from hf_lwf.method.persample.plan import _PLANS

    verdict = _PLANS[toy].verdict
    # (1 + w) * xhat has the RMSNorm rule's gradient: the check compares gradients, not outputs.
    assert verdict[OffsetRMSNorm] == "rule"
    assert verdict[_SquaredLinear] == verdict[_Odd] == verdict[_Gated] == "generic"
    assert verdict[torch.nn.Linear] == verdict[torch.nn.LayerNorm] == verdict[torch.nn.Embedding] == "rule"


def test_llama_rmsnorm_uses_the_rule(llama, tokenizer):
    from hf_lwf.method.persample.plan import _PLANS

    curvature = {n: torch.ones_like(p) for n, p in trainable_parameters(llama).items()}
    batch_confidence(llama.eval(), _batch(tokenizer, 2), ScoringTerms.explicit({}, curvature))
    assert _PLANS[llama].verdict[type(llama.model.norm)] == "rule"
    assert not _PLANS[llama].exact


def _examples(tokenizer, n=5):
    texts = [LEARN_TEXTS[0], "Tom has 3 apples.", LEARN_TEXTS[-1] + " Paris.", "Brush your teeth.", LEARN_TEXTS[7]][:n]
    out = []
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        labels = ids.clone()
        labels[0, 0] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def test_batched_empirical_fisher_matches_the_loop(model, tokenizer):
    examples = _examples(tokenizer)
    fisher, mean = empirical_fisher(model, examples, batch_size=2)
    ref_fisher, ref_mean = empirical_fisher_reference(model, examples)
    assert set(fisher) == set(ref_fisher)
    for name in fisher:
        scale = float(ref_fisher[name].abs().max()) + 1e-20
        assert float((fisher[name] - ref_fisher[name]).abs().max()) <= 1e-4 * scale, name
        scale = float(ref_mean[name].abs().max()) + 1e-20
        assert float((mean[name] - ref_mean[name]).abs().max()) <= 1e-4 * scale, name
    assert all(p.grad is None for p in model.parameters())


def test_fisher_consumer_sums_squares_per_sample(llama, tokenizer):
    batch = _batch(tokenizer, 3)
    params = trainable_parameters(llama)
    consumer = FisherConsumer(params)

    def losses(m, b):
        return sequence_losses(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])

    out = per_sample_pass(llama, batch, consumer, losses, params)
    assert out.shape == (3,)
    name = "model.layers.1.self_attn.k_proj.weight"
    expected = torch.zeros_like(params[name])
    for i in range(3):
        llama.zero_grad()
        losses(llama, {k: v[i : i + 1] for k, v in batch.items()})[0].backward()
        expected += params[name].grad ** 2
    llama.zero_grad(set_to_none=True)
    torch.testing.assert_close(consumer.squares[name], expected, rtol=1e-4, atol=1e-12)


def test_bias_corrected_scale_matches_bias_corrected():
    fisher = {"w": torch.tensor([1.0, 2.0])}
    scale = 1 / (1 - 0.5**2)
    terms = ScoringTerms.from_state(fisher, delta={"w": torch.tensor([1.0, -1.0])}, scale=scale)
    assert terms.chunk("w")[1].tolist() == bias_corrected(fisher, 2, 0.5)["w"].tolist()


# --------------------------------------------------------------------------------------------------------------
# Coverage: every tiny model family and adapter against an independent per-sample loop on UNPADDED rows.

def _tiny(family: str, vocab: int):
    """A tiny random model of ``family`` built from its config (hidden 32, 2 layers, eval mode)."""
    import transformers as tf

    torch.manual_seed(11)
    common = dict(vocab_size=vocab, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "gemma":
        model = tf.GemmaForCausalLM(tf.GemmaConfig(head_dim=8, **llama_like))
    elif family == "gemma3":
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
                                                          layer_types=["sliding_attention", "full_attention"],
                                                          **llama_like))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**llama_like))
    elif family == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=8, num_experts_per_tok=1, **llama_like))
    elif family == "opt":
        model = tf.OPTForCausalLM(tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                               word_embed_proj_dim=32, max_position_embeddings=256, dropout=0.0,
                                               **common))
    elif family == "biogpt":
        model = tf.BioGptForCausalLM(tf.BioGptConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, max_position_embeddings=256,
                                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                                     **common))
    elif family == "gpt2":
        model = tiny_gpt2(vocab, seed=11)
    else:
        model = tiny_llama(vocab, seed=11)
    with torch.no_grad():  # no zero-initialised weight (LayerNorm biases, OPT/GPT-2 biases): every term is exercised
        for p in model.parameters():
            if float(p.abs().max()) == 0.0:
                p.normal_(0.0, 0.02)
    return model.eval()


def _adapted(kind: str, vocab: int):
    """Tiny Llama with a PEFT adapter (initialised away from identity so that every adapter gradient is non-zero)."""
    peft = pytest.importorskip("peft")
    base = _tiny("llama", vocab)
    if kind == "lora_embed_head":
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"],
                                 init_lora_weights=False)
    elif kind == "dora":
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True,
                                 init_lora_weights=False)
    elif kind == "ia3":
        config = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                init_ia3_weights=False)
    else:
        config = peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False)
    torch.manual_seed(12)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _rows(tokenizer):
    responses = [[40, 41, 42, 1], [50, 51], [60, 61, 62, 63, 64, 65, 1], [70, 40, 40]]
    return [{"prompt_ids": encode_prompt(tokenizer, p), "response_ids": r} for p, r in zip(FORGET_PROMPTS, responses)]


def _independent(model, rows, pad_id, direction, curvature):
    """a(x), n(x) from one plain ``torch.autograd.grad`` per row, each row on its own (no padding at all)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    a, n = [], []
    for row in rows:
        single = collate_self_data([row], pad_id)
        assert bool(single["attention_mask"].all())
        logits = model(input_ids=single["input_ids"], attention_mask=single["attention_mask"]).logits
        loss = sequence_losses(logits, single["labels"])[0]
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        grads = {k: (torch.zeros_like(p) if g is None else g).double() for (k, p), g in zip(params.items(), grads)}
        a.append(sum((grads[k] * direction[k].double()).sum() for k in direction))
        n.append(sum((grads[k].square() * curvature[k].double()).sum() for k in curvature))
    return torch.stack(a), torch.stack(n)


def _coverage(model, tokenizer, rtol=1e-4):
    """Scores of the batched pass (padded, length-sorted batches) against the independent loop, for a and n."""
    rows = _rows(tokenizer)
    params = trainable_parameters(model)
    g = torch.Generator().manual_seed(13)
    direction = {k: torch.randn(p.shape, generator=g) for k, p in params.items()}
    curvature = {k: torch.rand(p.shape, generator=g) for k, p in params.items()}
    a_ref, n_ref = _independent(model, rows, tokenizer.pad_token_id, direction, curvature)
    batch = collate_self_data(rows, tokenizer.pad_token_id)
    assert not bool(batch["attention_mask"].all())  # the batched pass does see padding
    a, n = batch_confidence(model, batch, ScoringTerms.explicit(direction, curvature))
    _assert_rel(a, a_ref, rtol)
    _assert_rel(n, n_ref, rtol)
    a_only, _ = batch_confidence(model, batch, ScoringTerms.explicit(direction, curvature), norms=False)
    _assert_rel(a_only, a_ref, rtol)
    lr = 0.1
    scores = score_self_data(model, rows, tokenizer.pad_token_id, direction, curvature, lr, "deviation", batch_size=3,
                             show_progress=False)
    _assert_rel(scores, lr * a_ref + 0.5 * lr**2 * n_ref, rtol)
    assert all(p.grad is None for p in model.parameters())
    return a_ref, n_ref


@pytest.mark.parametrize("family", ["gemma", "gemma3", "qwen2", "opt", "biogpt", "gpt2", "llama", "mixtral"])
def test_every_model_family_is_exact(tokenizer, family):
    model = _tiny(family, len(tokenizer))
    _coverage(model, tokenizer)


@pytest.mark.parametrize("kind", ["lora_embed_head", "ia3", "loha", "dora"])
def test_every_adapter_is_exact(tokenizer, kind):
    model = _adapted(kind, len(tokenizer))
    names = set(trainable_parameters(model))
    assert names and all(p.requires_grad == (n in names) for n, p in model.named_parameters())
    a_ref, n_ref = _coverage(model, tokenizer)
    assert bool((n_ref > 0).all())


def test_mixtral_expert_that_gets_no_token_is_exact(tokenizer):
    """Fused expert weights, top-1 routing with expert 7 never chosen: its slice of the weights gets exactly zero."""
    model = _tiny("mixtral", len(tokenizer))
    routed = []

    def never_expert_7(module, args, output):
        logits, scores, indices = output
        indices = torch.where(indices == 7, torch.zeros_like(indices), indices)
        routed.append(indices)
        return logits, scores, indices

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(never_expert_7)
    a_ref, n_ref = _coverage(model, tokenizer)
    assert all(int((i == 7).sum()) == 0 for i in routed)
    curvature = {n: torch.ones_like(p) for n, p in trainable_parameters(model).items()}
    consumer = FisherConsumer(trainable_parameters(model))
    per_sample_pass(model, collate_self_data(_rows(tokenizer), 0), consumer,
                    lambda m, b: sequence_losses(m(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits,
                                                 b["labels"]), trainable_parameters(model))
    experts = consumer.squares["model.layers.0.mlp.experts.gate_up_proj"]
    assert float(experts[7].abs().max()) == 0.0 and float(experts[:7].abs().max()) > 0
    del curvature, a_ref, n_ref


def test_scoring_inside_an_enclosing_autocast(tokenizer):
    """Tied embeddings (GPT-2) under ``torch.autocast``: the per-sample math stays fp32 and matches the loop."""
    model = _tiny("gpt2", len(tokenizer))
    rows = _rows(tokenizer)
    params = trainable_parameters(model)
    g = torch.Generator().manual_seed(14)
    direction = {k: torch.randn(p.shape, generator=g) for k, p in params.items()}
    curvature = {k: torch.rand(p.shape, generator=g) for k, p in params.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a_ref, n_ref = _independent(model, rows, 0, direction, curvature)
        a, n = batch_confidence(model, collate_self_data(rows, 0), ScoringTerms.explicit(direction, curvature))
    _assert_rel(a, a_ref, rtol=5e-2)
    _assert_rel(n, n_ref, rtol=5e-2)


class _Unused(torch.nn.Module):
    """A trainable module that the forward never calls."""

    def __init__(self, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))


class _WithAdapterDict(torch.nn.Module):
    """A ``ParameterDict`` used directly by its parent (as PEFT's embedding LoRA and IA3 do), an unused module."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.scales = torch.nn.ParameterDict({"a": torch.nn.Parameter(torch.linspace(0.5, 1.5, dim))})
        self.unused = _Unused(dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return type("Out", (), {"logits": self.head(torch.tanh(self.embed(input_ids) * self.scales["a"]))})()


def _matches_reference(model, batch, rtol: float) -> dict:
    """a(x) and n(x) of one batched pass against the one-row-at-a-time reference, for a random direction and
    curvature (returned direction)."""
    params = trainable_parameters(model)
    g = torch.Generator().manual_seed(1)
    direction = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
    curvature = {n: torch.rand(p.shape, generator=g) for n, p in params.items()}
    a, n = batch_confidence(model, batch, ScoringTerms.explicit(direction, curvature))
    a_ref = reference_confidence(model, batch, direction, curvature, 1.0, "alignment")
    n_ref = (reference_confidence(model, batch, direction, curvature, 1.0, "deviation") - a_ref) * 2
    _assert_rel(a, a_ref, rtol=rtol)
    _assert_rel(n, n_ref, rtol=rtol)
    return direction


def _toy_batch():
    return {"input_ids": torch.tensor([[3, 4, 5, 0], [6, 6, 7, 8]]), "attention_mask": torch.ones(2, 4, dtype=torch.long),
            "labels": torch.tensor([[-100, 4, 5, -100], [-100, 6, 7, 8]])}


def test_parameters_used_outside_a_module_call_take_the_exact_path():
    from hf_lwf.method.persample.plan import _PLANS

    torch.manual_seed(0)
    toy = _WithAdapterDict()
    batch = _toy_batch()
    direction = _matches_reference(toy, batch, rtol=1e-5)
    exact = _PLANS[toy].exact
    assert set(exact) == {"scales.a", "unused.weight"}
    assert "outside a call of its module" in exact["scales.a"] and "no part" in exact["unused.weight"]
    # The scales alone: their contribution is not zero (it was, silently, before).
    only = {"scales.a": direction["scales.a"]}
    a_scales, _ = batch_confidence(toy, batch, ScoringTerms.explicit(only, {}), norms=False)
    zero = {"scales.a": torch.zeros_like(direction["scales.a"])}
    _assert_rel(a_scales, reference_confidence(toy, batch, only, zero, 1.0, "alignment"), rtol=1e-5)
    assert bool((a_scales != 0).all())


def test_a_parameter_without_a_per_sample_contribution_is_an_error(monkeypatch):
    import hf_lwf.method.persample.engine as engine

    torch.manual_seed(0)
    toy = _WithAdapterDict()
    params = trainable_parameters(toy)
    monkeypatch.setattr(engine, "_exact_pass", lambda *args: None)  # a path that silently drops its parameters
    curvature = {n: torch.ones_like(p) for n, p in params.items()}
    with pytest.raises(RuntimeError, match=r"'scales\.a' \(owned by 'scales' \(ParameterDict\)\)"):
        batch_confidence(toy, _toy_batch(), ScoringTerms.explicit({}, curvature))


class _GatedToy(torch.nn.Module):
    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.gated = _Gated(dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        h = self.embed(input_ids)
        return type("Out", (), {"logits": self.head(self.gated(h, h.flip(1) * 3.0))})()


def test_the_module_fallback_splits_every_per_sample_argument():
    """``f(x, other)`` with a per-sample ``other``: only the gate's parameter, against the per-sample loop."""
    torch.manual_seed(0)
    toy = _GatedToy()
    only = {"gated.weight": torch.linspace(1.0, 2.0, 6)}
    curvature = {"gated.weight": torch.ones(6)}
    batch = _toy_batch()
    a, n = batch_confidence(toy, batch, ScoringTerms.explicit(only, curvature))
    a_ref = reference_confidence(toy, batch, only, curvature, 1.0, "alignment")
    n_ref = (reference_confidence(toy, batch, only, curvature, 1.0, "deviation") - a_ref) * 2
    _assert_rel(a, a_ref, rtol=1e-5)
    _assert_rel(n, n_ref, rtol=1e-5)


class _HiddenLeaf(torch.nn.Module):
    """A layer whose only input comes from a tensor made to require grad inside the forward: no parameter and no
    recorded root lies below it, so a backward restricted to those would never reach its output."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.side = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        h = self.embed(input_ids)
        hidden = torch.ones_like(h, requires_grad=True) * 0.5
        return type("Out", (), {"logits": self.head(h + self.side(hidden))})()


def test_an_output_the_backward_does_not_reach_is_an_error_not_a_zero():
    torch.manual_seed(0)
    toy = _HiddenLeaf()
    curvature = {n: torch.ones_like(p) for n, p in trainable_parameters(toy).items()}
    with pytest.raises(RuntimeError, match=r"'side' \(Linear\) is on the loss's graph"):
        batch_confidence(toy, _toy_batch(), ScoringTerms.explicit({}, curvature))


def test_lm_head_blocks_slice_the_output_gradient_before_casting(tokenizer):
    """bf16 weights, lm_head in row blocks: no fp32 copy of the whole [batch, tokens, vocab] gradient is made."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestUpcast(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and isinstance(out, torch.Tensor) and out.dtype == torch.float32:
                self.largest = max(self.largest, out.numel())
            return out

    model = tiny_llama(len(tokenizer), seed=3).to(torch.bfloat16).eval()
    batch = _batch(tokenizer)
    curvature = {n: torch.ones_like(p, dtype=torch.float32) for n, p in trainable_parameters(model).items()}
    terms = ScoringTerms.explicit({}, curvature)
    batch_confidence(model, batch, terms, chunk_elements=4096)  # the first pass checks the classes
    size, length = batch["input_ids"].shape
    with LargestUpcast() as watch:
        _, n = batch_confidence(model, batch, terms, chunk_elements=4096)
    assert bool(torch.isfinite(n).all()) and bool((n > 0).all())
    # The loss upcasts the shifted logits ([batch, tokens - 1, vocab]); nothing larger is cast.
    assert watch.largest <= size * (length - 1) * model.config.vocab_size


class _Flattened(torch.nn.Module):
    """Linear layers on flattened tokens: batch-major rows (as OPT) and, with ``time_major``, rows grouped by position."""

    def __init__(self, time_major: bool, vocab=11, dim=6):
        super().__init__()
        self.time_major = time_major
        self.embed = torch.nn.Embedding(vocab, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.mid = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        h = self.embed(input_ids)
        batch, length, dim = h.shape
        flat = h.transpose(0, 1).reshape(-1, dim) if self.time_major else h.reshape(-1, dim)
        flat = torch.tanh(self.mid(self.norm(flat)))
        h = flat.reshape(length, batch, dim).transpose(0, 1) if self.time_major else flat.reshape(batch, length, dim)
        return type("Out", (), {"logits": self.head(h)})()


@pytest.mark.parametrize("time_major", [False, True])
def test_flattened_token_calls_use_the_rules_only_when_rows_are_batch_major(time_major):
    from hf_lwf.method.persample.plan import _PLANS

    torch.manual_seed(0)
    toy = _Flattened(time_major)
    batch = _toy_batch()
    _matches_reference(toy, batch, rtol=1e-5)
    plan = _PLANS[toy]
    assert plan.flat == {torch.nn.LayerNorm: not time_major, torch.nn.Linear: not time_major}
    assert set(plan.exact) == (set() if not time_major else {"norm.weight", "norm.bias", "mid.weight", "mid.bias"})


def test_opt_layers_on_flattened_tokens_take_the_rules(tokenizer):
    from hf_lwf.method.persample.plan import _PLANS

    model = _tiny("opt", len(tokenizer))
    _coverage(model, tokenizer)
    assert not _PLANS[model].exact and _PLANS[model].flat == {torch.nn.LayerNorm: True, torch.nn.Linear: True}


def _sequence_losses(model, batch):
    return sequence_losses(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                           batch["labels"])


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("family", ["llama", "opt", "mixtral", "ia3"])
def test_repeated_passes_hold_no_memory(tokenizer, family):
    """A pass releases everything it recorded: no ``_Use`` holds an activation or a node after it, and the live tensors
    are the same after the 2nd and the 5th pass (the recorded uses once leaked through a ``use -> autograd node ->
    tensor hook -> use`` cycle the garbage collector cannot see, about 2.3 GB per scoring pass on SmolLM2)."""
    from hf_lwf.method.persample.record import _Use

    model = _adapted("ia3", len(tokenizer)) if family == "ia3" else _tiny(family, len(tokenizer))
    params = trainable_parameters(model)
    g = torch.Generator().manual_seed(13)
    terms = ScoringTerms.explicit({k: torch.randn(p.shape, generator=g) for k, p in params.items()},
                                  {k: torch.rand(p.shape, generator=g) for k, p in params.items()})
    batch = collate_self_data(_rows(tokenizer), tokenizer.pad_token_id)

    def passes():
        batch_confidence(model, batch, terms)
        batch_confidence(model, batch, terms, norms=False)
        per_sample_pass(model, batch, FisherConsumer(params), _sequence_losses, params)

    passes()  # the first pass checks the rules and fills the model's plan
    passes()
    live = _live_tensors()
    for _ in range(3):
        passes()
    assert _live_tensors() == live
    held = [o for o in gc.get_objects() if isinstance(o, _Use) and (o.node, o.args, o.grad) != (None, None, None)]
    assert not held


def _emulate_gpu_matmuls(monkeypatch):
    """The GPU's fp32-output matmul of 16-bit tensors, emulated on the CPU (the same fp32 result): the 16-bit
    branches (no upcast copies, the bf16 split of fp32 directions) run as they would on a GPU."""
    import hf_lwf.method.common as common
    import hf_lwf.method.head as head

    monkeypatch.setattr(common, "_native_f32_output", lambda device: True)
    monkeypatch.setattr(head, "_native_f32_output", lambda device: True)
    monkeypatch.setattr(common, "_mm_out_f32",
                        lambda a, b: (torch.bmm if a.dim() == 3 else torch.mm)(a.float(), b.float()))


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("gpu_branch", [False, True])
def test_bf16_scores_agree_with_an_fp64_reference(tokenizer, monkeypatch, family, gpu_branch):
    """A bf16 model's a(x) and n(x) against plain per-sample autograd of the same weights in fp64, one row at a time.

    The bf16 forward and backward dominate the difference. The fp32 per-sample contractions this path replaced
    measured, relative to the largest score (llama / gpt2 / opt): a 6.5e-3 / 9.2e-3 / 3.2e-3, n 1.4e-3 / 2.2e-3 /
    1.8e-3; the 16-bit contractions 6.8e-3 / 1.03e-2 / 3.1e-3 and 1.1e-3 / 2.3e-3 / 2.0e-3 on the GPU branch."""
    if gpu_branch:
        _emulate_gpu_matmuls(monkeypatch)
    model = _tiny(family, len(tokenizer)).to(torch.bfloat16)
    wide = copy.deepcopy(model).double()
    batch = collate_self_data(_rows(tokenizer), tokenizer.pad_token_id)
    g = torch.Generator().manual_seed(5)
    params = trainable_parameters(model)
    direction = {k: torch.randn(p.shape, generator=g) for k, p in params.items()}
    curvature = {k: torch.rand(p.shape, generator=g) for k, p in params.items()}
    a, n = batch_confidence(model, batch, ScoringTerms.explicit(direction, curvature))
    a_only, _ = batch_confidence(model, batch, ScoringTerms.explicit(direction, curvature), norms=False)
    direction = {k: v.double() for k, v in direction.items()}
    curvature = {k: v.double() for k, v in curvature.items()}
    a_ref = reference_confidence(wide, batch, direction, curvature, 1.0, "alignment")
    n_ref = (reference_confidence(wide, batch, direction, curvature, 1.0, "deviation") - a_ref) * 2

    def error(x, ref):
        return float((x.double() - ref).abs().max() / ref.abs().max())

    assert error(a, a_ref) <= 1.5e-2 and error(a_only, a_ref) <= 1.5e-2
    assert error(n, n_ref) <= 4e-3


def test_the_fused_block_reduction_matches_the_eager_kernels(tokenizer, monkeypatch):
    """a(x) and n(x) of each block from one compiled kernel (a GPU's path, forced on the CPU here) equal the eager
    addmv / square / addmv; a compile failure falls back to the eager kernels for good."""
    import hf_lwf.method.persample.fused as fused

    model = _tiny("gpt2", len(tokenizer))
    batch = collate_self_data(_rows(tokenizer), tokenizer.pad_token_id)
    params = trainable_parameters(model)
    g = torch.Generator().manual_seed(0)
    terms = ScoringTerms.explicit({k: torch.randn(p.shape, generator=g) for k, p in params.items()},
                                  {k: torch.rand(p.shape, generator=g) for k, p in params.items()})
    a, n = batch_confidence(model, batch, terms)
    monkeypatch.setattr(fused, "_FUSED", {})
    monkeypatch.setattr(fused, "FUSE_SUMS", "cpu")
    a_fused, n_fused = batch_confidence(model, batch, terms)
    assert callable(fused._FUSED["fn"])
    torch.testing.assert_close(a_fused, a, rtol=1e-5, atol=1e-6 * float(a.abs().max()))
    torch.testing.assert_close(n_fused, n, rtol=1e-5, atol=0)

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(fused, "_FUSED", {})
    monkeypatch.setattr(torch, "compile", broken)
    a_after, n_after = batch_confidence(model, batch, terms)
    assert fused._FUSED["fn"] is False
    torch.testing.assert_close(a_after, a, rtol=1e-6, atol=0)
    torch.testing.assert_close(n_after, n, rtol=1e-6, atol=0)

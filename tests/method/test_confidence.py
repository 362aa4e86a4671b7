"""Step 3: forgetting confidence c(x) against slow per-sample-backward references."""

import pytest
import torch
from conftest import FORGET_PROMPTS

from hf_lwf.method.confidence import (
    alignment_scores,
    batch_losses,
    combine,
    fisher_norms,
    reference_confidence,
    score_self_data,
    sequence_losses,
)
from hf_lwf.method.fisher import masked_fisher, trainable_parameters, update_mask, weighted_direction
from hf_lwf.method.selfgen import collate_self_data, encode_prompt, generate_self_data


def _rows(tokenizer):
    """Self-data-like rows of different prompt and response lengths."""
    responses = [[40, 41, 42, 1], [50, 51], [60, 61, 62, 63, 64, 65, 1], [70]]
    return [
        {"task": "t", "prompt": p, "prompt_ids": encode_prompt(tokenizer, p), "response_ids": r, "text": ""}
        for p, r in zip(FORGET_PROMPTS, responses)
    ]


def _fisher_and_delta(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = trainable_parameters(model)
    fisher = {n: torch.rand(p.shape, generator=g) * 1e-2 for n, p in params.items()}
    delta = {n: torch.randn(p.shape, generator=g) * 1e-3 for n, p in params.items()}
    return fisher, delta


def _per_sample_grads(model, batch):
    """The obvious reference: one backward per row, on that row alone with its padding removed."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = []
    for i in range(batch["input_ids"].shape[0]):
        model.zero_grad(set_to_none=True)
        keep = batch["attention_mask"][i].bool()
        ids, labels = batch["input_ids"][i][keep].unsqueeze(0), batch["labels"][i][keep].unsqueeze(0)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        sequence_losses(logits, labels)[0].backward()
        out.append({n: p.grad.detach().double().clone() for n, p in params.items()})
    model.zero_grad(set_to_none=True)
    return out


def _assert_close_scaled(actual, expected, rtol=1e-5):
    actual, expected = actual.double(), expected.double()
    scale = float(expected.abs().max())
    assert scale > 0
    assert float((actual - expected).abs().max()) <= rtol * scale, (actual, expected)


# ---------------------------------------------------------------- losses


def test_sequence_losses_match_a_hand_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.tensor([
        [-100, -100, 3, 4, 5, -100],
        [-100, 7, 8, 9, 10, 1],
        [-100, -100, -100, -100, -100, -100],
    ])
    expected = []
    for b in range(3):
        terms = [-torch.log_softmax(logits[b, t - 1].double(), -1)[labels[b, t]] for t in range(1, 6) if labels[b, t] != -100]
        expected.append(sum(terms) / len(terms) if terms else torch.tensor(0.0, dtype=torch.float64))
    losses = sequence_losses(logits, labels)
    assert losses.shape == (3,) and losses.dtype == torch.float32
    torch.testing.assert_close(losses.double(), torch.stack(expected), rtol=1e-6, atol=1e-7)
    assert losses[2].item() == 0.0  # no response token: zero, not NaN
    half = sequence_losses(logits.half(), labels)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), torch.stack(expected), rtol=1e-2, atol=1e-2)


def test_batch_losses_equal_the_model_loss_per_row(model, tokenizer):
    batch = collate_self_data(_rows(tokenizer), tokenizer.pad_token_id)
    losses = batch_losses(model, batch)
    for i in range(4):
        single = {k: v[i : i + 1] for k, v in batch.items()}
        torch.testing.assert_close(losses[i], model(**single).loss.float(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- combine


def test_combine_formula():
    a, n = torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.5])
    assert combine(a, n, 0.1, "alignment").tolist() == pytest.approx([0.1, -0.2])
    assert combine(a, None, 0.1, "alignment").tolist() == pytest.approx([0.1, -0.2])
    assert combine(a, n, 0.1, "deviation").tolist() == pytest.approx([0.1 + 0.02, -0.2 + 0.0025])
    with pytest.raises(ValueError, match="n\\(x\\)"):
        combine(a, None, 0.1, "deviation")


# ---------------------------------------------------------------- alignment (JVP) and norms


def test_alignment_scores_match_per_sample_backward(model, tokenizer):
    assert model.config._attn_implementation == "sdpa"
    batch = collate_self_data(_rows(tokenizer), tokenizer.pad_token_id)
    fisher, delta = _fisher_and_delta(model)
    direction = weighted_direction(fisher, delta, None)
    scores = alignment_scores(model, batch, direction)
    assert model.config._attn_implementation == "sdpa"  # restored after the eager switch
    assert scores.shape == (4,) and scores.dtype == torch.float32
    grads = _per_sample_grads(model, batch)
    expected = torch.stack([sum((g[n] * direction[n].double()).sum() for n in direction) for g in grads])
    _assert_close_scaled(scores, expected)
    assert all(p.grad is None for p in model.parameters())


def test_alignment_scores_on_a_subset_of_parameters(model, tokenizer):
    batch = collate_self_data(_rows(tokenizer)[:2], tokenizer.pad_token_id)
    fisher, delta = _fisher_and_delta(model, seed=3)
    names = [n for n in fisher if "mlp" in n or "embed" in n or "wte" in n]
    direction = {n: fisher[n] * delta[n] for n in names}
    scores = alignment_scores(model, batch, direction)
    grads = _per_sample_grads(model, batch)
    expected = torch.stack([sum((g[n] * direction[n].double()).sum() for n in names) for g in grads])
    _assert_close_scaled(scores, expected)


def test_fisher_norms_match_per_sample_backward(model, tokenizer):
    batch = collate_self_data(_rows(tokenizer), tokenizer.pad_token_id)
    fisher, delta = _fisher_and_delta(model)
    curvature = masked_fisher(fisher, update_mask(fisher, delta, 0.3))
    norms = fisher_norms(model, batch, curvature)
    grads = _per_sample_grads(model, batch)
    expected = torch.stack([sum((curvature[n].double() * g[n] ** 2).sum() for n in curvature) for g in grads])
    _assert_close_scaled(norms, expected)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("mode", ["deviation", "alignment"])
def test_reference_confidence_is_the_quadratic_model(model, tokenizer, mode):
    """c(x) = 1/2 (u - D)^T F_M (u - D) - 1/2 D^T F_M D with u = -eta g_x (alignment: only the linear term)."""
    batch = collate_self_data(_rows(tokenizer), tokenizer.pad_token_id)
    fisher, delta = _fisher_and_delta(model, seed=5)
    mask = update_mask(fisher, delta, 0.5)
    lr = 0.05
    c = reference_confidence(model, batch, weighted_direction(fisher, delta, mask), masked_fisher(fisher, mask), lr, mode)
    expected = []
    for g in _per_sample_grads(model, batch):
        fm = {n: (fisher[n] * mask[n]).double() for n in fisher}
        d = {n: delta[n].double() for n in fisher}
        if mode == "deviation":
            u = {n: -lr * g[n] for n in fisher}
            value = sum(0.5 * (fm[n] * (u[n] - d[n]) ** 2).sum() - 0.5 * (fm[n] * d[n] ** 2).sum() for n in fisher)
        else:
            value = sum(lr * (g[n] * fm[n] * d[n]).sum() for n in fisher)
        expected.append(value)
    _assert_close_scaled(c, torch.stack(expected), rtol=1e-4)


# ---------------------------------------------------------------- score_self_data


@pytest.mark.parametrize("mode", ["deviation", "alignment"])
def test_score_self_data_equals_reference_over_generated_rows(model, tokenizer, mode):
    ds = generate_self_data(model, tokenizer, {"a": FORGET_PROMPTS[:2], "b": FORGET_PROMPTS[2:]}, samples_per_prompt=2,
                            max_new_tokens=5, seed=3, show_progress=False)
    assert len(ds) >= 5
    fisher, delta = _fisher_and_delta(model, seed=2)
    mask = update_mask(fisher, delta, 0.5)
    direction, curvature = weighted_direction(fisher, delta, mask), masked_fisher(fisher, mask)
    lr = 0.1
    model.train()
    scores = score_self_data(model, ds, tokenizer.pad_token_id, direction, curvature, lr, mode, batch_size=3,
                             show_progress=False)
    assert model.training and all(m.training for m in model.modules())
    assert model.config._attn_implementation == "sdpa"
    assert all(p.grad is None for p in model.parameters())
    assert scores.shape == (len(ds),) and scores.dtype == torch.float32 and scores.device.type == "cpu"

    model.eval()
    rows = list(ds)
    expected = torch.cat([
        reference_confidence(model, collate_self_data([row], tokenizer.pad_token_id), direction, curvature, lr, mode)
        for row in rows
    ])
    _assert_close_scaled(scores, expected, rtol=1e-4)
    # The same rows in one padded batch give the same reference values.
    batched = reference_confidence(model, collate_self_data(rows, tokenizer.pad_token_id), direction, curvature, lr, mode)
    _assert_close_scaled(batched, expected, rtol=1e-4)


def test_deviation_adds_the_positive_quadratic_term(llama, tokenizer):
    llama.eval()
    rows = _rows(tokenizer)
    fisher, delta = _fisher_and_delta(llama)
    direction, curvature = weighted_direction(fisher, delta, None), masked_fisher(fisher, None)
    dev = score_self_data(llama, rows, 0, direction, curvature, 0.5, "deviation", show_progress=False)
    ali = score_self_data(llama, rows, 0, direction, curvature, 0.5, "alignment", show_progress=False)
    norms = fisher_norms(llama, collate_self_data(rows, 0), curvature)
    assert bool((norms > 0).all())
    torch.testing.assert_close(dev, ali + 0.5 * 0.25 * norms, rtol=1e-5, atol=1e-9)


def test_alignment_is_linear_in_the_direction(llama, tokenizer):
    llama.eval()
    batch = collate_self_data(_rows(tokenizer), 0)
    fisher, delta = _fisher_and_delta(llama)
    w = weighted_direction(fisher, delta, None)
    a = alignment_scores(llama, batch, w)
    a_neg = alignment_scores(llama, batch, {n: -2 * t for n, t in w.items()})
    torch.testing.assert_close(a_neg, -2 * a, rtol=1e-5, atol=1e-12)
    zero = alignment_scores(llama, batch, {n: torch.zeros_like(t) for n, t in w.items()})
    assert zero.tolist() == [0.0] * 4


# ---------------------------------------------------------------- families whose per-sample rules once went wrong


@pytest.mark.parametrize("family", ["gemma", "gemma3", "mixtral", "opt", "ia3", "lora_embed_head"])
@pytest.mark.parametrize("mode", ["deviation", "alignment"])
def test_score_self_data_is_exact_on_every_family(tokenizer, family, mode):
    """c(x) of padded, length-sorted scoring batches against the unpadded per-row loop (plain autograd)."""
    from test_persample import _adapted, _tiny

    model = _tiny(family, len(tokenizer)) if family in ("gemma", "gemma3", "mixtral", "opt") else _adapted(
        family, len(tokenizer))
    rows = _rows(tokenizer)
    fisher, delta = _fisher_and_delta(model, seed=9)
    mask = update_mask(fisher, delta, 0.5)
    direction, curvature = weighted_direction(fisher, delta, mask), masked_fisher(fisher, mask)
    lr = 0.1
    scores = score_self_data(model, rows, tokenizer.pad_token_id, direction, curvature, lr, mode, batch_size=3,
                             show_progress=False)
    grads = _per_sample_grads(model, collate_self_data(rows, tokenizer.pad_token_id))
    a = torch.stack([sum((g[n] * direction[n].double()).sum() for n in direction) for g in grads])
    n = torch.stack([sum((curvature[k].double() * g[k] ** 2).sum() for k in curvature) for g in grads])
    expected = lr * a + (0.5 * lr**2 * n if mode == "deviation" else 0.0)
    _assert_close_scaled(scores, expected, rtol=1e-4)


# ---------------------------------------------------------------- a learning rate per optimizer param group


def _groups(model):
    """Three param groups as a Trainer setup may make them: the output (and tied input) embedding at 10x, the norms
    and biases at 0.5x (a no-decay group), the rest at the base rate; returns the optimizer and its rates."""
    params = trainable_parameters(model)
    head = [p for n, p in params.items() if "lm_head" in n or "wte" in n]
    small = [p for n, p in params.items() if p.dim() == 1]
    rest = [p for p in params.values() if all(p is not q for q in head + small)]
    optimizer = torch.optim.AdamW([{"params": rest, "lr": 0.04}, {"params": head, "lr": 0.4},
                                   {"params": small, "lr": 0.02, "weight_decay": 0.0}])
    return optimizer, [group["lr"] for group in optimizer.param_groups]


def _per_group_reference(grads, fisher, delta, mask, rates, mode):
    """c(x) of the quadratic model with the step u = -eta_p g_x on each parameter p, in float64, from plain per-sample
    gradients: 1/2 (u - D)^T F_M (u - D) - 1/2 D^T F_M D (alignment: its linear term, -u^T F_M D)."""
    out = []
    for g in grads:
        value = torch.zeros((), dtype=torch.float64)
        for n in fisher:
            fm = fisher[n].double() * (mask[n].double() if mask is not None else 1.0)
            d, u = delta[n].double(), -rates[n] * g[n]
            if mode == "deviation":
                value = value + 0.5 * (fm * (u - d) ** 2).sum() - 0.5 * (fm * d**2).sum()
            else:
                value = value - (u * fm * d).sum()
        out.append(value)
    return torch.stack(out)


def test_parameter_rates_follow_the_param_groups(llama):
    from hf_lwf.method.confidence import parameter_rates

    params = trainable_parameters(llama)
    optimizer, rates = _groups(llama)
    got = parameter_rates(optimizer, params, rates)
    assert got["lm_head.weight"] == 0.4 and got["model.norm.weight"] == 0.02
    assert got["model.layers.0.self_attn.q_proj.weight"] == 0.04 and set(got) == set(params)
    assert parameter_rates(optimizer.param_groups, params, [1.0, 2.0, 3.0])["lm_head.weight"] == 2.0
    with pytest.raises(ValueError, match="3 param groups"):
        parameter_rates(optimizer, params, [0.1])
    lonely = torch.optim.SGD([p for n, p in params.items() if n != "model.embed_tokens.weight"], lr=0.1)
    with pytest.raises(ValueError, match="model.embed_tokens.weight is in no param group"):
        parameter_rates(lonely, params, [0.1])


@pytest.mark.parametrize("mode", ["deviation", "alignment"])
def test_scores_use_each_param_groups_rate(model, tokenizer, mode):
    """sum_g eta_g a_g(x) + eta_g**2 / 2 n_g(x) with three groups at different rates, from theta_ref and the live
    weights (the periodic schedule) and from a given D (the early one), hooks and forward-mode JVP, against one
    plain backward per unpadded sample in float64."""
    from hf_lwf.method.confidence import alignment_scores_from_terms, parameter_rates
    from hf_lwf.method.fisher import ScoringTerms

    rows = _rows(tokenizer)
    params = trainable_parameters(model)
    optimizer, group_rates = _groups(model)
    rates = parameter_rates(optimizer, params, group_rates)
    assert len(set(rates.values())) == 3
    fisher, delta = _fisher_and_delta(model, seed=4)
    reference = {n: p.detach() - delta[n] for n, p in params.items()}
    live_delta = {n: p.detach() - reference[n] for n, p in params.items()}  # D as fp32 forms it from theta_ref
    grads = _per_sample_grads(model, collate_self_data(rows, tokenizer.pad_token_id))
    for ratio in (1.0, 0.4):
        periodic = ScoringTerms.from_state(fisher, model=model, reference=reference, mask_ratio=ratio, rates=rates)
        early = ScoringTerms.from_state(fisher, delta=delta, mask_ratio=ratio, rates=rates)
        for terms, d in ((periodic, live_delta), (early, delta)):
            expected = _per_group_reference(grads, fisher, d, update_mask(fisher, d, ratio), rates, mode)
            scores = score_self_data(model, rows, tokenizer.pad_token_id, terms, None, 1.0, mode, batch_size=3,
                                     show_progress=False)
            _assert_close_scaled(scores, expected, rtol=1e-4)
            if mode == "alignment":
                jvp = score_self_data(model, rows, tokenizer.pad_token_id, terms, None, 1.0, mode, batch_size=3,
                                      show_progress=False, alignment="jvp")
                _assert_close_scaled(jvp, expected, rtol=1e-4)
                batch = collate_self_data(rows, tokenizer.pad_token_id)
                _assert_close_scaled(alignment_scores_from_terms(model, batch, terms), expected, rtol=1e-4)
    # group 0's rate for every parameter (what scoring did before) is far from it
    single = ScoringTerms.from_state(fisher, delta=delta)
    wrong = score_self_data(model, rows, tokenizer.pad_token_id, single, None, group_rates[0], mode, show_progress=False)
    expected = _per_group_reference(grads, fisher, delta, None, rates, mode)
    assert float((wrong.double() - expected).abs().max()) > 0.1 * float(expected.abs().max())


def test_explicit_terms_take_rates_and_a_rate_is_never_applied_twice(llama, tokenizer):
    from hf_lwf.method.fisher import ScoringTerms

    rows = _rows(tokenizer)
    fisher, delta = _fisher_and_delta(llama, seed=6)
    direction, curvature = weighted_direction(fisher, delta, None), masked_fisher(fisher, None)
    one_rate = score_self_data(llama, rows, 0, direction, curvature, 0.3, "deviation", show_progress=False)
    terms = ScoringTerms.explicit(direction, curvature, rates={n: 0.3 for n in fisher})
    rated = score_self_data(llama, rows, 0, terms, None, 1.0, "deviation", show_progress=False)
    torch.testing.assert_close(rated, one_rate, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="pass lr=1"):
        score_self_data(llama, rows, 0, terms, None, 0.3, "deviation", show_progress=False)
    with pytest.raises(ValueError, match="no learning rate for 1 scored parameters .first: lm_head.weight"):
        ScoringTerms.from_state(fisher, delta=delta, rates={n: 0.1 for n in fisher if n != "lm_head.weight"})
    with pytest.raises(ValueError, match="lm_head.weight the learning rate nan"):
        ScoringTerms.explicit(direction, curvature, rates={n: float("nan") if "lm_head" in n else 0.1 for n in fisher})

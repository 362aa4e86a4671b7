"""Steps 4 and 5: selection of D_U, the cyclic sampler and bounded gradient ascent."""

import math
from fractions import Fraction

import pytest
import torch
from conftest import FORGET_PROMPTS, tiny_llama

from hf_lwf.method.common import batch_losses
from hf_lwf.method.head import response_losses
from hf_lwf.method.selfgen import collate_self_data, encode_prompt
from hf_lwf.method.unlearn import (
    ForgetSampler,
    PreconditionedAscent,
    ascent_step,
    check_preconditioner,
    forget_size,
    select_forget_set,
)


SCORES = torch.tensor([0.5, -1.0, 3.0, 2.0, 0.1, -0.2, 4.0, 1.0])
TASKS = ["a", "b"] * 4  # a: 0, 2, 4, 6 -> 0.5, 3, 0.1, 4; b: 1, 3, 5, 7 -> -1, 2, -0.2, 1


# ---------------------------------------------------------------- forget_size


@pytest.mark.parametrize("n,ratio", [(8, 0.25), (10, 0.25), (7, 0.5), (100, 0.07), (50, 0.14), (25, 0.28), (100, 0.55),
                                     (1, 0.01), (3, 1.0), (30, 0.1), (0, 0.25)])
def test_forget_size_is_the_exact_ceiling(n, ratio):
    assert forget_size(n, ("ratio", ratio)) == math.ceil(Fraction(str(ratio)) * n)


def test_forget_size_top_k():
    assert forget_size(10, ("top_k", 3)) == 3
    assert forget_size(2, ("top_k", 3)) == 2


# ---------------------------------------------------------------- select_forget_set


@pytest.mark.parametrize("amount,expected", [
    (("ratio", 0.25), [2, 6]),            # ceil(2.0) = 2
    (("ratio", 0.3), [2, 3, 6]),          # ceil(2.4) = 3
    (("ratio", 1.0), [0, 2, 3, 4, 6, 7]),  # only the six above the threshold
    (("top_k", 1), [6]),
    (("top_k", 5), [0, 2, 3, 6, 7]),
    (("top_k", 100), [0, 2, 3, 4, 6, 7]),
])
def test_top_selection(amount, expected):
    assert select_forget_set(SCORES, TASKS, amount) == expected


def test_threshold():
    assert select_forget_set(SCORES, TASKS, ("ratio", 1.0), threshold=1.5) == [2, 3, 6]
    assert select_forget_set(SCORES, TASKS, ("ratio", 1.0), threshold=-0.5) == [0, 2, 3, 4, 5, 6, 7]
    assert select_forget_set(SCORES, TASKS, ("ratio", 1.0), threshold=1.0) == [2, 3, 6]  # strictly above


def test_bottom_selection_takes_the_lowest_with_the_same_size():
    assert select_forget_set(SCORES, TASKS, ("ratio", 0.25), selection="bottom") == [1, 5]
    assert select_forget_set(SCORES, TASKS, ("top_k", 3), selection="bottom") == [1, 4, 5]


def test_all_selection_takes_everything():
    assert select_forget_set(SCORES, TASKS, ("ratio", 0.25), selection="all") == list(range(8))
    assert select_forget_set(SCORES, TASKS, ("top_k", 1), selection="all", threshold=100.0) == list(range(8))


def test_random_selection_is_seeded_and_uniform_sized():
    picks = [select_forget_set(SCORES, TASKS, ("ratio", 0.3), selection="random", seed=s) for s in range(20)]
    assert all(len(p) == 3 and len(set(p)) == 3 and p == sorted(p) for p in picks)
    assert picks[0] == select_forget_set(SCORES, TASKS, ("ratio", 0.3), selection="random", seed=0)
    assert len({tuple(p) for p in picks}) > 1  # the seed matters
    expected = sorted(torch.randperm(8, generator=torch.Generator().manual_seed(4))[:3].tolist())
    assert picks[4] == expected


@pytest.mark.parametrize("amount", [("ratio", 0.25), ("ratio", 0.6), ("top_k", 4)])
@pytest.mark.parametrize("per_task", [False, True])
def test_ablations_have_the_size_of_top(amount, per_task):
    sizes = {sel: len(select_forget_set(SCORES, TASKS, amount, selection=sel, per_task=per_task, seed=1))
             for sel in ("top", "bottom", "random")}
    assert len(set(sizes.values())) == 1, sizes


def test_per_task_selection():
    assert select_forget_set(SCORES, TASKS, ("ratio", 0.25)) == [2, 6]  # both from task a
    assert select_forget_set(SCORES, TASKS, ("ratio", 0.25), per_task=True) == [3, 6]  # one per task
    assert select_forget_set(SCORES, TASKS, ("top_k", 2), per_task=True) == [2, 3, 6, 7]
    assert select_forget_set(SCORES, TASKS, ("top_k", 2), per_task=True, threshold=1.5) == [2, 3, 6]
    assert select_forget_set(SCORES, TASKS, ("ratio", 0.25), per_task=True, selection="bottom") == [1, 4]


def test_nothing_above_threshold_gives_an_empty_set():
    for selection in ("top", "bottom", "random"):
        assert select_forget_set(SCORES, TASKS, ("ratio", 0.5), threshold=10.0, selection=selection) == []
    assert select_forget_set(-SCORES.abs() - 1, TASKS, ("top_k", 3)) == []
    assert select_forget_set(torch.zeros(0), [], ("ratio", 0.25)) == []


def test_ties_are_broken_by_index():
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 1.0])
    assert select_forget_set(scores, ["t"] * 5, ("top_k", 2)) == [1, 2]
    assert select_forget_set(scores, ["t"] * 5, ("top_k", 1), selection="bottom") == [0]


def test_non_finite_scores_are_never_selected_by_top():
    scores = torch.tensor([float("nan"), 1.0, 2.0, float("nan")])
    assert select_forget_set(scores, ["t"] * 4, ("ratio", 1.0)) == [1, 2]
    assert select_forget_set(scores, ["t"] * 4, ("top_k", 1)) == [2]


def test_selection_errors():
    with pytest.raises(ValueError, match="3 scores but 2 task names"):
        select_forget_set(torch.ones(3), ["a", "b"], ("ratio", 0.5))
    with pytest.raises(ValueError, match="`lwf_selection`"):
        select_forget_set(SCORES, TASKS, ("ratio", 0.5), selection="best")


# ---------------------------------------------------------------- ForgetSampler


def _perm(size, seed):
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()


def test_sampler_cycles_through_seeded_permutations():
    sampler = ForgetSampler(5, seed=3)
    drawn = [sampler.next_batch(2) for _ in range(5)]
    stream = _perm(5, 3) + _perm(5, 4)
    assert drawn == [stream[0:2], stream[2:4], stream[4:6], stream[6:8], stream[8:10]]
    assert sorted(stream[:5]) == sorted(stream[5:]) == list(range(5))
    assert _perm(5, 3) != _perm(5, 4)  # a new epoch reshuffles
    assert sampler.state_dict() == {"size": 5, "seed": 3, "epoch": 1, "position": 5}


def test_sampler_batch_larger_than_the_set():
    sampler = ForgetSampler(3, seed=0)
    assert sorted(sampler.next_batch(10)) == [0, 1, 2]
    assert ForgetSampler(0, seed=0).next_batch(4) == []


def test_sampler_is_deterministic_across_instances():
    a, b = ForgetSampler(7, seed=11), ForgetSampler(7, seed=11)
    assert [a.next_batch(3) for _ in range(6)] == [b.next_batch(3) for _ in range(6)]
    c = ForgetSampler(7, seed=12)
    assert [ForgetSampler(7, seed=11).next_batch(7)] != [c.next_batch(7)]


def test_sampler_state_dict_round_trip_continues_identically():
    original = ForgetSampler(6, seed=2)
    for _ in range(4):
        original.next_batch(4)
    restored = ForgetSampler(**original.state_dict())
    assert restored.state_dict() == original.state_dict()
    assert [restored.next_batch(4) for _ in range(5)] == [original.next_batch(4) for _ in range(5)]


# ---------------------------------------------------------------- ascent_step


def _batch(tokenizer):
    responses = [[40, 41, 42, 1], [50, 51], [60, 61, 62, 63, 64, 65, 1], [70]]
    rows = [{"prompt_ids": encode_prompt(tokenizer, p), "response_ids": r} for p, r in zip(FORGET_PROMPTS, responses)]
    return collate_self_data(rows, tokenizer.pad_token_id)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _expected_sgd(model, batch, lr, coef, keep=None):
    """theta - lr * grad(-coef * mean of the kept losses), computed with plain autograd."""
    params = dict(model.named_parameters())
    losses = batch_losses(model, batch)
    keep = torch.ones(len(losses), dtype=torch.bool) if keep is None else keep
    grads = torch.autograd.grad(-coef * losses[keep].mean(), list(params.values()))
    return {n: p.detach() - lr * g for (n, p), g in zip(params.items(), grads)}, grads


def _assert_close_scaled(actual, expected, rtol=1e-4):
    """Elementwise closeness relative to the largest entry (weight differences lose float32 digits)."""
    scale = float(expected.abs().max())
    assert scale > 0
    assert float((actual - expected).abs().max()) <= rtol * scale


def _step(model, batch, lr=0.1, **kwargs):
    values = dict(coef=1.0, loss_cap=100.0, max_grad_norm=0.0)
    values.update(kwargs)
    return ascent_step(model, batch, torch.optim.SGD(model.parameters(), lr=lr), **values)


def test_ascent_step_is_sgd_on_the_negative_mean_loss(llama, tokenizer):
    batch = _batch(tokenizer)
    with torch.no_grad():
        before_losses = batch_losses(llama, batch)
    expected, grads = _expected_sgd(llama, batch, lr=0.1, coef=1.0)
    result = _step(llama, batch, lr=0.1)
    assert result["kept"] == 4 and result["skipped"] == 0
    assert result["forget_loss"] == pytest.approx(float(before_losses.mean()), rel=1e-6)
    assert result["grad_norm"] == pytest.approx(float(torch.cat([g.reshape(-1) for g in grads]).norm()), rel=1e-5)
    for n, p in llama.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in llama.parameters())
    with torch.no_grad():
        after_losses = batch_losses(llama, batch)
    assert float(after_losses.mean()) > float(before_losses.mean())


def test_coef_scales_the_update(tokenizer):
    from conftest import tiny_llama

    batch = _batch(tokenizer)
    moves = {}
    for coef in (1.0, 2.5):
        model = tiny_llama(len(tokenizer), seed=4)
        start = _weights(model)
        _step(model, batch, lr=0.1, coef=coef)
        moves[coef] = torch.cat([(p.detach() - start[n]).reshape(-1) for n, p in model.named_parameters()])
    _assert_close_scaled(moves[2.5], 2.5 * moves[1.0])


def test_loss_cap_drops_samples_already_forgotten(llama, tokenizer):
    batch = _batch(tokenizer)
    with torch.no_grad():
        losses = batch_losses(llama, batch)
    cap = float(losses.median())
    keep = losses < cap
    assert 0 < int(keep.sum()) < 4
    expected, _ = _expected_sgd(llama, batch, lr=0.1, coef=1.0, keep=keep)
    result = _step(llama, batch, lr=0.1, loss_cap=cap)
    assert result["kept"] == int(keep.sum()) and result["skipped"] == 0
    assert result["forget_loss"] == pytest.approx(float(losses.mean()), rel=1e-6)  # batch mean before the step
    for n, p in llama.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-7)


def test_all_samples_above_the_cap_leaves_weights_unchanged(llama, tokenizer):
    batch = _batch(tokenizer)
    start = _weights(llama)
    result = _step(llama, batch, loss_cap=1e-3)
    assert result["kept"] == 0 and result["skipped"] == 0 and result["applied"] == 0 and "grad_norm" not in result
    assert all(torch.equal(p, start[n]) for n, p in llama.named_parameters())
    assert all(p.grad is None for p in llama.parameters())


def test_gradient_is_clipped_to_max_grad_norm(llama, tokenizer):
    batch = _batch(tokenizer)
    _, grads = _expected_sgd(llama, batch, lr=1.0, coef=1.0)
    flat = torch.cat([g.reshape(-1) for g in grads])
    max_norm = 0.1 * float(flat.norm())
    start = _weights(llama)
    result = _step(llama, batch, lr=1.0, max_grad_norm=max_norm)
    assert result["grad_norm"] == pytest.approx(float(flat.norm()), rel=1e-5)  # norm before clipping
    move = torch.cat([(p.detach() - start[n]).reshape(-1) for n, p in llama.named_parameters()])
    assert float(move.norm()) == pytest.approx(max_norm, rel=1e-4)
    _assert_close_scaled(move, -flat * (max_norm / float(flat.norm())))


def test_small_gradient_is_not_clipped(llama, tokenizer):
    batch = _batch(tokenizer)
    expected, grads = _expected_sgd(llama, batch, lr=0.1, coef=1.0)
    norm = float(torch.cat([g.reshape(-1) for g in grads]).norm())
    _step(llama, batch, lr=0.1, max_grad_norm=10 * norm)
    for n, p in llama.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-7)


def test_frozen_parameters_are_not_touched(llama, tokenizer):
    llama.model.embed_tokens.weight.requires_grad_(False)
    start = _weights(llama)
    _step(llama, _batch(tokenizer))
    assert torch.equal(llama.model.embed_tokens.weight, start["model.embed_tokens.weight"])
    assert not torch.equal(llama.lm_head.weight, start["lm_head.weight"])


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_loss_skips_the_step(llama, tokenizer, value):
    batch = _batch(tokenizer)
    start = _weights(llama)

    def poison(module, inputs, output):
        output = output.clone()
        output[0] = value
        return output

    hook = llama.lm_head.register_forward_hook(poison)
    try:
        result = _step(llama, batch, lr=0.1)
    finally:
        hook.remove()
    assert result["skipped"] == 1 and "grad_norm" not in result
    assert math.isfinite(result["forget_loss"])
    assert all(torch.equal(p, start[n]) for n, p in llama.named_parameters())
    assert all(bool(torch.isfinite(p).all()) for p in llama.parameters())
    assert all(p.grad is None for p in llama.parameters())


def test_non_finite_gradient_skips_the_step(llama, tokenizer):
    batch = _batch(tokenizer)
    start = _weights(llama)
    handle = llama.lm_head.weight.register_hook(lambda g: g * float("nan"))
    try:
        result = _step(llama, batch, lr=0.1, max_grad_norm=1.0)
    finally:
        handle.remove()
    assert result["skipped"] == 1 and "grad_norm" not in result
    assert all(torch.equal(p, start[n]) for n, p in llama.named_parameters())
    assert all(p.grad is None for p in llama.parameters())


@pytest.mark.parametrize("selection", ["top", "bottom", "random", "all"])
def test_non_finite_scores_are_never_selected(selection):
    scores = torch.tensor([0.5, float("nan"), -0.2, float("inf"), 0.1, float("-inf")])
    chosen = select_forget_set(scores, ["t"] * 6, ("ratio", 1.0), threshold=-1.0, selection=selection, seed=3)
    assert chosen and not set(chosen) & {1, 3, 5}


def test_ascent_loss_scale_is_exact_in_fp32(tokenizer):
    batch = _batch(tokenizer)
    plain, scaled = tiny_llama(len(tokenizer)), tiny_llama(len(tokenizer))
    _step(plain, batch)
    result = _step(scaled, batch, loss_scale=1024.0)
    assert result["applied"] == 1
    for (name, p), q in zip(plain.named_parameters(), scaled.parameters()):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-7, msg=name)


def test_fp16_ascent_needs_the_loss_scale_to_move_small_gradients(tokenizer):
    """Under fp16 autocast a small ascent loss underflows to zero gradients unless it is scaled like the learning step."""
    batch = _batch(tokenizer)

    def update(loss_scale, amp):
        model = tiny_llama(len(tokenizer))
        before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
            _step(model, batch, lr=1.0, coef=1e-6, loss_scale=loss_scale)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before

    reference = update(1.0, amp=False)

    def error(update_):
        return float((update_ - reference).norm() / reference.norm())

    assert error(update(1.0, amp=True)) > 0.5  # the failure the scale prevents: most of the update underflows
    assert error(update(2.0**16, amp=True)) < 0.05


def test_loss_scale_is_read_from_the_learning_optimizer():
    from types import SimpleNamespace

    from hf_lwf.run import loss_scale_of

    assert loss_scale_of(SimpleNamespace(scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))) == 1024.0
    assert loss_scale_of(SimpleNamespace(scaler=torch.amp.GradScaler("cpu", enabled=False))) == 1.0
    assert loss_scale_of(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)) == 1.0


# ---------------------------------------------------------------- preconditioned ascent


def _learned_adamw(model, batch, steps=3, **kwargs):
    """An AdamW (two param groups with different rates) after ``steps`` learning steps on ``batch``."""
    head = [model.lm_head.weight]
    rest = [p for n, p in model.named_parameters() if n != "lm_head.weight"]
    optimizer = torch.optim.AdamW([{"params": rest, "lr": 1e-3}, {"params": head, "lr": 2e-3}], weight_decay=0.1,
                                  **kwargs)
    for _ in range(steps):
        optimizer.zero_grad()
        batch_losses(model, batch).mean().backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def _learning_batch(tokenizer):
    rows = [{"prompt_ids": encode_prompt(tokenizer, p), "response_ids": [30 + i, 31, 32, 1]}
            for i, p in enumerate(FORGET_PROMPTS[::-1])]
    return collate_self_data(rows, tokenizer.pad_token_id)


def _hand_preconditioned(model, batch, optimizer, rates, coef, max_norm):
    """Delta = coef * eta * g / (max(sqrt(v_hat), |g|) + eps) in float64, g the clipped gradient of the mean loss."""
    params = dict(model.named_parameters())
    # the gradient of the loss the ascent differentiates (its chunked output layer agrees with batch_losses to fp32
    # rounding, tests/method/test_head.py), so that the update rule is compared at float32 rounding
    grads = torch.autograd.grad(response_losses(model, batch).mean(), list(params.values()))
    grads = [g.double() for g in grads]
    norm = float(torch.cat([g.reshape(-1) for g in grads]).norm())
    factor = min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0
    group_of = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
    expected, regimes = {}, [0, 0]
    for (name, p), g in zip(params.items(), grads):
        g = g * factor
        group = optimizer.param_groups[group_of[id(p)]]
        state = optimizer.state.get(p)
        if state:
            key = "max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"
            root = (state[key].double() / (1 - group["betas"][1] ** float(state["step"]))).sqrt()
        else:
            root = torch.zeros_like(g)
        regimes[0] += int((g.abs() <= root).sum())  # Delta = coef * eta * g / (sqrt(v_hat) + eps) exactly
        regimes[1] += int((g.abs() > root).sum())  # bounded: |Delta| = coef * eta
        denom = torch.maximum(root, g.abs()) + group["eps"]
        expected[name] = p.detach().double() + coef * rates[group_of[id(p)]] * g / denom
    return expected, regimes


def _assert_float32_rounding(param, expected, start, name=""):
    """``param`` (float32) equals the float64 ``expected`` up to float32 rounding of theta (|theta| ~ 1 loses 6e-8)
    and of the float32 step (relative 1e-5 of Delta: the gradients themselves are float32)."""
    error = (param.detach().double() - expected).abs()
    bound = 1.2e-7 * expected.abs() + 1e-5 * (expected - start).abs() + 1e-12
    worst = float((error - bound).max())
    assert worst <= 0, f"{name}: {float(error.max())} over the bound"


def _state_copy(optimizer):
    return {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for p, s in optimizer.state.items()}


def _assert_state_unchanged(optimizer, saved):
    assert set(saved) == {id(p) for p in optimizer.state}
    for p, state in optimizer.state.items():
        assert state.keys() == saved[id(p)].keys()
        for key, value in state.items():
            assert torch.equal(value, saved[id(p)][key]) if torch.is_tensor(value) else value == saved[id(p)][key]


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("max_norm", [0.0, 0.5])
def test_preconditioned_ascent_matches_the_hand_computation_and_writes_no_optimizer_state(
        tokenizer, amsgrad, max_norm):
    model = tiny_llama(len(tokenizer), seed=2)
    optimizer = _learned_adamw(model, _learning_batch(tokenizer), amsgrad=amsgrad)
    batch, rates, coef = _batch(tokenizer), [3e-4, 7e-4], 0.5
    expected, regimes = _hand_preconditioned(model, batch, optimizer, rates, coef, max_norm)
    assert regimes[0] > 0 and regimes[1] > 0  # both the formula and its bound are exercised
    saved = _state_copy(optimizer)
    start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    wrapped = type("AcceleratedOptimizerLike", (), {"optimizer": optimizer})()  # accelerate's wrapper shape
    update = PreconditionedAscent(wrapped, list(model.parameters()), coef=coef, lrs=rates)
    result = ascent_step(model, batch, update, coef=coef, loss_cap=100.0, max_grad_norm=max_norm)
    assert result["applied"] == 1 and result["skipped"] == 0
    for name, p in model.named_parameters():
        _assert_float32_rounding(p, expected[name], start[name], name)
        # the bound: |Delta| <= coef * eta of the parameter's group
        assert float((p.detach().double() - start[name]).abs().max()) <= coef * rates[name == "lm_head.weight"] * 1.001
    _assert_state_unchanged(optimizer, saved)
    assert int(update.clamped) == regimes[1]


def test_preconditioned_ascent_without_optimizer_state_takes_adams_first_step(tokenizer):
    """Before any learning step (the early schedule): |Delta| = coef * eta on every coordinate with a gradient."""
    model = tiny_llama(len(tokenizer), seed=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = _batch(tokenizer)
    expected, _ = _hand_preconditioned(model, batch, optimizer, [1e-3], 2.0, 0.0)
    start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    ascent_step(model, batch, PreconditionedAscent(optimizer, list(model.parameters()), coef=2.0, lrs=[1e-3]),
                coef=2.0, loss_cap=100.0, max_grad_norm=0.0)
    for name, p in model.named_parameters():
        _assert_float32_rounding(p, expected[name], start[name], name)
    assert not optimizer.state  # still nothing written


def test_preconditioned_ascent_raises_the_forget_loss(tokenizer):
    model = tiny_llama(len(tokenizer), seed=2)
    optimizer = _learned_adamw(model, _learning_batch(tokenizer))
    batch = _batch(tokenizer)
    with torch.no_grad():
        before = float(batch_losses(model, batch).mean())
    ascent_step(model, batch, PreconditionedAscent(optimizer, list(model.parameters()), coef=1.0, lrs=[1e-3, 1e-3]),
                coef=1.0, loss_cap=100.0, max_grad_norm=1.0)
    with torch.no_grad():
        assert float(batch_losses(model, batch).mean()) > before


def test_preconditioned_ascent_with_sgd_is_a_plain_step_at_eta(llama, tokenizer):
    batch = _batch(tokenizer)
    expected, _ = _expected_sgd(llama, batch, lr=0.3 * 0.5, coef=1.0)
    optimizer = torch.optim.SGD(llama.parameters(), lr=0.5, momentum=0.9)
    ascent_step(llama, batch, PreconditionedAscent(optimizer, list(llama.parameters()), coef=0.3, lrs=[0.5]),
                coef=0.3, loss_cap=100.0, max_grad_norm=0.0)
    for n, p in llama.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-7)
    assert not optimizer.state


def test_preconditioned_ascent_refuses_optimizers_without_a_known_preconditioner():
    param = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="lwf_unlearn_optimizer='sgd'.*Adagrad|Adagrad.*lwf_unlearn_optimizer='sgd'"):
        check_preconditioner(torch.optim.Adagrad([param]))
    assert check_preconditioner(torch.optim.AdamW([param])) is not None


def test_preconditioned_step_that_rounds_away_in_bf16_is_not_counted(tokenizer):
    """A step far below bf16's resolution leaves the weights bitwise equal: it must not count as applied."""
    model = tiny_llama(len(tokenizer), seed=2).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = _weights(model)
    result = ascent_step(model, _batch(tokenizer), PreconditionedAscent(optimizer, list(model.parameters()), coef=1.0,
                                                                        lrs=[1e-12]),
                         coef=1.0, loss_cap=100.0, max_grad_norm=0.0)
    assert result["applied"] == int(any(not torch.equal(p, start[n]) for n, p in model.named_parameters()))
    assert result["applied"] == 0


def test_preconditioned_ascent_divides_the_fp16_loss_scale_out(tokenizer):
    """The GradScaler handling is the same for the preconditioned step: scaled and unscaled runs take one step."""
    batch = _batch(tokenizer)
    moved = []
    for scale in (1.0, 1024.0):
        model = tiny_llama(len(tokenizer), seed=2)
        optimizer = _learned_adamw(model, _learning_batch(tokenizer))
        update = PreconditionedAscent(optimizer, list(model.parameters()), coef=1.0, lrs=[1e-3, 1e-3])
        assert ascent_step(model, batch, update, coef=1.0, loss_cap=100.0, max_grad_norm=1.0,
                           loss_scale=scale)["applied"] == 1
        moved.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(moved[1], moved[0], rtol=1e-5, atol=1e-7)

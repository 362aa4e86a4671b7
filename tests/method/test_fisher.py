"""Step 2: online and empirical Fisher, intended update, update mask and the weighted direction."""

import pytest
import torch
from conftest import LEARN_TEXTS

from hf_lwf.method.fisher import (
    bias_corrected,
    empirical_fisher,
    intended_update,
    masked_fisher,
    online_fisher_update_,
    per_sample_gradients,
    snapshot,
    trainable_parameters,
    update_mask,
    weighted_direction,
)


def _random_dict(seed, shapes=(("a", (3, 4)), ("b", (5,)), ("c", (2, 2, 2)))):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in shapes}


# ---------------------------------------------------------------- online Fisher


def test_online_update_matches_the_formula_over_several_steps():
    decay = 0.9
    fisher = {}
    expected = {name: torch.zeros_like(t, dtype=torch.float64) for name, t in _random_dict(0).items()}
    for step in range(5):
        grads = _random_dict(step)
        online_fisher_update_(fisher, grads, decay)
        for name, g in grads.items():
            expected[name] = decay * expected[name] + (1 - decay) * g.double() ** 2
    for name in expected:
        assert fisher[name].dtype == torch.float32
        torch.testing.assert_close(fisher[name].double(), expected[name], rtol=1e-6, atol=0)
    corrected = bias_corrected(fisher, 5, decay)
    for name in expected:
        torch.testing.assert_close(corrected[name].double(), expected[name] / (1 - decay**5), rtol=1e-6, atol=0)


def test_hand_computed_two_steps():
    fisher = {}
    online_fisher_update_(fisher, {"w": torch.tensor([1.0, -2.0])}, 0.5)
    assert fisher["w"].tolist() == [0.5, 2.0]
    online_fisher_update_(fisher, {"w": torch.tensor([3.0, 0.0])}, 0.5)
    assert fisher["w"].tolist() == [0.25 + 4.5, 1.0]
    # Bias correction: divide by 1 - 0.5**2 = 0.75.
    assert bias_corrected(fisher, 2, 0.5)["w"].tolist() == pytest.approx([4.75 / 0.75, 1.0 / 0.75])


def test_bias_correction_of_a_constant_gradient_is_exact():
    g = {"w": torch.tensor([0.5, -3.0, 2.0])}
    fisher = {}
    for t in range(1, 7):
        online_fisher_update_(fisher, g, 0.95)
        torch.testing.assert_close(bias_corrected(fisher, t, 0.95)["w"], g["w"] ** 2, rtol=1e-5, atol=0)


def test_online_update_details():
    fisher = {}
    g = torch.tensor([2.0, 1.0], dtype=torch.bfloat16, requires_grad=True)
    online_fisher_update_(fisher, {"w": g * 1}, 0.0)  # decay 0: F = g**2
    assert fisher["w"].dtype == torch.float32 and not fisher["w"].requires_grad
    assert fisher["w"].tolist() == [4.0, 1.0]
    online_fisher_update_(fisher, {"v": torch.tensor([3.0])}, 0.5)  # a new entry starts at zero; w has no gradient
    assert fisher["v"].tolist() == [4.5] and fisher["w"].tolist() == [2.0, 0.5]  # and decays (g = 0)


def test_bias_corrected_without_updates_is_an_error():
    with pytest.raises(ValueError, match="at least one learning step"):
        bias_corrected({"w": torch.ones(2)}, 0, 0.9)


# ---------------------------------------------------------------- empirical Fisher


class Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        self.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
        self.unused = torch.nn.Parameter(torch.ones(3))


def _linear_loss(model, batch):
    return (model.w * batch["x"]).sum()


def test_empirical_fisher_is_mean_of_squares_not_square_of_mean():
    # Per-sample gradients of w.x are x: [1, 2] and [-1, 2] -> F = mean g^2 = [1, 4], mean g = [0, 2].
    model = Scalar()
    examples = [{"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([-1.0, 2.0])}]
    fisher, mean = empirical_fisher(model, examples, _linear_loss)
    assert set(fisher) == {"w", "unused"}  # frozen parameters are not scored
    assert fisher["w"].tolist() == [1.0, 4.0]
    assert mean["w"].tolist() == [0.0, 2.0]
    assert (mean["w"] ** 2).tolist() == [0.0, 4.0] != fisher["w"].tolist()
    assert fisher["unused"].tolist() == [0.0] * 3 and mean["unused"].tolist() == [0.0] * 3


def test_empirical_fisher_needs_examples():
    with pytest.raises(ValueError, match="lwf_fisher_samples"):
        empirical_fisher(Scalar(), [], _linear_loss)


def _examples(tokenizer, n=4):
    examples = []
    texts = [LEARN_TEXTS[0], "Tom has 3 apples.", LEARN_TEXTS[-1] + " Paris.", "Brush your teeth."]
    for text in texts[:n]:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        examples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return examples


def test_empirical_fisher_matches_an_explicit_per_example_loop(llama, tokenizer):
    examples = _examples(tokenizer)
    assert len({e["input_ids"].shape[1] for e in examples}) > 1  # different lengths: not one padded batch
    llama.train()
    fisher, mean = empirical_fisher(llama, examples)
    assert llama.training
    assert all(p.grad is None for p in llama.parameters())

    llama.eval()
    params = dict(llama.named_parameters())
    sq = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for example in examples:
        llama.zero_grad()
        llama(**example).loss.backward()
        for n, p in params.items():
            sq[n] += p.grad.double() ** 2
            total[n] += p.grad.double()
    llama.zero_grad(set_to_none=True)
    assert set(fisher) == set(params)
    for n in params:
        torch.testing.assert_close(fisher[n].double(), sq[n] / len(examples), rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(mean[n].double(), total[n] / len(examples), rtol=1e-4, atol=1e-9)
    # On real gradients the two estimates differ: mean(g^2) >= mean(g)^2, strictly somewhere.
    flat_f = torch.cat([fisher[n].reshape(-1) for n in params])
    flat_m2 = torch.cat([mean[n].reshape(-1) ** 2 for n in params])
    assert bool((flat_f >= flat_m2 * (1 - 1e-5) - 1e-12).all())
    assert float((flat_f - flat_m2).abs().max()) > 1e-3 * float(flat_f.max())


def test_per_sample_gradients_are_one_per_example(llama, tokenizer):
    examples = _examples(tokenizer, 2)
    grads = list(per_sample_gradients(llama, examples))
    assert len(grads) == 2
    llama.zero_grad()
    llama(**examples[1]).loss.backward()
    for n, p in llama.named_parameters():
        torch.testing.assert_close(grads[1][n], p.grad, rtol=1e-5, atol=1e-8)
    llama.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- intended update, mask, direction


def test_snapshot_and_intended_update():
    model = Scalar()
    reference = snapshot(model)
    assert set(reference) == set(trainable_parameters(model)) == {"w", "unused"}
    with torch.no_grad():
        model.w.add_(torch.tensor([0.5, -0.25]))
    assert reference["w"].tolist() == [1.0, 1.0]  # a copy, not a view
    delta = intended_update(snapshot(model), reference)
    assert delta["w"].tolist() == [0.5, -0.25] and delta["unused"].tolist() == [0.0] * 3
    current = {n: p for n, p in model.named_parameters()}
    assert intended_update(current, reference)["w"].tolist() == [0.5, -0.25]
    assert not intended_update(current, reference)["w"].requires_grad


def _reference_mask(fisher, delta, keep):
    scored = sorted(
        ((float((fisher[n] * delta[n]).reshape(-1)[i].abs()), n, i) for n in fisher for i in range(fisher[n].numel())),
        reverse=True,
    )
    return {(n, i) for _, n, i in scored[:keep]}


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.15, 0.25, 0.3, 0.37, 0.5, 0.9])
def test_update_mask_keeps_the_largest_entries(ratio):
    fisher = {n: t.abs() for n, t in _random_dict(1).items()}
    delta = _random_dict(2)
    total = sum(t.numel() for t in fisher.values())  # 25
    mask = update_mask(fisher, delta, ratio)
    keep = max(1, int(round(ratio * total)))
    assert sum(int(m.sum()) for m in mask.values()) == keep
    chosen = {(n, i) for n, m in mask.items() for i in (m.reshape(-1) == 1).nonzero().flatten().tolist()}
    assert chosen == _reference_mask(fisher, delta, keep)
    for n, m in mask.items():
        assert m.shape == fisher[n].shape and m.dtype == torch.float32
        assert set(m.unique().tolist()) <= {0.0, 1.0}


def test_update_mask_edge_ratios():
    fisher = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    delta = {"a": torch.tensor([4.0, -3.0, 0.1, -1.0])}  # |F*D| = 4, 6, 0.3, 4
    assert update_mask(fisher, delta, 1.0) is None
    assert update_mask(fisher, delta, 0.01)["a"].tolist() == [0.0, 1.0, 0.0, 0.0]  # at least one entry
    assert update_mask(fisher, delta, 0.75)["a"].tolist() == [1.0, 1.0, 0.0, 1.0]


def test_weighted_direction_and_masked_fisher():
    fisher = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([[0.5, 4.0]])}
    delta = {"a": torch.tensor([-1.0, 0.5, 2.0]), "b": torch.tensor([[2.0, -0.25]])}
    mask = {"a": torch.tensor([1.0, 0.0, 1.0]), "b": torch.tensor([[0.0, 1.0]])}
    w = weighted_direction(fisher, delta, mask)
    assert w["a"].tolist() == [-1.0, 0.0, 6.0] and w["b"].tolist() == [[0.0, -1.0]]
    w_all = weighted_direction(fisher, delta, None)
    assert w_all["a"].tolist() == [-1.0, 1.0, 6.0] and w_all["b"].tolist() == [[1.0, -1.0]]
    fm = masked_fisher(fisher, mask)
    assert fm["a"].tolist() == [1.0, 0.0, 3.0] and fm["b"].tolist() == [[0.0, 4.0]]
    assert masked_fisher(fisher, None) is fisher


def test_a_non_finite_fisher_is_caught_at_the_unlearning_point():
    from hf_lwf.method.fisher import check_finite

    fisher = {}
    online_fisher_update_(fisher, {"w": torch.tensor([1.0, 2.0]), "v": torch.tensor([3.0])}, 0.5)
    check_finite(fisher)
    online_fisher_update_(fisher, {"w": torch.tensor([1.0, float("inf")]), "v": torch.tensor([1.0])}, 0.5)
    with pytest.raises(FloatingPointError, match="1 parameters .first: w. is not finite"):
        check_finite(fisher)
    # F kept in bf16 (a large-model option) is updated in its own dtype.
    low = {"w": torch.zeros(2, dtype=torch.bfloat16)}
    online_fisher_update_(low, {"w": torch.tensor([2.0, 1.0])}, 0.0)
    assert low["w"].dtype == torch.bfloat16 and low["w"].tolist() == [4.0, 1.0]


def test_online_update_can_keep_f_in_another_dtype():
    fisher = {}
    online_fisher_update_(fisher, {"w": torch.tensor([2.0, 1.0])}, 0.5, dtype=torch.bfloat16, device="cpu")
    assert fisher["w"].dtype == torch.bfloat16 and fisher["w"].tolist() == [2.0, 0.5]


def test_online_update_divides_out_the_fp16_loss_scale():
    g = torch.Generator().manual_seed(3)
    grads = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    plain, scaled = {}, {}
    for _ in range(2):
        online_fisher_update_(plain, grads, 0.9)
        online_fisher_update_(scaled, {n: t * 1024.0 for n, t in grads.items()}, 0.9, grad_scale=1024.0)
    for name in grads:
        torch.testing.assert_close(scaled[name], plain[name])


@pytest.mark.parametrize("family", ["gemma", "gemma3", "opt", "mixtral", "lora_embed_head", "ia3", "loha"])
def test_empirical_fisher_is_exact_on_every_family(tokenizer, family):
    """The batched empirical Fisher (padded batches, per-module rules or the exact path) against one plain
    ``torch.autograd.grad`` per unpadded example, on the families and adapters whose rules once went wrong."""
    from test_persample import _adapted, _tiny

    model = _tiny(family, len(tokenizer)) if family in ("gemma", "gemma3", "opt", "mixtral") else _adapted(
        family, len(tokenizer))
    examples = _examples(tokenizer)
    fisher, mean = empirical_fisher(model, examples, batch_size=4)
    params = trainable_parameters(model)
    sq = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for example in examples:
        grads = torch.autograd.grad(model(**example).loss, list(params.values()), allow_unused=True)
        for (n, p), g in zip(params.items(), grads):
            if g is not None:
                sq[n] += g.double() ** 2
                total[n] += g.double()
    assert set(fisher) == set(params)
    # Parameters with a mathematically zero gradient (k_proj biases, a top-1 router) carry rounding noise only:
    # an absolute floor a millionth of the largest entry over the model.
    largest = max(float(v.max()) for v in sq.values()) / len(examples)
    floor_f = 1e-6 * largest
    floor_m = 1e-6 * max(float(v.abs().max()) for v in total.values()) / len(examples)
    for n in params:
        expected_f, expected_m = sq[n] / len(examples), total[n] / len(examples)
        assert float((fisher[n].double() - expected_f).abs().max()) <= 1e-4 * float(expected_f.abs().max()) + floor_f, n
        assert float((mean[n].double() - expected_m).abs().max()) <= 1e-4 * float(expected_m.abs().max()) + floor_m, n
    # The exact-path parameters (adapters, experts, OPT's flattened layers) do carry gradient.
    assert any(float(sq[n].max()) / len(examples) > 1e-3 * largest for n in params if any(
        k in n for k in ("lora_embedding", "ia3_l", "hada_", "experts", "fc1", "embed_tokens", "layers.0.mlp")))


# ---------------------------------------------------------------- the mask keeps exactly k entries under ties


def _exact_top_k(fisher, live, reference, scale, keep):
    """The independent reference: |F * D| in float64, one full sort by (value descending, name, flat index)."""
    entries = []
    for name in sorted(fisher):
        values = (fisher[name].double() * scale * (live[name].double() - reference[name].double())).abs()
        entries += [(-v, name, i) for i, v in enumerate(values.reshape(-1).tolist())]
    entries.sort()
    return {(n, i) for _, n, i in entries[:keep]}, -entries[keep - 1][0], [-e[0] for e in entries]


def _kept(terms, names, rows=None):
    return {(n, i) for n in names for i in terms.mask(n, rows).reshape(-1).nonzero().flatten().tolist()}


def test_the_mask_does_not_keep_every_bf16_weight_that_did_not_move(tokenizer):
    """bf16 weights after one small AdamW step: most steps round away (D == 0 exactly). With fewer than rho * N
    entries moved, the threshold of |F * D| is 0 and a mask that keeps every tie keeps everything."""
    from conftest import tiny_llama

    from hf_lwf.method.fisher import ScoringTerms

    model = tiny_llama(len(tokenizer), seed=0).to(torch.bfloat16)
    reference = snapshot(model)
    ids = torch.randint(5, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.AdamW(model.parameters(), lr=2e-5).step()
    g = torch.Generator().manual_seed(1)
    fisher = {n: torch.rand(p.shape, generator=g) + 0.5 for n, p in reference.items()}  # F > 0 everywhere
    total = sum(f.numel() for f in fisher.values())
    moved = sum(int((p.detach() != reference[n]).sum()) for n, p in model.named_parameters())
    keep = round(0.5 * total)
    assert 0 < moved < keep  # the bf16 case: fewer than rho * N entries have F * D != 0
    terms = ScoringTerms.from_state(fisher, model=model, reference=reference, mask_ratio=0.5)
    assert terms.threshold == 0.0
    assert sum(int((terms.chunk(n)[1] != 0).sum()) for n in fisher) == keep  # not all `total` of them


@pytest.mark.parametrize("ratio", [0.03, 0.1, 0.2, 0.3, 0.5, 0.8])
def test_the_mask_is_the_exact_top_k_of_a_stable_sort(ratio):
    from conftest import tied_bf16_state

    from hf_lwf.method.fisher import ScoringTerms

    model, reference, fisher = tied_bf16_state()
    live = {n: p.detach() for n, p in model.named_parameters()}
    scale = 4.0
    total = sum(f.numel() for f in fisher.values())
    keep = max(1, round(ratio * total))
    expected, kth, values = _exact_top_k(fisher, live, reference, scale, keep)
    # the cut falls inside a run of exactly equal values: the tie-break decides which of them are kept
    assert sum(v > kth for v in values) < keep < sum(v >= kth for v in values)
    assert sum(v == 0 for v in values) > total / 2  # most of |F * D| is exactly 0

    terms = ScoringTerms.from_state(fisher, model=model, reference=reference, scale=scale, mask_ratio=ratio)
    assert terms.threshold == kth  # the radix select's k-th largest
    assert _kept(terms, fisher) == expected and len(expected) == keep
    # the explicit whole-model mask follows the same rule
    mask = update_mask({n: f * scale for n, f in fisher.items()},
                       {n: live[n].float() - reference[n].float() for n in fisher}, ratio)
    assert {(n, i) for n, m in mask.items() for i in m.reshape(-1).nonzero().flatten().tolist()} == expected
    for name in fisher:  # w and F_M of every entry, against float64
        w, fm = terms.chunk(name)
        m = torch.tensor([(name, i) in expected for i in range(fisher[name].numel())]).view(fisher[name].shape)
        f64 = fisher[name].double() * scale
        assert torch.equal(fm.double(), f64 * m)
        assert torch.equal(w.double(), f64 * (live[name].double() - reference[name].double()) * m)


def test_the_mask_of_any_block_of_rows_is_that_block_of_the_whole_mask():
    """Scoring asks for arbitrary row blocks (``lwf_score_chunk_size``): each gets its rows of the one mask."""
    from conftest import tied_bf16_state

    from hf_lwf.method.fisher import ScoringTerms

    model, reference, fisher = tied_bf16_state(seed=3)
    for ratio in (0.07, 0.25, 0.6):
        terms = ScoringTerms.from_state(fisher, model=model, reference=reference, mask_ratio=ratio)
        for name, f in fisher.items():
            whole_w, whole_fm = terms.chunk(name)
            bounds = [0]
            while bounds[-1] < f.shape[0]:
                bounds.append(min(f.shape[0], bounds[-1] + 1 + len(bounds) % 3))  # blocks of 2, 3, 1, 2, ... rows
            blocks = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
            assert torch.equal(torch.cat([terms.mask(name, r) for r in blocks]), terms.mask(name))
            assert torch.equal(torch.cat([terms.chunk(name, r)[0] for r in blocks]), whole_w)
            assert torch.equal(torch.cat([terms.chunk(name, r)[1] for r in blocks]), whole_fm)


def test_the_early_schedule_mask_keeps_k_entries_too():
    from hf_lwf.method.fisher import ScoringTerms

    fisher = {"b": torch.tensor([1.0, 2.0, 0.0, 1.0]), "a": torch.tensor([[0.5, 0.5], [0.5, 0.5]])}
    delta = {"b": torch.tensor([1.0, 0.5, 3.0, 0.0]), "a": torch.tensor([[2.0, 0.0], [-2.0, 0.0]])}
    # |F * D|: a = [1, 0, 1, 0], b = [1, 1, 0, 0]; 4 ones, 4 zeros; order: a before b, then flat index
    terms = ScoringTerms.from_state(fisher, delta=delta, mask_ratio=0.375)  # k = 3 of the four ones
    assert terms.mask("a").tolist() == [[True, False], [True, False]] and terms.mask("b").tolist() == [
        True, False, False, False]
    terms = ScoringTerms.from_state(fisher, delta=delta, mask_ratio=0.75)  # k = 6: all ones, the first two zeros
    assert terms.mask("a").tolist() == [[True, True], [True, True]] and terms.mask("b").tolist() == [
        True, True, False, False]
    assert ScoringTerms.from_state(fisher, delta=delta).mask("a") is None


def test_the_mask_keeps_the_same_entries_on_every_layout(tmp_path):
    """Two gloo ranks: FSDP2 row shards and ZeRO-3 flat slices (faked, without DeepSpeed) keep the entries of the
    float64 reference, each rank its own part, and any block of a shard's rows gets its rows of the mask."""
    import json
    import os
    import subprocess
    import sys

    from conftest import tied_bf16_state

    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "mask_layouts.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
               str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    model, reference, fisher = tied_bf16_state(seed=5)
    live = {n: p.detach() for n, p in model.named_parameters()}
    total = sum(f.numel() for f in fisher.values())
    for ratio, results in ranks[0]["ratios"].items():
        keep = max(1, round(float(ratio) * total))
        expected, kth, _ = _exact_top_k(fisher, live, reference, 2.0, keep)
        for layout in ("fsdp", "zero3"):
            parts = [{tuple(e) for e in r["ratios"][ratio][layout]["kept"]} for r in ranks]
            assert not parts[0] & parts[1] and parts[0] | parts[1] == expected, (layout, ratio)
            assert all(r["ratios"][ratio][layout]["threshold"] == kth for r in ranks)
            assert all(r["ratios"][ratio][layout]["rated"] for r in ranks)
        assert all(r["ratios"][ratio]["fsdp"]["blocks_agree"] for r in ranks)
    # each rank holds a real part: both keep entries at the largest ratio
    assert all(r["ratios"]["0.6"][layout]["kept"] for r in ranks for layout in ("fsdp", "zero3"))


# ---------------------------------------------------------------- bf16 F: rounding bits from the parameter's name


def _bf16_updates(names, steps=4, seed=11):
    g = torch.Generator().manual_seed(seed)
    shapes = {"lm_head.weight": (7, 5), "model.embed_tokens.weight": (9, 3), "model.norm.weight": (6,)}
    return [{n: torch.randn(shapes[n], generator=g) for n in names} for _ in range(steps)]


def test_bf16_fisher_does_not_depend_on_the_order_of_its_entries():
    """F rebuilt from a checkpoint lists its entries in another order (safetensors sorts them): same bits."""
    names = ["model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"]  # not sorted
    updates = _bf16_updates(names)
    forward = {n: torch.zeros(u.shape, dtype=torch.bfloat16) for n, u in updates[0].items()}
    backward = {n: forward[n].clone() for n in reversed(names)}
    one_by_one = {n: forward[n].clone() for n in sorted(names)}
    for step, grads in enumerate(updates):
        online_fisher_update_(forward, grads, 0.9, seed=100 + step)
        online_fisher_update_(backward, dict(reversed(list(grads.items()))), 0.9, seed=100 + step)
        for name in one_by_one:  # ZeRO-2 folds in one fetched gradient at a time
            online_fisher_update_({name: one_by_one[name]}, {name: grads[name]}, 0.9, seed=100 + step)
    for name in names:
        assert forward[name].dtype == torch.bfloat16
        assert torch.equal(forward[name].view(torch.int16), backward[name].view(torch.int16)), name
        assert torch.equal(forward[name].view(torch.int16), one_by_one[name].view(torch.int16)), name


def test_bf16_rounding_is_drawn_from_the_step_seed_and_the_parameter_name():
    """Each entry re-derived: fp32 update, 16 random bits from a generator seeded with BLAKE2b(seed, name), added to
    the low half of the fp32 pattern and truncated (here in int64 arithmetic)."""
    import hashlib

    names = ["model.norm.weight", "lm_head.weight"]
    fisher = {n: torch.zeros(u.shape, dtype=torch.bfloat16) for n, u in _bf16_updates(names, 1)[0].items()}
    expected = {n: f.clone() for n, f in fisher.items()}
    for step, grads in enumerate(_bf16_updates(names, 3, seed=5)):
        seed = 7 + step
        online_fisher_update_(fisher, grads, 0.8, seed=seed)
        for name, g in grads.items():
            exact = expected[name].float() * 0.8 + 0.2 * g.float() ** 2
            digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
            noise = torch.randint(0, 1 << 16, exact.shape, dtype=torch.int32, generator=generator).long()
            bits = exact.view(torch.int32).long()  # non-negative floats: a non-negative pattern
            rounded = (((bits + noise) >> 16) << 16).to(torch.int32).view(torch.float32)
            expected[name] = rounded.to(torch.bfloat16)
        for name in names:
            assert torch.equal(fisher[name].view(torch.int16), expected[name].view(torch.int16)), (step, name)
    # another step seed draws other bits
    other = {n: f.clone() for n, f in fisher.items()}
    grads = _bf16_updates(names, 1, seed=9)[0]
    online_fisher_update_(fisher, grads, 0.8, seed=1)
    online_fisher_update_(other, grads, 0.8, seed=2)
    assert not torch.equal(fisher["lm_head.weight"], other["lm_head.weight"])


@pytest.mark.parametrize("scale", [1.0, 4.0, "tensor"])
def test_the_online_fisher_held_with_a_factor_is_the_running_mean_across_renormalisations(scale):
    """fp32 F held as G = F / factor (one pass per step): factor * G equals the float64 running mean over 60 steps of
    decay 0.5, which fold the factor into G twice (below 2**-20), with a gradient missing at some steps."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (5, 3), "b": (7,)}
    grad_scale = torch.tensor(3.0) if scale == "tensor" else scale
    divide = 3.0 if scale == "tensor" else scale
    fisher, factor, folds = {}, 1.0, 0
    reference = {n: torch.zeros(s, dtype=torch.float64) for n, s in shapes.items()}
    for step in range(60):
        grads = {n: torch.randn(s, generator=gen) * 10.0 ** (step % 5 - 2) for n, s in shapes.items()}
        if step % 7 == 3:
            grads["b"] = None
        factor = online_fisher_update_(fisher, grads, 0.5, grad_scale=grad_scale, factor=factor)
        folds += factor == 1.0
        for n in shapes:
            g = grads[n].double() / divide if grads[n] is not None else torch.zeros_like(reference[n])
            reference[n] = 0.5 * reference[n] + 0.5 * g.square()
        for n in shapes:
            torch.testing.assert_close(fisher[n].double() * factor, reference[n], rtol=1e-6, atol=0.0)
    assert folds == 2

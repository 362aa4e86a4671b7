"""GPU readiness, checked on CPU: the fused online Fisher (idle parameters, 16-bit gradients, bf16 F, no host sync),
theta_ref in the parameter's dtype, the device batches go to, the FSDP2-offload refusal, fp16 loss scaling of the
scoring pass and the empirical Fisher, and the batch bounds of the per-sample passes."""

from types import SimpleNamespace

import pytest
import torch
from conftest import FORGET_PROMPTS, LEARN_TEXTS, learning_dataset, lm_collator, lwf_args, tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

from hf_lwf import LWFCallback, LWFConfig, LWFTrainer
from hf_lwf.backends import detect_backend
from hf_lwf.backends.fsdp2 import fsdp_offloads as _fsdp_offloads
from hf_lwf.method.confidence import reference_confidence, score_self_data
from hf_lwf.distributed import input_device
from hf_lwf.method.fisher import (
    ScoringTerms,
    bias_corrected,
    empirical_fisher,
    empirical_fisher_reference,
    online_fisher_update_,
    snapshot,
    trainable_parameters,
    zeros_like_parameters,
)
from hf_lwf.method.selfgen import collate_self_data
from hf_lwf.trainer import clip_coefficient


class _Ops(TorchDispatchMode):
    """Records every aten op and the largest fp32 tensor any op returns (with ``last_dim``: only tensors whose last
    dimension is that, e.g. the vocabulary for logits and their gradients)."""

    def __init__(self, last_dim: int | None = None):
        super().__init__()
        self.names, self.largest, self.last_dim = [], 0, last_dim

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.names.append(func.overloadpacket.__name__)
        if any(r.alias_info is not None for r in func._schema.returns):  # a view or in-place op: no new memory
            return out
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() > 0 and (
                    self.last_dim is None or t.shape[-1] == self.last_dim):
                self.largest = max(self.largest, t.numel())
        return out


def _reference_fisher(steps: list[dict], names: list[str], decay: float) -> dict[str, torch.Tensor]:
    """METHOD.md's F <- beta F + (1 - beta) g**2 one parameter at a time in float64, g = 0 without a gradient,
    then bias corrected."""
    shapes = {n: next(s[n] for s in steps if s.get(n) is not None).shape for n in names if any(s.get(n) is not None
                                                                                               for s in steps)}
    fisher = {n: torch.zeros(shapes.get(n, (3,)), dtype=torch.float64) for n in names}
    for grads in steps:
        for n in names:
            g = grads.get(n)
            g = torch.zeros_like(fisher[n]) if g is None else g.double()
            fisher[n] = decay * fisher[n] + (1 - decay) * g * g
    return {n: f / (1 - decay ** len(steps)) for n, f in fisher.items()}


# ------------------------------------------------------------------------------------------ online Fisher
def test_parameters_without_a_gradient_still_decay():
    """An expert routed on 2 of 10 steps and one never routed: F averages over every step (skipping idle steps
    would leave the expert's F 512x too large after 9 of them)."""
    decay, gen = 0.5, torch.Generator().manual_seed(0)
    params = {"dense": torch.zeros(4, 3), "expert": torch.zeros(5), "never": torch.zeros(3)}
    steps = []
    for t in range(10):
        steps.append({"dense": torch.randn(4, 3, generator=gen),
                      "expert": torch.randn(5, generator=gen) if t in (0, 5) else None, "never": None})
    fisher = zeros_like_parameters(params)
    for grads in steps:
        online_fisher_update_(fisher, grads, decay)
    got = bias_corrected(fisher, len(steps), decay)
    expected = _reference_fisher(steps, list(params), decay)
    for n in params:
        torch.testing.assert_close(got[n].double(), expected[n], rtol=1e-6, atol=0)
    assert float(got["never"].abs().sum()) == 0.0  # never routed: no curvature
    # The parameter absent from the gradient dict (not just None) decays the same way.
    fisher2 = zeros_like_parameters(params)
    for grads in steps:
        online_fisher_update_(fisher2, {n: g for n, g in grads.items() if g is not None}, decay)
    assert all(torch.equal(fisher2[n], fisher[n]) for n in params)


def test_bf16_fisher_keeps_decaying_at_a_decay_close_to_one():
    """At decay 0.998 a round-to-nearest bf16 F stops decaying (>50% off); stochastic rounding stays
    unbiased and close to the fp64 reference."""
    decay, n, steps = 0.998, 2000, 2500
    gen = torch.Generator().manual_seed(1)
    scale = torch.rand(n, generator=gen) * 3 + 0.1
    reference = torch.zeros(n, dtype=torch.float64)
    nearest = torch.zeros(n, dtype=torch.bfloat16)
    fisher = {"w": torch.zeros(n, dtype=torch.bfloat16)}
    for t in range(steps):
        g = torch.randn(n, generator=gen) * scale
        reference = decay * reference + (1 - decay) * g.double() ** 2
        nearest = (decay * nearest.float() + (1 - decay) * g * g).to(torch.bfloat16)
        online_fisher_update_(fisher, {"w": g}, decay, seed=t)
    relative = lambda x: ((x.double() - reference).abs() / reference).median().item()  # noqa: E731
    assert relative(nearest) > 0.5  # the fault this guards against
    assert fisher["w"].dtype == torch.bfloat16
    assert relative(fisher["w"]) < 0.05
    assert abs(fisher["w"].double().sum() / reference.sum() - 1) < 0.01


def test_fp32_fisher_from_bf16_gradients_is_one_fused_pass_without_copies_or_sync():
    gen = torch.Generator().manual_seed(2)
    steps = [{"w": torch.randn(6, 4, generator=gen).bfloat16(), "b": torch.randn(4, generator=gen).bfloat16()}
             for _ in range(3)]
    fisher = zeros_like_parameters({"w": torch.zeros(6, 4), "b": torch.zeros(4), "idle": torch.zeros(2)})
    for grads in steps:
        with _Ops() as ops:
            online_fisher_update_(fisher, grads, 0.9)
        assert set(ops.names) - {"detach"} == {"_foreach_mul_", "_foreach_addcmul_"}, ops.names  # no copy, no .item()
    expected = _reference_fisher(steps, ["w", "b"], 0.9)
    got = bias_corrected(fisher, 3, 0.9)
    for n in ("w", "b"):
        assert fisher[n].dtype == torch.float32
        torch.testing.assert_close(got[n].double(), expected[n], rtol=1e-6, atol=0)


def test_the_clip_coefficient_as_a_device_tensor_gives_the_pre_clip_fisher():
    """fp16 under LWFTrainer: F is read after the (unscaled, clipped) step and divided by the clip coefficient."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.zeros(5, 3)), torch.nn.Parameter(torch.zeros(3))]
    plain, deferred, steps = {}, {}, []
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 10
        steps.append({"w": params[0].grad.clone(), "b": params[1].grad.clone()})
        online_fisher_update_(plain, steps[-1], 0.8)
        norm = torch.nn.utils.clip_grad_norm_(params, 0.5)
        coefficient = clip_coefficient(norm, 0.5)
        assert float(coefficient) < 0.1  # it did clip
        with _Ops() as ops:
            online_fisher_update_(deferred, {"w": params[0].grad, "b": params[1].grad}, 0.8, grad_scale=coefficient)
        assert "_local_scalar_dense" not in ops.names
    for n in plain:
        torch.testing.assert_close(deferred[n], plain[n], rtol=1e-5, atol=0)


def test_update_over_parameters_on_several_devices():
    """A model split over devices (device_map): one fused group per device, no cross-device op."""
    fisher = {"a": torch.zeros(3), "b": torch.zeros(2, device="meta")}
    online_fisher_update_(fisher, {"a": torch.ones(3), "b": torch.ones(2, device="meta")}, 0.5)
    assert fisher["a"].tolist() == [0.5] * 3 and fisher["b"].device.type == "meta"


def test_state_kept_on_the_host_is_staged_once_per_scoring_round():
    from hf_lwf.method.fisher import stage_like

    params = {"w": torch.zeros(2, 3, device="meta"), "b": torch.zeros(3)}
    host = {"w": torch.ones(2, 3), "b": torch.ones(3)}
    staged = stage_like(host, params)
    assert staged["w"].device.type == "meta" and staged["b"] is host["b"]  # moved where needed, else untouched
    terms = ScoringTerms.from_state(host, delta={"w": torch.ones(2, 3), "b": torch.ones(3)})
    assert terms._fisher is host  # no model: nothing to stage against


# ---------------------------------------------------------------------------------------- theta_ref, devices
def test_theta_ref_is_kept_exactly_in_the_parameters_dtype(tokenizer):
    model = tiny_llama(len(tokenizer)).to(torch.bfloat16)
    reference = snapshot(model)
    for name, p in trainable_parameters(model).items():
        assert reference[name].dtype == torch.bfloat16 and torch.equal(reference[name], p.detach())
    assert snapshot(tiny_llama(len(tokenizer)))["lm_head.weight"].dtype == torch.float32


def test_zero3_theta_ref_is_the_slice_in_its_dtype_and_d_is_formed_in_fp32(tokenizer):
    """Under ZeRO-3 theta_ref copies each bf16 slice exactly (no fp32 upcast); PartitionTerms forms D in fp32."""
    from hf_lwf.backends.zero import PartitionTerms, snapshot_partitions

    model = tiny_llama(len(tokenizer)).to(torch.bfloat16)
    params = trainable_parameters(model)
    for index, p in enumerate(params.values()):  # DeepSpeed's ZeRO-3 attributes, world size 1
        p.ds_id, p.ds_tensor, p.ds_numel, p.ds_shape = index, p.data.view(-1), p.numel(), p.shape
    reference = snapshot_partitions(params)
    for name, p in params.items():
        assert reference[name].dtype == torch.bfloat16 and torch.equal(reference[name], p.detach().reshape(-1))
        assert reference[name].data_ptr() != p.data_ptr()  # a copy, not a view of the live slice
    name, p = "lm_head.weight", params["lm_head.weight"]
    fisher = {n: torch.ones(q.numel()) for n, q in params.items()}
    with torch.no_grad():
        p.add_(torch.full_like(p, 2.0**-6))
    terms = PartitionTerms.from_state(fisher, model=model, reference=reference)
    w, f = terms.chunk(name)
    expected = p.detach().float() - reference[name].float().view(p.shape)  # D = theta_now - theta_ref, fp32
    assert w.dtype == torch.float32 and torch.equal(w, expected) and float(w.abs().max()) > 0


def test_batches_follow_the_input_embeddings_not_the_first_parameter(tokenizer):
    model = tiny_llama(len(tokenizer))
    assert input_device(model) == torch.device("cpu")

    class FirstOnMeta(torch.nn.Module):  # a first parameter elsewhere (offloaded / on another GPU)
        def __init__(self):
            super().__init__()
            self.other = torch.nn.Parameter(torch.zeros(2, device="meta"))
            self.embed = torch.nn.Embedding(4, 2)

        def get_input_embeddings(self):
            return self.embed

    odd = FirstOnMeta()
    assert next(odd.parameters()).device.type == "meta" and input_device(odd) == torch.device("cpu")
    # accelerate's dispatch (device_map): the embeddings' execution device wins over where their weight is kept.
    odd.embed.to("meta")
    odd.embed._hf_hook = SimpleNamespace(execution_device="cpu")
    assert input_device(odd) == torch.device("cpu")
    odd.embed._hf_hook = SimpleNamespace(execution_device=None)
    assert input_device(odd) == torch.device("cpu")  # nothing off meta: the host


def test_fsdp2_cpu_offload_is_refused_at_construction(monkeypatch):
    monkeypatch.delenv("FSDP_OFFLOAD_PARAMS", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    args = SimpleNamespace(fsdp="full_shard auto_wrap offload", fsdp_config={"version": 2}, deepspeed=None)
    assert _fsdp_offloads(args)
    assert not _fsdp_offloads(SimpleNamespace(fsdp="full_shard auto_wrap", fsdp_config={"version": 2}))
    assert _fsdp_offloads(SimpleNamespace(fsdp=["full_shard"], fsdp_config={"offload_params": True}))
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    assert _fsdp_offloads(SimpleNamespace(fsdp=[], fsdp_config={}))
    with pytest.raises(ValueError, match="does not support FSDP2 with CPU offloading"):
        detect_backend(args).check(LWFConfig(lwf_forget_prompts=FORGET_PROMPTS), via_trainer=True)


# ------------------------------------------------------------------------------------------ fp16 loss scale
def _examples(tokenizer, n):
    """Single-example causal-LM batches (input_ids, attention_mask, labels), unpadded."""
    return [dict(lm_collator(tokenizer)([example])) for example in learning_dataset(tokenizer, n)]


def _scoring_setup(tokenizer, dtype=torch.float32):
    model = tiny_llama(len(tokenizer), seed=4)
    params = trainable_parameters(model)
    gen = torch.Generator().manual_seed(5)
    fisher = {n: torch.rand(p.shape, generator=gen) * 10 for n, p in params.items()}
    delta = {n: torch.randn(p.shape, generator=gen) * 1e-2 for n, p in params.items()}
    rows = []
    for i, text in enumerate(LEARN_TEXTS[:6]):
        ids = tokenizer(text)["input_ids"]
        rows.append({"prompt_ids": ids[:4], "response_ids": ids[4 : 8 + i], "task": "t"})
    return model.to(dtype), fisher, delta, rows


def test_scaled_scoring_divides_out_the_scale(tokenizer):
    model, fisher, delta, rows = _scoring_setup(tokenizer)
    terms = ScoringTerms.from_state(fisher, delta=delta)
    plain = score_self_data(model, rows, 0, terms, lr=0.1, batch_size=3, show_progress=False)
    scaled = score_self_data(model, rows, 0, terms, lr=0.1, batch_size=3, show_progress=False, loss_scale=4096.0)
    torch.testing.assert_close(scaled, plain, rtol=1e-5, atol=0)
    batch = collate_self_data(rows, 0)
    slow = reference_confidence(model, batch, {n: fisher[n] * delta[n] for n in fisher}, fisher, 0.1, "deviation")
    torch.testing.assert_close(scaled, slow.detach(), rtol=1e-4, atol=1e-9)


def test_fp16_scoring_under_a_loss_scale_matches_fp32_and_retries_an_overflow(tokenizer, monkeypatch):
    """fp16 weights on CPU: S = 2**24 overflows the fp16 backward, the batch is redone at smaller S, and the scores
    match the fp32 model's within fp16 tolerance."""
    model, fisher, delta, rows = _scoring_setup(tokenizer)
    terms = ScoringTerms.from_state(fisher, delta=delta)
    exact = score_self_data(model, rows, 0, terms, lr=0.1, batch_size=3, show_progress=False)
    half = model.to(torch.float16)
    import hf_lwf.method.confidence as confidence

    scales, original = [], confidence.batch_confidence
    monkeypatch.setattr(confidence, "batch_confidence",
                        lambda *a, **k: (scales.append(k["loss_scale"]), original(*a, **k))[1])
    overflowing = score_self_data(half, rows, 0, terms, lr=0.1, batch_size=3, show_progress=False,
                                  loss_scale=2.0**24)
    assert scales[0] == 2.0**24 and len(scales) > 2 and min(scales) >= 1  # it overflowed and was redone smaller
    assert torch.isfinite(overflowing).all()
    torch.testing.assert_close(overflowing, exact, rtol=0.05, atol=1e-4 * float(exact.abs().max()))


def test_fp16_empirical_fisher_divides_out_the_scale(tokenizer):
    model = tiny_llama(len(tokenizer), seed=6)
    examples = _examples(tokenizer, 5)
    plain, mean = empirical_fisher(model, examples, batch_size=2)
    scaled, scaled_mean = empirical_fisher(model, examples, batch_size=2, loss_scale=1024.0)
    slow, slow_mean = empirical_fisher_reference(model, examples)
    for n in plain:
        torch.testing.assert_close(scaled[n], plain[n], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(scaled_mean[n], mean[n], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(scaled[n], slow[n], rtol=1e-3, atol=1e-9)
    half, _ = empirical_fisher(model.to(torch.float16), examples, batch_size=2, loss_scale=2.0**40)
    assert all(torch.isfinite(f).all() for f in half.values())  # the overflow was retried at a smaller scale


# ------------------------------------------------------------------------------------------- batch bounds
def test_empirical_fisher_and_scoring_never_form_more_than_one_batch_of_logits(tokenizer):
    model = tiny_llama(len(tokenizer), seed=7)
    vocab = model.config.vocab_size
    examples = _examples(tokenizer, 6)
    length = max(e["input_ids"].shape[1] for e in examples)

    def largest(batch_size):
        with _Ops(last_dim=vocab) as ops:
            empirical_fisher(model, examples, batch_size=batch_size, chunk_elements=256)
        return ops.largest

    assert largest(2) <= 2 * length * vocab < largest(6)  # the bound is the configured batch, and it binds
    _, fisher, delta, rows = _scoring_setup(tokenizer)
    terms = ScoringTerms.from_state(fisher, delta=delta)
    longest = max(len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows)
    with _Ops(last_dim=vocab) as ops:
        score_self_data(model, rows, 0, terms, lr=0.1, batch_size=2, show_progress=False, chunk_elements=256)
    assert 0 < ops.largest <= 2 * longest * vocab


def test_zero3_empirical_fisher_forms_at_most_lwf_fisher_batch_size_logits(tokenizer):
    """The ZeRO-3 empirical Fisher (per slice) batches by ``lwf_fisher_batch_size`` like the unsharded one, and on one
    rank (the slice is the whole parameter, laid out as DeepSpeed does: ``ds_tensor`` flat) it equals it."""
    from hf_lwf.backends.zero import ZeroBackend

    def empirical_fisher_partitions(model, examples, batch_size, chunk_elements=None):
        return ZeroBackend(3).empirical_fisher(model, examples, batch_size=batch_size, chunk_elements=chunk_elements,
                                               loss_scale=1.0)

    model = tiny_llama(len(tokenizer), seed=7)
    vocab = model.config.vocab_size
    examples = _examples(tokenizer, 6)
    length = max(e["input_ids"].shape[1] for e in examples)
    for index, p in enumerate(model.parameters()):  # DeepSpeed's ZeRO-3 attributes, world size 1
        p.ds_id, p.ds_tensor, p.ds_numel, p.ds_shape = index, p.data.view(-1), p.numel(), p.shape

    def largest(batch_size):
        with _Ops(last_dim=vocab) as ops:
            fisher = empirical_fisher_partitions(model, examples, batch_size=batch_size, chunk_elements=256)
        return ops.largest, fisher

    small, fisher = largest(2)
    assert small <= 2 * length * vocab < largest(6)[0]  # the bound is the configured batch, and it binds
    for p in model.parameters():
        del p.ds_id, p.ds_tensor, p.ds_numel, p.ds_shape
    whole, _ = empirical_fisher(model, examples, batch_size=6, chunk_elements=256, with_mean=False)
    # the unsharded pass takes the output layer over token chunks, the ZeRO-3 one the plain logits: the same
    # numbers up to fp32 rounding of the loss's gradient (entries near zero differ relatively, not absolutely)
    for name, f in whole.items():
        assert torch.allclose(fisher[name], f.reshape(-1), rtol=1e-5, atol=1e-7 * float(f.abs().max())), name


# ------------------------------------------------------------------------------------------- end to end
def test_bf16_weights_train_end_to_end_on_cpu(tokenizer, tmp_path):
    """16-bit weights (no autocast): fp32 F from bf16 gradients, a bf16 theta_ref, and real ascent steps."""
    model = tiny_llama(len(tokenizer)).to(torch.bfloat16)
    trainer = LWFTrainer(model=model, args=lwf_args(tmp_path, max_steps=4), train_dataset=learning_dataset(tokenizer),
                         processing_class=tokenizer, data_collator=lm_collator(tokenizer))
    before = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    trainer.train()
    state = trainer.lwf_callback.lwf_state
    assert state.fisher_updates == 4 and state.unlearn_points == 2 and state.unlearn_steps == 4
    assert all(f.dtype == torch.float32 and torch.isfinite(f).all() for f in state.fisher.values())
    assert all(r.dtype == torch.bfloat16 for r in state.reference.values())
    assert all(torch.isfinite(torch.tensor(state.scores)))
    after = torch.cat([p.detach().float().reshape(-1) for p in trainer.model.parameters()])
    assert torch.isfinite(after).all() and not torch.equal(after, before)


def test_fp16_lwf_trainer_updates_the_fisher_after_the_step_with_the_pre_clip_gradients(tokenizer, tmp_path):
    """Under a loss scaler LWFTrainer defers the update to on_optimizer_step and divides by the clip coefficient:
    the F of a clipped run equals the unclipped one (the scaler is a CPU GradScaler at scale 1, standing in for
    fp16 on a GPU, where the wiring is the same)."""

    def fisher(max_grad_norm, scaler):
        args = lwf_args(tmp_path / f"{max_grad_norm}-{scaler}", max_steps=1, lwf_unlearn_every=100,
                        max_grad_norm=max_grad_norm)
        trainer = LWFTrainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=learning_dataset(tokenizer),
                             processing_class=tokenizer, data_collator=lm_collator(tokenizer))
        if scaler:
            trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
        calls = []
        original = trainer.lwf_run.update_fisher
        trainer.lwf_run.update_fisher = lambda *a, **k: (calls.append(k.get("grad_scale", 1.0)), original(*a, **k))
        trainer.train()
        state = trainer.lwf_callback.lwf_state
        assert state.fisher_updates == 1
        return torch.cat([f.reshape(-1) for _, f in sorted(state.fisher.items())]), calls

    unclipped, _ = fisher(0.0, False)
    deferred, calls = fisher(1e-3, True)
    assert any(torch.is_tensor(c) and float(c) < 1e-2 for c in calls)  # the clip coefficient reached the update
    torch.testing.assert_close(deferred, unclipped, rtol=1e-4, atol=1e-12)

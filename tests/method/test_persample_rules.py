"""Every per-sample rule, and the fallbacks, on one shared harness.

Each case builds a small module of one family (or, for the output layer, a tiny model), runs the engine on a padded
batch and compares every sample's gradient with an independent reference: that sample alone, unpadded, through
plain ``torch.autograd`` in float64. The engine contracts in fp32 (:func:`~hf_lwf.method.common.matmul_f32`), so
the tolerance is 1e-5 of the largest entry. Both consumer kinds are checked: the dense per-sample gradients and the
linear ``sum_i v_i g_{x,i}`` a rule may form without them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from conftest import tiny_llama

from hf_lwf.method.common import sequence_losses
from hf_lwf.method.head import linear_head
from hf_lwf.method.persample import Consumer, per_sample_pass
from hf_lwf.method.persample.plan import _PLANS
from hf_lwf.method.persample.rules import RULES, named, rule_for


LENGTHS = [5, 2, 4]
WIDTH = 4
VOCAB = 9


class _Dense(Consumer):
    """The full per-sample gradients ``[batch, *shape]`` (float64) of every parameter, from however many row blocks."""

    def __init__(self, params, batch):
        self.grads = {n: torch.zeros(batch, *p.shape, dtype=torch.float64) for n, p in params.items()}

    def dense(self, name, rows, grads, sample=None):
        block = self.grads[name] if sample is None else self.grads[name][sample : sample + 1]
        (block if rows is None else block[:, rows]).add_(grads.double())


class _Directional(Consumer):
    """``sum_i v_i g_{x,i}`` per sample for fixed random directions ``v``."""

    linear = True

    def __init__(self, directions, batch):
        self.directions, self.values = directions, torch.zeros(batch, dtype=torch.float64)

    def direction(self, name, rows):
        v = self.directions[name]
        return v if rows is None else v[rows]

    def add_linear(self, name, values):
        self.values += values.double()


@dataclass
class Case:
    """A padded batch for ``model``, the engine's loss (None: the response loss), and each sample's own loss on its
    unpadded inputs (the reference)."""

    model: torch.nn.Module
    batch: dict[str, torch.Tensor]
    loss_fn: Callable | None
    sample_loss: Callable[[torch.nn.Module, int], torch.Tensor]
    module: torch.nn.Module | None = None  # the module whose class the family's rule must have taken


class _Probe(torch.nn.Module):
    """One layer between the batch's inputs and a fixed readout: ``l_x = sum_{t < len_x} tanh(layer(in_x)_t) . c_t``."""

    def __init__(self, layer: torch.nn.Module, extra: torch.nn.Module | None = None):
        super().__init__()
        self.layer, self.extra = layer, extra

    def forward(self, inputs):
        out = self.layer(inputs)
        return out if self.extra is None else self.extra(out)


def _readout(out: torch.Tensor, readout: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ((torch.tanh(out) * readout[: out.shape[1]]).sum(-1) * mask).sum(1)


def _layer_case(layer: torch.nn.Module, inputs: torch.Tensor, extra: torch.nn.Module | None = None) -> Case:
    """``layer`` on padded ``inputs`` (``[batch, tokens, ...]``; padding positions hold values that must not count)."""
    torch.manual_seed(1)
    model = _Probe(layer, extra).double()
    inputs = inputs.double() if inputs.is_floating_point() else inputs
    mask = _mask().double()
    with torch.no_grad():
        probe = model(inputs)
    readout = torch.randn(max(LENGTHS), probe.shape[-1], dtype=torch.float64)
    batch = {"input_ids": mask.long(), "inputs": inputs, "mask": mask}

    def loss_fn(model, batch):
        return _readout(model(batch["inputs"]), readout, batch["mask"])

    def sample_loss(model, i):
        length = LENGTHS[i]
        return _readout(model(inputs[i : i + 1, :length]), readout, mask[i : i + 1, :length])[0]

    return Case(model, batch, loss_fn, sample_loss, module=layer)


def _features(*shape) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(len(LENGTHS), max(LENGTHS), *shape)


def _mask() -> torch.Tensor:
    return (torch.arange(max(LENGTHS)) < torch.tensor(LENGTHS).unsqueeze(1)).long()


def _ids(pad: int) -> torch.Tensor:
    """Token ids padded with ``pad``, which also stands once inside a sample (an embedding's ``padding_idx`` row gets
    no gradient even there)."""
    torch.manual_seed(0)
    ids = torch.randint(1, VOCAB, (len(LENGTHS), max(LENGTHS)))
    ids[0, :3] = torch.tensor([3, 3, 5])  # a repeated token: its row sums two positions
    ids[2, 1] = pad
    return ids.masked_fill(_mask() == 0, pad)


class _ScaledEmbedding(torch.nn.Embedding):
    """Gemma's ``embed_scale * lookup``."""

    def forward(self, ids):
        return super().forward(ids) * 1.7


class _LlamaLikeRMSNorm(torch.nn.Module):
    """``w * x / rms(x)`` computed in fp32 and cast back, as Llama's ``LlamaRMSNorm``."""

    def __init__(self, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, dim))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


def _head_case() -> Case:
    """The output layer of a tiny Llama under the response loss: only ``lm_head.weight`` is trainable."""
    model = tiny_llama(VOCAB + 3, seed=2).double().eval()
    for name, p in model.named_parameters():
        p.requires_grad_(name == "lm_head.weight")
    ids, mask = _ids(pad=VOCAB + 2), _mask()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def sample_loss(model, i):
        length = LENGTHS[i]
        logits = model(input_ids=ids[i : i + 1, :length], attention_mask=mask[i : i + 1, :length]).logits
        return sequence_losses(logits, labels[i : i + 1, :length])[0]

    return Case(model, batch, None, sample_loss)


CASES: dict[str, dict[str, Callable[[], Case]]] = {
    "linear": {
        "bias": lambda: _layer_case(torch.nn.Linear(WIDTH, 5), _features(WIDTH)),
        "no-bias": lambda: _layer_case(torch.nn.Linear(WIDTH, 5, bias=False), _features(WIDTH)),
    },
    "conv1d": {
        "gpt2": lambda: _layer_case(pytest.importorskip("transformers.pytorch_utils").Conv1D(5, WIDTH),
                                    _features(WIDTH)),
    },
    "embedding": {
        "padding-idx": lambda: _layer_case(torch.nn.Embedding(VOCAB, WIDTH, padding_idx=0), _ids(pad=0)),
        "scaled": lambda: _layer_case(_ScaledEmbedding(VOCAB, WIDTH), _ids(pad=VOCAB - 1)),
    },
    "layernorm": {
        "affine": lambda: _layer_case(torch.nn.LayerNorm(WIDTH), _features(WIDTH)),
        "2d": lambda: _layer_case(torch.nn.LayerNorm([2, WIDTH]), _features(2, WIDTH),
                                  extra=torch.nn.Flatten(start_dim=2)),
    },
    "rmsnorm": {
        "llama": lambda: _layer_case(_LlamaLikeRMSNorm(WIDTH), _features(WIDTH)),
        "torch": lambda: _layer_case(torch.nn.RMSNorm(WIDTH, eps=1e-6), _features(WIDTH)),
    },
    "head": {
        "response-loss": _head_case,
    },
}
"""Per registered rule's name, its harness cases."""


class _Gate(torch.nn.Module):
    """No rule: the module-level vmap path."""

    def __init__(self, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(-1.0, 1.0, dim))

    def forward(self, x):
        return x * torch.sigmoid(x * self.weight)


class _DataDependent(_Gate):
    """No rule, and no vmap (a Python branch on a tensor's value): the module-level per-sample loop."""

    def forward(self, x):
        if float(x.abs().sum()) > -1:
            return x * self.weight
        return x


class _Outside(torch.nn.Module):
    """A parameter used by its parent outside any call of its owner (a PEFT ``ParameterDict``): the exact path."""

    def __init__(self, dim):
        super().__init__()
        self.scales = torch.nn.ParameterDict({"a": torch.nn.Parameter(torch.linspace(0.5, 1.5, dim))})

    def forward(self, x):
        return torch.tanh(x * self.scales["a"])


FALLBACKS: dict[str, Callable[[], Case]] = {
    "vmap": lambda: _layer_case(_Gate(WIDTH), _features(WIDTH)),
    "loop": lambda: _layer_case(_DataDependent(WIDTH), _features(WIDTH)),
    "exact": lambda: _layer_case(_Outside(WIDTH), _features(WIDTH)),
}


def _reference(case: Case, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Per-sample gradients ``[batch, *shape]``: one unpadded sample at a time, plain autograd, float64."""
    model = copy.deepcopy(case.model)
    live = {n: p for n, p in model.named_parameters() if n in params}
    rows = []
    for i in range(len(LENGTHS)):
        grads = torch.autograd.grad(case.sample_loss(model, i), list(live.values()), allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for p, g in zip(live.values(), grads)])
    return {n: torch.stack([row[k] for row in rows]).double() for k, n in enumerate(live)}


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def _run(case: Case) -> None:
    """The engine's dense and linear consumers against the reference, on the first pass (which checks the classes)
    and on a second one (which trusts the verdicts)."""
    params = {n: p for n, p in case.model.named_parameters() if p.requires_grad}
    expected = _reference(case, params)
    batch = len(LENGTHS)
    g = torch.Generator().manual_seed(3)
    directions = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()}
    for _ in range(2):
        dense = _Dense(params, batch)
        per_sample_pass(case.model, case.batch, dense, case.loss_fn, params, chunk_elements=16)
        for name in params:
            _close(dense.grads[name], expected[name])
        linear = _Directional(directions, batch)
        per_sample_pass(case.model, case.batch, linear, case.loss_fn, params)
        _close(linear.values, sum(expected[n].reshape(batch, -1) @ directions[n].reshape(-1) for n in params))


@pytest.mark.parametrize("rule,variant", [(rule, variant) for rule, cases in CASES.items() for variant in cases])
def test_rule_matches_per_sample_autograd(rule, variant):
    case = CASES[rule][variant]()
    _run(case)
    if case.module is not None:  # the family's rule, checked and kept: not a fallback that happens to agree
        assert rule_for(case.module) is named(rule)
        assert _PLANS[case.model].verdict[type(case.module)] == "rule"
        assert not _PLANS[case.model].exact
    else:
        assert linear_head(case.model, case.batch) is case.model.get_output_embeddings()


@pytest.mark.parametrize("path", list(FALLBACKS))
def test_fallback_matches_per_sample_autograd(path):
    case = FALLBACKS[path]()
    _run(case)
    plan = _PLANS[case.model]
    assert rule_for(case.module) is None
    if path == "exact":
        assert set(plan.exact) == {"layer.scales.a"}
    else:
        assert plan.verdict[type(case.module)] == "generic" and not plan.exact


def test_every_registered_rule_has_a_harness_case():
    """One case set per rule, in the registry's order (the order :func:`rule_for` tries them), names unique."""
    assert [rule.name for rule in RULES] == list(CASES)

"""The memory model: what LWF adds to the peak device memory of a decoder-only training run.

LWF keeps F and theta_ref for the whole run, and at an unlearning point it runs a scoring pass and ascent steps in
place of a learning step. Its added peak is therefore

    F + theta_ref + max(0, transient of an unlearning point - transient of a learning step),

where a transient is what a pass holds above the weights and the optimizer state: gradients, activations and the
logits with their fp32 loss terms. :func:`predict_added_bytes` evaluates it from a model config; docs/method.md
tabulates it for Llama shapes, and ``benchmarks/gpu_scale.py`` holds it against measured peaks.
"""

from __future__ import annotations

from typing import Any


def activation_bytes_per_token(config: Any) -> int:
    """Bytes a Llama-style decoder keeps per token for the backward, all layers, 16-bit activations (no
    checkpointing, fused attention): per layer the normed inputs (kept in fp32 by RMSNorm), q, k, v, the attention
    output, the residual streams and the four MLP intermediates."""
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) * (d // heads)
    per_layer = 2 * (9 * d + 2 * kv + 4 * f) + 2 * 4 * d
    return layers * per_layer


LOGIT_BYTES = 16  # per logit at the loss backward: bf16 logits, their fp32 upcast, the saved log-softmax, its gradient
SCORE_LOGIT_BYTES = 10  # per logit of one chunk of the scoring loss: fp32 logits, logsumexp's fp32 temporary, a 16-bit copy
LAYER_BLOCK_BYTES = 5  # per number of a layer's per-sample row block: the fp32 block, its w and M*F (batch >= 8)
HEAD_BLOCK_BYTES = 11  # per number of an output-layer block: its fp32 logits, their 16-bit copy, the block, w and M*F


def pass_bytes(config: Any, tokens: int, labelled_tokens: int | None = None) -> int:
    """Activations and logits of one forward+backward over ``tokens`` tokens."""
    logits = tokens if labelled_tokens is None else labelled_tokens
    return tokens * activation_bytes_per_token(config) + LOGIT_BYTES * logits * config.vocab_size


def predict_added_bytes(
    config: Any,
    *,
    trainable: int,
    weight_bytes: int = 2,
    fisher_bytes: int = 4,
    learning_tokens: int,
    score_batch: int = 8,
    score_tokens: int,
    score_chunk_elements: int = 1 << 25,
    score_loss_chunk_elements: int = 1 << 26,
    state_on_device: bool = True,
) -> dict[str, int]:
    """Bytes LWF adds to the peak device memory, by part.

    ``trainable``: trainable parameters N (all weights, or the adapters); ``weight_bytes``: their element size
    (theta_ref is kept in it; gradients too); ``learning_tokens``: tokens of one learning micro-batch;
    ``score_batch`` x ``score_tokens``: one scoring batch (its longest row), whose loss forms at most
    ``score_loss_chunk_elements`` logits at a time (:mod:`hf_lwf.method.head`; none when every row's tokens are fewer)
    and whose per-sample gradients at most ``score_chunk_elements`` numbers at a time; ``state_on_device=False``
    (``lwf_state_device='cpu'``): F and theta_ref live on the host and are staged on the device for a scoring round
    only, so they count at the point and not during learning steps.
    """
    state = trainable * (fisher_bytes + weight_bytes)
    gradients = trainable * weight_bytes
    learning = gradients + pass_bytes(config, learning_tokens)
    tokens = score_batch * score_tokens
    activations = tokens * activation_bytes_per_token(config)
    # the forward's end (activations and one chunk of the loss), a layer's block in the backward, and the output
    # layer's blocks, formed after the backward has released the activations
    scoring = max(activations + SCORE_LOGIT_BYTES * min(score_loss_chunk_elements, tokens * config.vocab_size),
                  activations + LAYER_BLOCK_BYTES * score_chunk_elements, HEAD_BLOCK_BYTES * score_chunk_elements)
    point = scoring + (0 if state_on_device else state)
    extra = max(0, point - learning)
    return {"state": state if state_on_device else 0, "learning_transient": learning, "point_transient": point,
            "added": (state if state_on_device else 0) + extra}

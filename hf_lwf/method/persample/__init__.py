"""Per-sample gradient quantities from one batched forward+backward.

Confidence scoring needs, for every sample x of a batch, ``a(x) = sum_i w_i g_{x,i}`` and
``n(x) = sum_i (M F)_i g_{x,i}**2``; the empirical Fisher needs ``sum_x g_{x,i}**2``. None of them needs a
whole-model gradient per sample. One forward of the batch records, for every module that owns trainable
parameters, its inputs; one backward of ``sum_x l_x`` records the gradient of its output (for sample x it is
``d l_x / d out_x``, since samples do not interact). From these, each module gives its per-sample parameter
gradients, layer by layer, through the rule of its family (:mod:`.rules`, one module per family):

* ``nn.Linear`` (and so LoRA's A/B): ``G_x = sum_t b_t a_t^T``; bias ``sum_t b_t`` (:mod:`.rules.linear`).
* ``transformers``' ``Conv1D`` (GPT-2, transposed weight): ``G_x = sum_t a_t b_t^T`` (:mod:`.rules.conv1d`).
* ``nn.Embedding``: rows of the sample's tokens, ``G_x[v] = sum_{t: id_t = v} b_t`` (``padding_idx`` excluded),
  times ``s`` for a subclass whose output is ``s * lookup`` (Gemma's ``embed_scale``) (:mod:`.rules.embedding`).
* the output layer, when the loss is the response loss (``loss_fn=None``) and the model's output layer allows it
  (:mod:`hf_lwf.method.head`): the layer runs on an empty sequence, the loss forms the logits of the labelled
  tokens a chunk at a time, and ``G_x[rows] = sum_t b_t[rows] h_t^T`` is formed per block of rows with the logits'
  gradient ``b_t[rows]`` recomputed from the kept log-sum-exp (:mod:`.rules.output`): no ``[batch, tokens, vocab]``
  tensor, and prompt and padding positions cost nothing.
* ``nn.LayerNorm``: weight ``sum_t b_t * xhat_t``, bias ``sum_t b_t``; Llama-style ``*RMSNorm`` the same
  (:mod:`.rules.norms`).
* anything else: ``torch.func.vmap`` of the gradient of ``<module(a_x), b_x>`` with respect to the module's own
  parameters (every argument whose first dimension is the batch split per sample), or, if that transform
  fails, a per-sample backward through that module only (:mod:`.exact`).

No rule is trusted blindly (:mod:`.plan`): the first pass over a model checks every module class once against
plain per-sample autograd of that module, and watches how every wanted parameter is used. A class whose rule
does not match takes the vmap path. Parameters that no module-level path covers (used outside a call of their
module, as PEFT's ``ParameterDict`` adapters are; owned by modules not called on batch-first tensors, as fused MoE
experts are) take the exact path: one ``torch.autograd.grad`` of each sample's loss. A rule class called on
flattened tokens (OPT's ``[batch * tokens, hidden]``) keeps its rule once one exact backward of a single sample's
loss has shown its rows grouped by sample. After the pass every wanted parameter must have received its
contribution, or the pass raises.

The per-sample gradient of a weight is formed in chunks of rows (at most ``chunk_elements`` numbers at once; on the
CPU at most :data:`CPU_CHUNK_ELEMENTS`), reduced to the per-sample scalars (or the Fisher sums) and dropped at once
(:mod:`.capture`, :mod:`.consumers`). Its contraction takes the recorded 16-bit activations and output gradients of
a 16-bit model as they are and accumulates in fp32 (:func:`~hf_lwf.method.common.matmul_f32`: tensor cores on a
GPU, no fp32 copies; the same fp32 result as upcasting first, since products of 16-bit numbers are exact in fp32).
A linear consumer's ``sum_t b_t . (w a_t)`` splits the fp32 ``w`` into two bf16 halves for bf16 activations
(:func:`~hf_lwf.method.common.project_f32`). A module call's recorded tensors are dropped as soon as its
parameters are done, so the backward does not hold every layer's inputs and output gradients to its end. A
parameter used by several modules (tied ``lm_head``/embedding) has one gradient per sample, the *sum* of the uses:
its chunks are summed over uses before they are squared. Only the parameters' own per-sample gradients are formed;
the autograd pass itself runs with the parameters frozen, so it computes input gradients only.

Under FSDP2 every rank runs the same batch (FSDP gathers each layer's weights for its forward and backward, as in
training) and forms the per-sample gradients of the rows of its own shard only: the consumers receive row blocks
numbered as in the full parameter, and their per-sample sums are partial sums that the caller adds across ranks.

Inside the package imports flow one way: :mod:`.record` and :mod:`.rules` <- :mod:`.exact` <- :mod:`.plan` <-
:mod:`.capture` <- :mod:`.engine`; :mod:`.consumers` (with :mod:`.fused`) stands beside them.
"""

from .consumers import Consumer, FisherConsumer, ScoreConsumer
from .engine import CPU_CHUNK_ELEMENTS, DEFAULT_CHUNK_ELEMENTS, per_sample_pass


__all__ = ["CPU_CHUNK_ELEMENTS", "DEFAULT_CHUNK_ELEMENTS", "Consumer", "FisherConsumer", "ScoreConsumer",
           "per_sample_pass"]

"""The method's five steps (docs/method.md) as functions on models and tensors.

- :mod:`~hf_lwf.method.selfgen`: step 1, the model's own answers to the forgetting prompts (D_self);
- :mod:`~hf_lwf.method.fisher`: step 2, the Fisher information, the intended update and the update mask;
- :mod:`~hf_lwf.method.confidence`: step 3, the forgetting confidence c(x) of every sample;
- :mod:`~hf_lwf.method.unlearn`: steps 4 and 5, selecting D_U and the bounded gradient ascent;
- :mod:`~hf_lwf.method.persample`: the per-sample gradient engine behind steps 2 and 3;
- :mod:`~hf_lwf.method.head`: the response loss from the output layer's input, a chunk of tokens at a time;
- :mod:`~hf_lwf.method.common`: what they share (the plain response loss, fp32-output matmuls, the scoring switches).

Nothing here knows about callbacks, trainers or the command line: :class:`~hf_lwf.LWFCallback` wires these
functions to the Trainer's events.
"""

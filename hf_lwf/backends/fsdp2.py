"""FSDP2 (``fully_shard``): F and theta_ref are ``DTensor`` row shards laid out like the parameters.

Every rank runs every forward (they are collective), scores every D_self batch over its own parameter rows and adds
the partial sums with one all-reduce; the ascent runs the whole D_U batch on every rank and FSDP's reduce-scatter
leaves each rank its rows of the gradient. Checkpoints hold whole tensors, gathered one at a time.
"""

from __future__ import annotations

import os

import torch

from ..distributed import is_sharded
from .base import Backend


class FSDP2Backend(Backend):
    name = "fsdp2"
    partitioned = True

    def __init__(self, version: int = 2, offloads: bool = False):
        self.version, self.offloads = version, offloads

    @classmethod
    def from_args(cls, args, model: torch.nn.Module | None = None) -> FSDP2Backend:
        version = int((getattr(args, "fsdp_config", None) or {}).get("version", os.environ.get("FSDP_VERSION", 2)))
        return cls(version=version, offloads=fsdp_offloads(args, model))

    def check(self, config, *, via_trainer: bool, model: torch.nn.Module | None = None) -> None:
        if not via_trainer:
            raise ValueError(
                "Under FSDP, LWF must run through `LWFTrainer` (or a Trainer subclass with `LWFTrainerMixin` first in "
                "its bases), not a plain LWFCallback: the sharded state is saved from `save_model` on every rank and "
                "the Fisher is read from the sharded gradients before clipping."
            )
        if self.version != 2:
            raise ValueError(
                f"hf_lwf supports FSDP2 (`fully_shard`) only; this run asks for FSDP version {self.version}, whose flat "
                "parameters LWF cannot address. Set `fsdp_config={'version': 2}`."
            )
        if config.lwf_state_device == "cpu":
            raise ValueError("`lwf_state_device='cpu'` is not supported under FSDP: LWF's state is sharded like the "
                             "parameters, so FSDP2 already divides its memory by the number of ranks.")
        if self.offloads or (model is not None and _offloaded(model)):
            raise ValueError(
                "hf_lwf does not support FSDP2 with CPU offloading (`fsdp='... offload'`, `fsdp_offload_params`, "
                "`CPUOffloadPolicy`): the offloaded shards and their gradients live on the host while the layers run "
                "on the GPU, and LWF's per-sample scoring would mix the two. Use FSDP2 without offloading (LWF's "
                "state is sharded like the parameters), or more ranks; see docs/distributed.md."
            )

    def collective_forwards(self, model: torch.nn.Module) -> bool:
        return True

    def tensors_for_saving(self, state, params, keep):
        return state.tensors_for_saving(keep=keep)


def fsdp_offloads(args, model: torch.nn.Module | None = None) -> bool:
    """Whether FSDP is asked to keep the parameter shards on the host: the ``offload`` option of
    ``TrainingArguments.fsdp``, ``offload_params``/``cpu_offload`` in ``fsdp_config``, or accelerate's
    ``FSDP_OFFLOAD_PARAMS``; or whether ``model`` already does."""
    options = getattr(args, "fsdp", None) or []
    if isinstance(options, str):
        options = options.split()
    options = [getattr(o, "value", o) for o in options] if isinstance(options, (list, tuple)) else []
    config = getattr(args, "fsdp_config", None) or {}
    if "offload" in options or any(config.get(k) in (True, "true", "True") for k in
                                   ("offload_params", "cpu_offload", "fsdp_offload_params")):
        return True
    if os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        return True
    return model is not None and _offloaded(model)


def _offloaded(model: torch.nn.Module) -> bool:
    """A sharded parameter held on the CPU of a mesh that computes elsewhere."""
    return any(is_sharded(p) and p.to_local().device.type == "cpu" and p.device_mesh.device_type != "cpu"
               for p in model.parameters())

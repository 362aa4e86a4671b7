"""The few collectives LWF needs, and the views of FSDP2-sharded tensors.

Every rank calls the collectives; each is one flattened operation, except the in-place per-gradient
all-reduce of the ascent step (:func:`all_reduce_grads_`). Under FSDP2 (``fully_shard``) the trainable
parameters, their gradients and LWF's own per-parameter state (F, theta_ref) are ``DTensor``s sharded on their first
dimension: each rank holds a contiguous block of rows. LWF works on that block (:func:`local_view`) with the rows
numbered as in the full parameter (:func:`local_rows`), so one code path serves sharded and plain tensors.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - torch without distributed tensors
    DTensor = FSDPModule = Shard = compute_local_shape_and_global_offset = None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` in place across ranks with one flattened all-reduce (a no-op in a single process)."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_grads_(tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` (gradients) in place across ranks, one all-reduce per tensor, all in flight at once.

    No flat copy: the only extra memory is what the backend needs per tensor (a no-op in a single process)."""
    if not is_distributed() or not tensors:
        return
    handles = [dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True) for t in tensors]
    for handle in handles:
        handle.wait()


def shard_indices(num_items: int) -> list[int]:
    """The item indices this rank handles when ``num_items`` are split across ranks."""
    rank, world = rank_and_world()
    return list(range(rank, num_items, world))


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def reshard(model: torch.nn.Module) -> None:
    """Register every FSDP2 module's sharded parameters again (a no-op for other models and when already sharded)."""
    if FSDPModule is None:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_sharded(tensors: torch.Tensor | Iterable[torch.Tensor] | torch.nn.Module) -> bool:
    """Whether ``tensors`` (one tensor, an iterable of them, or a model's parameters) holds FSDP2 ``DTensor`` shards.

    A model also counts as sharded under DeepSpeed ZeRO-3: its forwards are collective too."""
    if DTensor is None:
        return False
    if isinstance(tensors, torch.nn.Module):
        if FSDPModule is not None and any(isinstance(m, FSDPModule) for m in tensors.modules()):
            return True
        if any(hasattr(p, "ds_id") for p in tensors.parameters()):  # DeepSpeed ZeRO-3 partitions
            return True
        tensors = tensors.parameters()
    if isinstance(tensors, torch.Tensor):
        return isinstance(tensors, DTensor)
    return any(isinstance(t, DTensor) for t in tensors)


def check_shardable(tensor: torch.Tensor, name: str = "parameter") -> None:
    """LWF follows FSDP2's layout: a one-dimensional mesh, every tensor split on dim 0 (``Shard(0)``)."""
    mesh = tensor.device_mesh
    if mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),) or mesh.size() != rank_and_world()[1]:
        raise NotImplementedError(
            "hf_lwf supports FSDP2 `fully_shard` over all ranks on a one-dimensional device mesh (placements "
            f"(Shard(0),)); {name} has mesh {tuple(mesh.shape)} and placements {tuple(tensor.placements)} "
            "(HSDP and tensor parallelism are not supported)."
        )


def local_rows(tensor: torch.Tensor) -> slice | None:
    """The rows (dim 0, numbered as in the full tensor) this rank holds of a sharded tensor; None for a plain one."""
    if not is_sharded(tensor):
        return None
    check_shardable(tensor)
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return slice(offset[0], offset[0] + shape[0])


def local_view(tensor: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """``tensor[rows]`` (rows numbered as in the full tensor, None: all this rank has) as a view of the local data.

    For a sharded tensor ``rows`` must lie within :func:`local_rows`; in-place writes reach the ``DTensor``.
    """
    if not is_sharded(tensor):
        return tensor if rows is None else tensor[rows]
    data = tensor.to_local()
    if rows is None:
        return data
    own = local_rows(tensor)
    if rows.start < own.start or rows.stop > own.stop:
        raise IndexError(f"rows {rows.start}:{rows.stop} are not in this rank's shard {own.start}:{own.stop}.")
    return data[rows.start - own.start : rows.stop - own.start]


def like_shard(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` (a whole tensor, or already only this rank's rows) laid out like ``param``: a ``DTensor`` shard when
    ``param`` is one, else ``full`` itself, on ``param``'s device."""
    if not is_sharded(param):
        return full.to(param.device)
    own = local_rows(param)
    local = full if full.shape[0] == own.stop - own.start and full.shape[0] != param.shape[0] else full[own]
    return DTensor.from_local(local.to(param.to_local().device).contiguous(), param.device_mesh, param.placements,
                              run_check=False, shape=param.shape, stride=param.stride())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an all-gather for a sharded one (every rank must call it), the tensor itself otherwise."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def input_device(model: torch.nn.Module) -> torch.device:
    """The device the model's inputs (and so LWF's batches and per-sample sums) belong on.

    Not ``next(model.parameters()).device``: under FSDP2 with CPU offloading the shards live on the host while the
    computation runs on the mesh's accelerator, and with a ``device_map`` (accelerate's dispatch, several GPUs) the
    first parameter may sit on any device, or on ``meta``. In order: an FSDP2 mesh's device; the execution device
    accelerate's hook assigns to the input embeddings; the input embeddings' own device; the first parameter not on
    ``meta``.
    """
    params = list(model.parameters())
    sharded = next((p for p in params if is_sharded(p)), None)
    if sharded is not None:
        kind = sharded.device_mesh.device_type
        return torch.device("cpu") if kind == "cpu" else torch.device(kind, _current_index(kind))
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        hook = getattr(embeddings, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        if execution is not None:
            return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
        weight = getattr(embeddings, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
            return weight.device
    for p in params:
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _current_index(kind: str) -> int:
    module = getattr(torch, kind, None)
    return module.current_device() if module is not None and hasattr(module, "current_device") else 0


def collective_device(fallback: torch.device | str) -> torch.device:
    """A device the default process group's backend accepts tensors on: the current GPU for NCCL (it rejects host
    tensors), ``fallback`` otherwise (gloo, or a backend per device type)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(fallback)


def all_reduce_(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """All-reduce one tensor in place (sum by default); a no-op in a single process."""
    if is_distributed():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor

"""Fully sharded data parallel (``parallel: fsdp``): PyTorch's FSDP2 ``fully_shard`` around each transformer
block and the model, the gathered view the rollouts and the reward run on, and sharded checkpoints through
``torch.distributed.checkpoint`` (DCP).

Sharding: every rank builds the same full model, rank 0's weights are broadcast (as DDP does), then each
transformer block, the model's root (embeddings, final norm, LM head) and the value head become FSDP units whose
parameters are DTensors sharded on dim 0 over the ranks. The optimizer is built after sharding: its moments
are sharded too. The loss's forward/backward all-gathers one unit at a time and reduce-scatters its gradients
(averaged over ranks, like DDP's all-reduce) after every micro-batch: FSDP2's no-sync accumulation would keep
full-size gradients on every rank, which is what sharding is meant to avoid.

Rollouts and scoring run inside ``gathered(...)``: every unit is all-gathered once and kept unsharded until
the block exits (every rank enters together: the gather is collective). Ranks generate responses of different
lengths and score different numbers of episodes, so a per-forward all-gather would deadlock; with the weights
gathered, the forwards and the reward's backward (which only asks for activation gradients) issue no
collective. Peak memory during a rollout is the full model plus the shards, as with any ZeRO-3 generation that
is not served by a separate engine.

The FisherTracker's SVD refresh gathers only the tracked weights (``full_weight``), never the whole model.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn

from l2t_ext.errors import InputError
from l2t_ext.reward.fisher import full_weight

DCP_DIR = "dcp"  # inside a checkpoint: the sharded model (and optimizer) state


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (``...layers``, ``...h`` or ``...blocks``), the units FSDP shards."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks") and len(mod):
            return mod
    raise InputError(f"parallel=fsdp: {type(model).__name__} has no list of transformer blocks "
                     "('...layers', '...h' or '...blocks') to shard")


def broadcast_from_rank0(module: nn.Module) -> None:
    """Every parameter and buffer of ``module`` set to rank 0's value (collective; same module on every rank)."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def shard(model: nn.Module, value_head: nn.Module | None = None) -> None:
    """FSDP2 in place: each block of ``model`` is one unit and ``model`` the root unit (embeddings, final norm, LM
    head); the value head, called apart from the model, is a root of its own. The model stays the root because
    generation, the reward's probes and the loss all call it directly. The mesh is built on the model's device
    type: fully_shard's default mesh takes the accelerator whenever one is present, so CPU ranks on a machine with
    fewer GPUs than ranks would try cuda:LOCAL_RANK."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if value_head is not None:
        fully_shard(value_head, mesh=mesh)


def fsdp_units(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def unshard(*modules: nn.Module | None) -> list[nn.Module]:
    """All-gather every FSDP unit of ``modules`` and keep the full weights through forwards and backwards until
    ``reshard`` (collective: every rank calls it together). Returns the units; none for unsharded modules."""
    units = [u for m in modules if m is not None for u in fsdp_units(m)]
    for u in units:
        u.set_reshard_after_forward(False, recurse=False)
        u.set_reshard_after_backward(False, recurse=False)
    for u in units:
        u.unshard()
    return units


def reshard(units: list[nn.Module]) -> None:
    """Free the gathered weights of ``units`` (local, no communication) and restore per-unit resharding."""
    for u in units:
        u.reshard()
        u.set_reshard_after_forward(True, recurse=False)
        u.set_reshard_after_backward(True, recurse=False)


@contextlib.contextmanager
def gathered(*modules: nn.Module | None):
    """``unshard`` for the duration of the block (a no-op for unsharded modules)."""
    units = unshard(*modules)
    try:
        yield
    finally:
        reshard(units)


def full_parameters(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter's full value, in ``parameters()`` order (collective under FSDP)."""
    return [full_weight(p.detach()) for p in module.parameters()]


def save_sharded(path: str, policy: nn.Module, opt: torch.optim.Optimizer | None) -> None:
    """DCP save of the policy's (and ``opt``'s) sharded state under ``path`` (collective; each rank writes its
    shards, rank 0 the metadata). ``path`` must be on a file system every rank sees."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if opt is None:
        state = {"model": get_model_state_dict(policy)}
    else:
        msd, osd = get_state_dict(policy, opt)
        state = {"model": msd, "optim": osd}
    dcp.save(state, checkpoint_id=path)


def load_sharded(path: str, policy: nn.Module, opt: torch.optim.Optimizer | None) -> bool:
    """DCP load into the sharded policy (and ``opt``, when ``path`` holds optimizer state); returns whether the
    optimizer was restored. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no sharded state (was this checkpoint written with parallel=fsdp?)")
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    if opt is not None and any(k.startswith("optim.") for k in saved):
        msd, osd = get_state_dict(policy, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(policy, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return True
    state = {"model": get_model_state_dict(policy)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(policy, state["model"])
    return False


def full_model_state(model: nn.Module) -> dict:
    """The full (unsharded) state dict of ``model`` on CPU, on rank 0 (empty elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

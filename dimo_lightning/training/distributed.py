"""Distribution helpers of the training step: shard-aware gradient norms and clipping, FSDP2 sharding of the token
networks, and local views of (possibly sharded) tensors.

Pure functions: tensors and modules in, tensors out. The LightningModule decides when to call them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds of a DTensor (a view sharing storage), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def global_grad_norm(parameters: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 norm of all gradients, over every shard of every rank for DTensor (FSDP2) parameters.

    One pass over the gradients. Under DDP the gradients are already all-reduced, so the norm is the same on every
    rank; for DTensor gradients the per-shard norms are reduced across the mesh, so the result is global too.

    Args:
        parameters: parameters whose ``.grad`` is set (plain tensors or DTensors, not mixed across meshes).

    Returns:
        (norm for :func:`clip_grads_`, which may be a DTensor; the same norm as a plain float32 scalar tensor on the
        gradients' device). A rank without gradients gets 0.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(()), torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    plain = norm.full_tensor() if isinstance(norm, DTensor) else norm
    return norm, plain.float()


def clip_grads_(parameters: Iterable[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale the gradients by ``min(1, max_norm / (norm + 1e-6))`` given their precomputed global ``norm``
    (no second pass over the gradients). ``max_norm <= 0`` leaves them unchanged."""
    if max_norm <= 0:
        return
    grads = [p for p in parameters if p.grad is not None]
    if grads:
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, norm)


def is_sharded(module: nn.Module) -> bool:
    """True if ``module`` has been passed through FSDP2 ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_network(network: nn.Module, mesh, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2-shard a token network in place: each attention and MLP block of each transformer layer is one unit,
    the rest (embeddings, tied head, first/last layers) the root unit. Idempotent: an already sharded network is
    returned unchanged.

    Args:
        network: a :class:`~dimo_lightning.nn.transformer.MaskTransformer`, a Meissonic or aMUSEd network, or any
            module; the blocks :func:`shard_units` lists become their own units.
        mesh: the data-parallel ``DeviceMesh`` (1-D) to shard over.
        reshard_after_forward: free the gathered parameters after each forward (ZeRO-3); False keeps them until
            the backward (ZeRO-2, more memory, fewer all-gathers).

    Returns:
        ``network`` (now an ``FSDPModule``).
    """
    from torch.distributed.fsdp import fully_shard

    if is_sharded(network):
        return network
    for block in shard_units(network):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(network, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return network


# Block lists of the text-to-image networks: MeissonicTransformer (dual- and single-stream blocks) and the aMUSEd
# UVit2DModel (transformer layers); each block becomes one FSDP unit.
_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "transformer_layers")


def shard_units(network: nn.Module) -> list[nn.Module]:
    """The submodules :func:`shard_network` shards as their own units (the rest stays in the root unit)."""
    units: list[nn.Module] = []
    layers = getattr(getattr(network, "transformer", None), "layers", None)
    for layer in layers if layers is not None else []:
        # A MaskTransformer layer is a ModuleList (attention, MLP) without a forward: shard its blocks.
        units.extend(layer if isinstance(layer, nn.ModuleList) else [layer])
    for name in _BLOCK_LISTS:
        blocks = getattr(network, name, None)
        if isinstance(blocks, nn.ModuleList):
            units.extend(blocks)
    # The text networks: LLaDA (``blocks``: model.transformer.blocks) and MDLM (backbone.blocks); each transformer
    # block is one unit, the embedding table and the output head stay in the root unit.
    for owner in (network, getattr(network, "backbone", None)):
        blocks = getattr(owner, "blocks", None) if owner is not None else None
        if isinstance(blocks, nn.ModuleList) and not units:
            units.extend(blocks)
    return units

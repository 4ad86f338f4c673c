"""FSDP2 sharding policy: each transformer block is a unit, then the network."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .model import ClusterTransformer


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def shard_model(model: ClusterTransformer, mesh: DeviceMesh, precision: str) -> ClusterTransformer:
    """Shard parameters over ``mesh`` (dim 0 of every tensor, one slice per rank).

    With bf16 the parameters are gathered and computed in bfloat16 while the
    sharded master copy, the gradient reduction and the optimizer stay float32.
    The root keeps its float32 input: the model normalises the set in float32
    and casts afterwards. FSDP2 moves the parameters to the mesh's device.
    """
    block_policy = root_policy = MixedPrecisionPolicy()
    if precision == "bf16":
        block_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        root_policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=block_policy)
    fully_shard(model, mesh=mesh, mp_policy=root_policy)
    return model

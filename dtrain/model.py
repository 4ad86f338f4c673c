"""The cluster-prediction transformer: a set of points in, each point's centre out.

There is no positional encoding and attention is over the whole set, so the
network is permutation equivariant: permuting the input points permutes the
predicted centres the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError


class Block(nn.Module):
    """A pre-norm transformer block (self-attention, then MLP)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.attn_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, points, width = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(batch, points, 3, self.heads, -1).unbind(2)
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.attn_out(attended.transpose(1, 2).reshape(batch, points, width)))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class ClusterTransformer(nn.Module):
    """Centres and scales each set, predicts centres in those units, undoes the scaling.

    The normalisation runs in float32 even under bf16 mixed precision: the
    input is cast to the parameters' dtype only after it, and the output back
    to float32 before it is undone.
    """

    def __init__(self, dim: int, width: int, layers: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"model width {width} is not divisible by {heads} heads")
        self.embed = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, dim)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        points = points.float()
        centre = points.mean(dim=1, keepdim=True)
        scale = (points - centre).pow(2).mean(dim=(1, 2), keepdim=True).sqrt().clamp_min(1e-6)
        h = self.embed(((points - centre) / scale).to(self.embed.weight.dtype))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)).float() * scale + centre


def build_model(model_cfg, dim: int) -> ClusterTransformer:
    return ClusterTransformer(
        dim, model_cfg.width, model_cfg.layers, model_cfg.heads, model_cfg.mlp_ratio, model_cfg.dropout
    )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameters_of(model_cfg, dim: int) -> int:
    """The parameters ``build_model`` would make, counted without building it."""
    w, hidden = model_cfg.width, model_cfg.mlp_ratio * model_cfg.width
    block = 4 * w + (3 * w * w + 3 * w) + (w * w + w) + (w * hidden + hidden) + (hidden * w + w)
    return (dim * w + w) + model_cfg.layers * block + 2 * w + (w * dim + dim)


def check_fits(model_cfg, dim: int, world_size: int, device: torch.device) -> None:
    """Refuse, in one line and before any allocation, a model this machine cannot hold: each rank
    builds it whole in fp32, then keeps a 1/world_size shard of weights, gradients and AdamW's two
    moments. Ranks on one host share its memory; each GPU is its own."""
    params = parameters_of(model_cfg, dim)
    need = 4 * params + 16 * params // world_size
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        need *= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        meminfo = Path("/proc/meminfo")
        lines = meminfo.read_text().splitlines() if meminfo.exists() else []
        free = next((int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:")), None)
    if free is not None and need > free:
        raise ConfigError(
            f"the model has {params:.3g} parameters (--model.width={model_cfg.width}, "
            f"--model.layers={model_cfg.layers}, --model.mlp_ratio={model_cfg.mlp_ratio}) and needs "
            f"{need / 2**30:.3g} GiB on this {device.type} host, which has {free / 2**30:.3g} GiB free; "
            "choose a smaller width or fewer layers, or more ranks to shard it over"
        )

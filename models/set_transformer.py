"""Permutation-equivariant transformer blocks over sets of cells.

No positional encoding anywhere: a set of cells has no order, so permuting the input cells
permutes the output cells the same way (tested). Padded cells are excluded as attention keys
through a boolean mask (True = real cell), so a set of 100 cells padded to 128 gives the same
outputs on its 100 cells as the unpadded set.

Attention is written with ``scaled_dot_product_attention`` on explicit q/k/v projections
rather than ``nn.MultiheadAttention``: the same code then runs under DeepSpeed bf16 and
exports to ONNX with a dynamic set size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "SetBlock", "key_mask"]


def key_mask(mask: torch.Tensor | None, n_queries: int) -> torch.Tensor | None:
    """(B, S) True-for-real-cells -> the (B, 1, Q, S) boolean mask SDPA expects."""
    if mask is None:
        return None
    return mask[:, None, None, :].expand(-1, 1, n_queries, -1)


class Attention(nn.Module):
    """Multi-head attention of ``x`` (B, Q, H) over ``context`` (B, S, H) (self when None)."""

    def __init__(self, hidden: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        context = x if context is None else context
        b, q_len, h = x.shape
        d = h // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, -1, self.heads, d).transpose(1, 2)

        k, v = self.kv(context).chunk(2, dim=-1)
        y = F.scaled_dot_product_attention(
            split(self.q(x)), split(k), split(v), attn_mask=key_mask(mask, q_len),
            dropout_p=self.dropout if self.training else 0.0,
        )  # fmt: skip
        return self.out(y.transpose(1, 2).reshape(b, q_len, h))


class SetBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, optional cross-attention to a context set, MLP."""

    def __init__(
        self, hidden: int, heads: int, mlp_ratio: float, dropout: float, cross: bool
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = Attention(hidden, heads, dropout)
        self.cross = Attention(hidden, heads, dropout) if cross else None
        self.norm_cross = nn.LayerNorm(hidden) if cross else None
        self.norm2 = nn.LayerNorm(hidden)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, inner), nn.GELU(), nn.Dropout(dropout), nn.Linear(inner, hidden)
        )

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask=mask)
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), context, context_mask)
        return x + self.mlp(self.norm2(x))

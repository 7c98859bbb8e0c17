"""A Diffusion Transformer (Peebles & Xie 2023) over a VAE latent vector.

Tokenization: the latent ``z`` (n, d) is cut into ``d / patch_size`` tokens of ``patch_size``
consecutive dimensions (zero-padded to a multiple), each linearly projected to ``hidden`` and
given a learned position embedding. A VAE latent is not an image: its dimensions have no
spatial order, so there is no sinusoidal 2-D embedding; the learned embedding just tells the
network which dimensions a token holds, and attention models their joint structure. The
sequence stays short (10-16 tokens), so attention costs nothing next to the MLPs, while a
single token (patch = d) would reduce the model to an MLP.

Conditioning is adaLN-Zero: the sum of the timestep embedding and the condition embedding
regresses per-block shift/scale/gate; modulation layers and the output projection start at
zero, so every block starts as the identity and the untrained model predicts 0.

Conditions arrive as two tensors, easy to export: ``codes`` (n, n_categorical) int64 where
the value ``n_categories[k]`` is column k's learned *null* (classifier-free guidance), and
``values`` (n, n_continuous) float where NaN is the null of a continuous covariate (time,
coordinates, dose), embedded by random-free Fourier features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DiT", "DiTConfig"]


@dataclass(frozen=True)
class DiTConfig:
    n_latent: int
    patch_size: int = 1
    hidden: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    n_categories: tuple[int, ...] = ()  # per categorical covariate, nulls excluded
    n_continuous: int = 0
    n_frequencies: int = 8  # Fourier features per continuous covariate: 2 * n_frequencies

    def __post_init__(self) -> None:
        if min(self.n_latent, self.patch_size, self.hidden, self.depth, self.heads) < 1:
            raise ValueError("n_latent, patch_size, hidden, depth and heads must be >= 1")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if any(n < 1 for n in self.n_categories) or self.n_continuous < 0:
            raise ValueError("each categorical covariate needs >= 1 category")
        object.__setattr__(self, "n_categories", tuple(int(n) for n in self.n_categories))

    @property
    def n_tokens(self) -> int:
        return -(-self.n_latent // self.patch_size)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of ``t`` in [0, 1] (scaled to 0..1000 like DDPM step indices)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, n_features: int = 256) -> None:
        super().__init__()
        self.n_features = n_features
        self.mlp = nn.Sequential(
            nn.Linear(n_features, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.n_features).to(self.mlp[0].weight.dtype))


class ConditionEmbedder(nn.Module):
    """Sum of one embedding per covariate; each has a learned null used for CFG."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        h = config.hidden
        self.categorical = nn.ModuleList(nn.Embedding(n + 1, h) for n in config.n_categories)
        self.n_frequencies = config.n_frequencies
        # Octave-spaced frequencies cover covariates standardized to about [-3, 3].
        freqs = 2.0 ** torch.arange(config.n_frequencies, dtype=torch.float32) / 4.0
        self.register_buffer("frequencies", freqs, persistent=False)
        self.continuous = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * config.n_frequencies + 1, h), nn.SiLU(), nn.Linear(h, h))
            for _ in range(config.n_continuous)
        )
        # No zero-size tensors when there is no continuous covariate: checkpoint formats
        # (safetensors) treat empty tensors as shared storage and drop them.
        self.continuous_null = (
            nn.Parameter(torch.zeros(config.n_continuous, h)) if config.n_continuous else None
        )
        for emb in self.categorical:
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, codes: torch.Tensor, values: torch.Tensor, like: torch.Tensor):
        out = torch.zeros_like(like)
        for k, emb in enumerate(self.categorical):
            out = out + emb(codes[:, k])
        for k, mlp in enumerate(self.continuous):
            v = values[:, k : k + 1].float()
            missing = torch.isnan(v)
            v = torch.where(missing, torch.zeros_like(v), v)
            angles = 2 * math.pi * v * self.frequencies
            feats = torch.cat([v, torch.sin(angles), torch.cos(angles)], dim=-1)
            emb = mlp(feats.to(like.dtype))
            out = out + torch.where(missing, self.continuous_null[k].to(like.dtype), emb)
        return out


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def norm_modulate(
    norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """``modulate(norm(x), shift, scale)``; when one row of parameters serves every row (a
    sampler's shared condition) they are the LayerNorm's own affine, one fused op in ONNX
    instead of three (the exported shared denoiser is about 10% faster for it)."""
    if shift.shape[0] == 1:
        return F.layer_norm(x, norm.normalized_shape, 1 + scale[0], shift[0], norm.eps)
    return modulate(norm(x), shift, scale)


class Attention(nn.Module):
    """Multi-head self-attention over the latent's tokens.

    ``explicit`` (set by the ONNX export) computes the same attention as broadcast products
    and sums instead of ``scaled_dot_product_attention``. Why: the exported SDPA transposes
    every key block to (tokens x head_dim) -> (head_dim x tokens), and onnxruntime's generic
    transpose of such small trailing dimensions took 2 x 3.3 ms of a 15 ms denoiser call at
    batch 512 (ORT slower than torch); with a few tokens the explicit form costs nothing
    extra and needs no transpose at all (8.5 ms).
    """

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.explicit = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, h = x.shape
        d = h // self.heads
        if self.explicit:
            q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d).unbind(2)  # (n, t, heads, d)
            scores = (q.unsqueeze(2) * k.unsqueeze(1)).sum(-1) * d**-0.5  # (n, tq, tk, heads)
            weights = scores.softmax(dim=2)
            out = (weights.unsqueeze(-1) * v.unsqueeze(1)).sum(2)  # (n, tq, heads, d)
            return self.proj(out.reshape(n, t, h))
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(n, t, h))


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden)
        )
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.modulated(x, self.modulation(c))

    def modulated(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The block given its adaLN parameters ``m`` (n, 6 * hidden) already computed."""
        shift1, scale1, gate1, shift2, scale2, gate2 = m.chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(norm_modulate(self.norm1, x, shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(norm_modulate(self.norm2, x, shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.modulated(x, self.modulation(c))

    def modulated(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        shift, scale = m.chunk(2, dim=-1)
        return self.linear(norm_modulate(self.norm, x, shift, scale))


class DiT(nn.Module):
    """``forward(x (n, d), t (n,) in [0, 1], codes (n, k) int64, values (n, m) float)``
    -> prediction (n, d): epsilon, v or velocity, as the objective defines it."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.x_embed = nn.Linear(c.patch_size, c.hidden)
        self.pos_embed = nn.Parameter(torch.randn(1, c.n_tokens, c.hidden) * 0.02)
        self.t_embed = TimestepEmbedder(c.hidden)
        self.c_embed = ConditionEmbedder(c)
        self.blocks = nn.ModuleList(
            DiTBlock(c.hidden, c.heads, c.mlp_ratio) for _ in range(c.depth)
        )
        self.final = FinalLayer(c.hidden, c.patch_size)
        self.register_buffer(
            "null_codes", torch.tensor(c.n_categories, dtype=torch.long), persistent=False
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for mlp in (self.t_embed.mlp, *self.c_embed.continuous):
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        nn.init.zeros_(self.final.modulation[-1].weight)
        nn.init.zeros_(self.final.modulation[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def null_condition(self, n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and values meaning "no condition" for ``n`` rows (the CFG unconditional)."""
        device = device or self.null_codes.device
        codes = self.null_codes.to(device).expand(n, -1).clone()
        values = torch.full((n, self.config.n_continuous), float("nan"), device=device)
        return codes, values

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        codes: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:
        return self.forward_modulated(x, self.modulations(t, codes, values))

    def modulations(
        self, t: torch.Tensor, codes: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """Every block's adaLN parameters and the final layer's, (n, modulation_width).

        They depend on the time and the condition only, never on ``x``: a sampler whose rows
        share a few conditions computes them once per distinct (t, condition) and gathers
        (the ONNX runtime does, through the ``conditioner`` and ``denoiser_body`` graphs).
        """
        emb = self.t_embed(t)
        cond = emb + self.c_embed(codes, values, emb)  # each modulation applies SiLU
        parts = [block.modulation(cond) for block in self.blocks]
        return torch.cat([*parts, self.final.modulation(cond)], dim=-1)

    @property
    def modulation_width(self) -> int:
        return (6 * self.config.depth + 2) * self.config.hidden

    def forward_modulated(self, x: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        """The prediction for ``x`` (n, d) given ``modulations(...)`` of its rows."""
        c = self.config
        n, d = x.shape
        dtype = self.x_embed.weight.dtype
        pad = c.n_tokens * c.patch_size - d
        tokens = F.pad(x, (0, pad)) if pad else x
        h = self.x_embed(tokens.reshape(n, c.n_tokens, c.patch_size).to(dtype)) + self.pos_embed
        width = 6 * c.hidden
        for i, block in enumerate(self.blocks):
            h = block.modulated(h, modulation[:, i * width : (i + 1) * width])
        out = self.final.modulated(h, modulation[:, c.depth * width :])
        return out.reshape(n, c.n_tokens * c.patch_size)[:, :d].to(x.dtype)

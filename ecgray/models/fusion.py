"""Fusion modules ("meta-mappers"): ECG encoder outputs -> n_prefix soft-prompt embeddings for the LLM.

Every mapper has the same call: `forward(pooled (B, D_enc), tokens (B, N, D_enc) | None) -> (B, n_prefix,
D_llm)`. These are the only trainable tensors of the whole model: the inner loop adapts exactly these.

- `AttentionMapper`: method.md section 2, exactly (the paper's design; uses only the pooled vector).
- `MLPMapper`: pooled vector -> 2-layer MLP -> n_prefix embeddings (a small baseline).
- `QFormerMapper`: n_prefix learnable queries cross-attend over the encoder tokens (and the pooled
  vector), then self-attend; a small Q-Former. Sees the whole token sequence, not just its mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ecgray.config import ModelConfig


def _xavier_linear(d_in: int, d_out: int) -> nn.Linear:
    # Xavier-uniform weights as in the paper; zero biases (the paper does not say; zero is the neutral choice).
    layer = nn.Linear(d_in, d_out, bias=True)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _check_pooled(pooled: torch.Tensor, d_enc: int, who: str) -> None:
    if pooled.dim() != 2 or pooled.shape[1] != d_enc:
        raise ValueError(f"{who}: pooled ECG vector must be (B, {d_enc}), got {tuple(pooled.shape)}")


class AttentionMapper(nn.Module):
    """The paper's meta-mapper: self-attention over [4 learnable prefix vectors ; the pooled ECG vector].

    Q, K, V = Linear(D_enc -> D_llm) of the set; 8 heads of D_llm/8; scores scaled by sqrt(D_llm) (not the head
    dim); O = Q_h + softmax(Q_h K_h^T / sqrt(D_llm)) V_h; heads concatenated; dropout -> LayerNorm ->
    O + LeakyReLU(Linear(O)) -> dropout -> LayerNorm; the first n_prefix positions are the prefix embeddings.
    """

    def __init__(self, d_enc: int, d_llm: int, n_prefix: int = 4, n_heads: int = 8, dropout: float = 0.5):
        super().__init__()
        if d_llm % n_heads:
            raise ValueError(f"AttentionMapper: d_llm={d_llm} is not divisible by n_heads={n_heads}")
        self.d_enc, self.d_llm, self.n_prefix, self.n_heads = d_enc, d_llm, n_prefix, n_heads
        self.prefix = nn.Parameter(torch.randn(n_prefix, d_enc))  # N(0, 1), as in the paper
        self.q = _xavier_linear(d_enc, d_llm)
        self.k = _xavier_linear(d_enc, d_llm)
        self.v = _xavier_linear(d_enc, d_llm)
        self.ff = nn.Linear(d_llm, d_llm)  # default torch init: the paper only names Q, K, V as Xavier
        self.norm1 = nn.LayerNorm(d_llm)
        self.norm2 = nn.LayerNorm(d_llm)
        self.dropout = nn.Dropout(dropout)

    def forward(self, pooled: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        _check_pooled(pooled, self.d_enc, "AttentionMapper")
        b = pooled.shape[0]
        x = torch.cat([self.prefix.expand(b, -1, -1), pooled[:, None, :]], dim=1)  # (B, n_prefix+1, D_enc)
        h, dh = self.n_heads, self.d_llm // self.n_heads
        # (B, S, D_llm) -> (B, h, S, D_llm/h)
        q, k, v = (proj(x).unflatten(-1, (h, dh)).transpose(1, 2) for proj in (self.q, self.k, self.v))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.d_llm), dim=-1)  # (B, h, S, S)
        o = (q + attn @ v).transpose(1, 2).flatten(2)  # (B, S, D_llm), heads concatenated
        o = self.norm1(self.dropout(o))
        o = o + F.leaky_relu(self.ff(o))
        o = self.norm2(self.dropout(o))
        return o[:, : self.n_prefix]  # (B, n_prefix, D_llm)


class MLPMapper(nn.Module):
    """ClipCap-style baseline: pooled (B, D_enc) -> Linear -> GELU -> Linear -> (B, n_prefix, D_llm) -> LayerNorm."""

    def __init__(self, d_enc: int, d_llm: int, n_prefix: int = 4, hidden: int = 1024, dropout: float = 0.5):
        super().__init__()
        self.d_enc, self.d_llm, self.n_prefix = d_enc, d_llm, n_prefix
        self.fc1 = _xavier_linear(d_enc, hidden)
        self.fc2 = _xavier_linear(hidden, n_prefix * d_llm)
        self.norm = nn.LayerNorm(d_llm)
        self.dropout = nn.Dropout(dropout)

    def forward(self, pooled: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        _check_pooled(pooled, self.d_enc, "MLPMapper")
        x = self.fc2(self.dropout(F.gelu(self.fc1(pooled))))  # (B, n_prefix * D_llm)
        return self.norm(x.unflatten(-1, (self.n_prefix, self.d_llm)))  # (B, n_prefix, D_llm)


def _attention(q: torch.Tensor, kv: torch.Tensor, proj_q, proj_kv, proj_o, n_heads: int) -> torch.Tensor:
    # q (B, Sq, D), kv (B, Sk, D) -> (B, Sq, D); scaled dot-product multi-head attention.
    h = n_heads
    qh = proj_q(q).unflatten(-1, (h, -1)).transpose(1, 2)  # (B, h, Sq, D/h)
    kh, vh = proj_kv(kv).unflatten(-1, (2, h, -1)).permute(2, 0, 3, 1, 4)  # 2 x (B, h, Sk, D/h)
    attn = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1]), dim=-1)
    return proj_o((attn @ vh).transpose(1, 2).flatten(2))


class _QFormerBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.norm_x, self.norm_kv, self.norm_s, self.norm_f = (nn.LayerNorm(d) for _ in range(4))
        self.cross_q, self.cross_kv, self.cross_o = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.self_q, self.self_kv, self.self_o = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        # pre-norm: cross-attention to the ECG tokens, then self-attention among the queries, then MLP
        x = x + self.dropout(
            _attention(
                self.norm_x(x), self.norm_kv(memory), self.cross_q, self.cross_kv, self.cross_o, self.n_heads
            )
        )
        s = self.norm_s(x)
        x = x + self.dropout(_attention(s, s, self.self_q, self.self_kv, self.self_o, self.n_heads))
        return x + self.dropout(self.ff(self.norm_f(x)))


class QFormerMapper(nn.Module):
    """n_prefix learnable queries cross-attend over [pooled ; encoder tokens] (projected to a width d_model),
    then a LayerNorm and Linear(d_model -> D_llm) give the prefix embeddings."""

    def __init__(
        self,
        d_enc: int,
        d_llm: int,
        n_prefix: int = 4,
        n_heads: int = 8,
        n_layers: int = 2,
        d_model: int = 256,
        dropout: float = 0.1,
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"QFormerMapper: d_model={d_model} is not divisible by n_heads={n_heads}")
        self.d_enc, self.d_llm, self.n_prefix = d_enc, d_llm, n_prefix
        self.queries = nn.Parameter(torch.randn(n_prefix, d_model) * 0.02)
        self.memory_proj = nn.Linear(d_enc, d_model)
        self.blocks = nn.ModuleList(_QFormerBlock(d_model, n_heads, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, d_llm)

    def forward(self, pooled: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        _check_pooled(pooled, self.d_enc, "QFormerMapper")
        memory = pooled[:, None, :]
        if tokens is not None:
            if tokens.dim() != 3 or tokens.shape[0] != pooled.shape[0] or tokens.shape[2] != self.d_enc:
                raise ValueError(
                    f"QFormerMapper: encoder tokens must be ({pooled.shape[0]}, N, {self.d_enc}), "
                    f"got {tuple(tokens.shape)}"
                )
            memory = torch.cat([memory, tokens], dim=1)  # (B, 1+N, D_enc)
        memory = self.memory_proj(memory)  # (B, 1+N, d_model)
        x = self.queries.expand(pooled.shape[0], -1, -1)  # (B, n_prefix, d_model)
        for block in self.blocks:
            x = block(x, memory)
        return self.out(self.norm(x))  # (B, n_prefix, D_llm)


def build_mapper(cfg: ModelConfig, d_enc: int, d_llm: int) -> nn.Module:
    """The fusion module named by `cfg.mapper` (attention | mlp | qformer)."""
    if cfg.mapper == "attention":
        return AttentionMapper(d_enc, d_llm, cfg.n_prefix, cfg.n_heads, cfg.dropout)
    if cfg.mapper == "mlp":
        return MLPMapper(d_enc, d_llm, cfg.n_prefix, cfg.mlp_hidden, cfg.dropout)
    if cfg.mapper == "qformer":
        return QFormerMapper(
            d_enc,
            d_llm,
            cfg.n_prefix,
            cfg.n_heads,
            cfg.qformer_layers,
            cfg.qformer_width,
            cfg.qformer_dropout,
        )
    raise ValueError(f"model.mapper: unknown mapper {cfg.mapper!r}; expected attention, mlp or qformer")

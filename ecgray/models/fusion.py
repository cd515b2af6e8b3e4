"""Fusion modules ("meta-mappers"): ECG encoder outputs -> n_prefix soft-prompt embeddings for the LLM.

Every mapper has the same call: `forward(pooled (B, D_enc), tokens (B, N, D_enc) | None) -> (B, n_prefix,
D_llm)`. These are the only trainable tensors of the whole model: the inner loop adapts exactly these.

- `AttentionMapper`: method.md section 2, exactly (the paper's design; uses only the pooled vector).
- `MLPMapper`: pooled vector -> 2-layer MLP -> n_prefix embeddings (a small baseline).
- `QFormerMapper`: n_prefix learnable queries cross-attend over the encoder tokens (and the pooled
  vector), then self-attend; a small Q-Former. Sees the whole token sequence, not just its mean.
- `GroundedMapper`: method.md section 8, ecgray's own: standardised pooled vector -> MLP -> every prefix
  position, each prefix vector scaled to the LLM's token-embedding norm. Its fixed tensors (the meta-train
  features' mean and std, the norm) are buffers: saved with the checkpoint, never adapted.

`prefix_spread` measures how much of the ECG a mapper lets through (the diagnostic ladder calls it).
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


GROUNDED_BUFFERS = ("feature_mean", "feature_std", "token_norm")
"""GroundedMapper's fixed tensors: kept in its state dict (and checkpoint), never among its parameters."""
POSITION_INIT_STD = 0.02
"""GroundedMapper's learned position vectors start at this std, ~10x below the ECG's part (std ~0.2-0.3 per
entry at init, for D_enc 32-768 and D_llm 48-4096), so at the start every prefix position carries the ECG,
not a shared vector."""


class GroundedMapper(nn.Module):
    """The ECG carried to every prefix position, at the LLM's token scale (method.md section 8):

        z = (pooled - feature_mean) / feature_std                       (B, D_enc), standardised
        x = Linear(GELU(Linear(z)))  + position                         (B, n_prefix, D_llm)
        prefix = x / |x| * token_norm                                   each vector's norm = token_norm

    feature_mean, feature_std (D_enc,): statistics of the meta-train side's pooled features
    (`ecgray.features.pooled_stats`), so a component shared by every ECG does not swamp their differences.
    token_norm: the median norm of the frozen LLM's input embeddings (`token_embedding_norm`). All three
    are buffers: loaded from the checkpoint, never adapted by the inner loop (which swaps parameters only).
    No gain after the normalisation, so the prefix norm stays the LLM's whatever the mapper learns."""

    def __init__(
        self,
        d_enc: int,
        d_llm: int,
        feature_mean: torch.Tensor,
        feature_std: torch.Tensor,
        token_norm: float | torch.Tensor,
        n_prefix: int = 4,
        hidden: int = 1024,
        dropout: float = 0.1,
    ):
        super().__init__()
        for name, t in (("feature_mean", feature_mean), ("feature_std", feature_std)):
            if tuple(t.shape) != (d_enc,):
                raise ValueError(f"GroundedMapper: {name} must be ({d_enc},) (D_enc), got {tuple(t.shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"GroundedMapper: {name} has non-finite entries")
        if not (feature_std > 0).all():
            raise ValueError(
                f"GroundedMapper: feature_std must be > 0 everywhere, min {float(feature_std.min())}"
            )
        token_norm = torch.as_tensor(token_norm, dtype=torch.float32).reshape(())
        if not (torch.isfinite(token_norm) and token_norm > 0):
            raise ValueError(f"GroundedMapper: token_norm must be a positive number, got {float(token_norm)}")
        self.d_enc, self.d_llm, self.n_prefix = d_enc, d_llm, n_prefix
        self.register_buffer("feature_mean", feature_mean.detach().float().clone())
        self.register_buffer("feature_std", feature_std.detach().float().clone())
        self.register_buffer("token_norm", token_norm.clone())
        self.fc1 = _xavier_linear(d_enc, hidden)
        self.fc2 = _xavier_linear(hidden, n_prefix * d_llm)
        self.position = nn.Parameter(torch.randn(n_prefix, d_llm) * POSITION_INIT_STD)
        self.dropout = nn.Dropout(dropout)

    def forward(self, pooled: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        _check_pooled(pooled, self.d_enc, "GroundedMapper")
        z = (pooled - self.feature_mean) / self.feature_std  # (B, D_enc), standardised
        x = self.fc2(self.dropout(F.gelu(self.fc1(z))))  # (B, n_prefix * D_llm)
        x = x.unflatten(-1, (self.n_prefix, self.d_llm)) + self.position  # (B, n_prefix, D_llm)
        return F.normalize(x, dim=-1) * self.token_norm  # every vector's norm = token_norm


def centre_on_support(
    mapper: nn.Module, support: torch.Tensor, query: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """meta.support_centring: an episode's pooled features (B, D_enc) or (B, 2, D_enc), support and query,
    shifted by (the mapper's feature_mean - the support set's mean over all its ECGs), so the mapper's
    standardisation centres them on the support set. Only for a mapper with feature statistics."""
    feature_mean = getattr(mapper, "feature_mean", None)
    if feature_mean is None:
        raise ValueError(
            f"meta.support_centring=true needs model.mapper=grounded (feature statistics); "
            f"{type(mapper).__name__} has none"
        )
    shift = feature_mean.to(support.dtype) - support.reshape(-1, support.shape[-1]).mean(0)
    return support + shift, query + shift


@torch.no_grad()
def token_embedding_norm(embed: nn.Module, chunk: int = 8192) -> float:
    """The median norm of the vectors an input-embedding module gives for every token id (its forward, so
    a scale inside it, e.g. Gemma's sqrt(D), counts): what a prefix vector should measure to look like a
    token to the frozen LLM. Read only; chunked, so an 8B vocabulary needs no (V, D) fp32 copy."""
    vocab = int(embed.weight.shape[0])
    device = embed.weight.device
    norms = [
        embed(torch.arange(i, min(i + chunk, vocab), device=device)).float().norm(dim=-1).cpu()
        for i in range(0, vocab, chunk)
    ]
    return float(torch.cat(norms).median())


def mapper_buffers(mapper: nn.Module) -> dict[str, torch.Tensor]:
    """A mapper's fixed tensors (none for the paper's): what a checkpoint keeps beside its parameters."""
    return dict(mapper.named_buffers())


def spread(x: torch.Tensor) -> dict[str, float]:
    """How much B vectors (B, ...) differ, each flattened: `ratio` = RMS distance from their mean / norm of
    their mean (population std across rows over the mean's norm; 0 when all rows are equal), `cosine` =
    mean cosine similarity over all pairs of different rows (1 when all point the same way)."""
    if x.shape[0] < 2:
        raise ValueError(f"spread: needs at least 2 rows to compare, got {tuple(x.shape)}")
    flat = x.detach().flatten(1).double()  # (B, F)
    mean = flat.mean(0)
    rms = (flat - mean).square().sum(1).mean().sqrt()
    unit = F.normalize(flat, dim=1)
    b = flat.shape[0]
    cosine = ((unit @ unit.T).sum() - torch.diagonal(unit @ unit.T).sum()) / (b * (b - 1))
    return {"ratio": float(rms / mean.norm()), "cosine": float(cosine)}


@torch.no_grad()
def prefix_spread(mapper: nn.Module, pooled: torch.Tensor, tokens: torch.Tensor | None = None) -> dict:
    """What a mapper lets through of B ECGs (eval mode, then its mode is restored): `ratio` and `cosine`
    of their prefixes (`spread`, each ECG's whole (n_prefix, D_llm) prefix as one vector) and `norm`, the
    mean norm of a prefix vector. The paper's mapper on the demo: ratio 0.0099, cosine 0.9999."""
    was_training = mapper.training
    mapper.eval()
    try:
        prefix = mapper(pooled, tokens)  # (B, n_prefix, D_llm)
    finally:
        mapper.train(was_training)
    return {**spread(prefix), "norm": float(prefix.float().norm(dim=-1).mean())}


def build_mapper(
    cfg: ModelConfig, d_enc: int, d_llm: int, stats: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    """The fusion module named by `cfg.mapper` (attention | mlp | qformer | grounded). stats: grounded only,
    its fixed tensors `GROUNDED_BUFFERS` (a checkpoint's mapper state holds them; a fresh one takes
    `ecgray.features.pooled_stats` + `token_embedding_norm`)."""
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
    if cfg.mapper == "grounded":
        missing = [k for k in GROUNDED_BUFFERS if stats is None or k not in stats]
        if missing:
            raise ValueError(
                f"model.mapper=grounded needs its fixed tensors {missing}, which were not given: a grounded "
                "mapper's checkpoint holds them (one without them, e.g. saved from parameters only, is refused); "
                "a fresh one takes the mean and std of the meta-train side's pooled features "
                "(ecgray.features.pooled_stats) and the LLM's token-embedding norm (token_embedding_norm)"
            )
        return GroundedMapper(
            d_enc,
            d_llm,
            stats["feature_mean"],
            stats["feature_std"],
            stats["token_norm"],
            cfg.n_prefix,
            cfg.mlp_hidden,
            cfg.grounded_dropout,
        )
    raise ValueError(
        f"model.mapper: unknown mapper {cfg.mapper!r}; expected attention, mlp, qformer or grounded"
    )

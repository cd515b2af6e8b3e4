"""Fusion modules: the paper's parameter count, its exact forward, eval-mode determinism, build_mapper."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tolerances import rounding_tolerance

from ecgray.config import ModelConfig
from ecgray.models.fusion import AttentionMapper, MLPMapper, QFormerMapper, build_mapper


def n_trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("d_llm, expected", [(4096, 26_250_240), (2048, 8_932_352)])
def test_attention_mapper_parameter_count_matches_the_paper(d_llm, expected):
    with torch.device("meta"):  # no memory for 26 M floats
        mapper = AttentionMapper(d_enc=768, d_llm=d_llm, n_prefix=4)
    assert n_trainable(mapper) == expected
    assert n_trainable(mapper) == 4 * 768 + 3 * (768 * d_llm + d_llm) + (d_llm * d_llm + d_llm) + 4 * d_llm


def reference_attention_mapper(m: AttentionMapper, pooled: torch.Tensor) -> torch.Tensor:
    """method.md section 2 written out head by head, eval mode (dropout = identity)."""
    x = torch.cat([m.prefix.expand(pooled.shape[0], -1, -1), pooled[:, None]], 1)
    q, k, v = m.q(x), m.k(x), m.v(x)
    d, hd = m.d_llm, m.d_llm // m.n_heads
    heads = []
    for i in range(m.n_heads):
        qh, kh, vh = (t[..., i * hd : (i + 1) * hd] for t in (q, k, v))
        heads.append(qh + torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), -1) @ vh)
    o = F.layer_norm(torch.cat(heads, -1), (d,), m.norm1.weight, m.norm1.bias)
    o = o + F.leaky_relu(o @ m.ff.weight.T + m.ff.bias, 0.01)
    o = F.layer_norm(o, (d,), m.norm2.weight, m.norm2.bias)
    return o[:, :4]


def test_attention_mapper_forward_is_the_spec():
    torch.manual_seed(0)
    m = AttentionMapper(d_enc=24, d_llm=32, n_prefix=4, n_heads=8).eval()
    # non-trivial LayerNorm affine so that a swapped norm would show
    with torch.no_grad():
        for p in (m.norm1.weight, m.norm1.bias, m.norm2.weight, m.norm2.bias):
            p.normal_()
    pooled = torch.randn(3, 24)
    out = m(pooled)
    assert out.shape == (3, 4, 32)
    # the same math with other kernels and sum orders: equal to the rounding of its longest reduction (D_llm)
    ref = reference_attention_mapper(m, pooled)
    torch.testing.assert_close(out, ref, **rounding_tolerance(ref, reduction=32))
    # initialisation: Xavier-uniform bound on Q/K/V, N(0,1) prefix
    bound = math.sqrt(6 / (24 + 32))
    assert m.q.weight.abs().max() <= bound and m.q.weight.abs().max() > 0.8 * bound
    assert 0.5 < m.prefix.std().item() < 1.5


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    m = AttentionMapper(d_enc=16, d_llm=32)
    pooled = torch.randn(2, 16)
    m.eval()
    torch.testing.assert_close(m(pooled), m(pooled))
    m.train()
    assert not torch.allclose(m(pooled), m(pooled))


def test_prefix_depends_on_the_ecg_per_sample():
    torch.manual_seed(0)
    m = AttentionMapper(d_enc=16, d_llm=32).eval()
    pooled = torch.randn(2, 16)
    out = m(pooled)
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(m(pooled[1:]), out[1:])  # rows are independent


@pytest.mark.parametrize(
    "kind, cls", [("attention", AttentionMapper), ("mlp", MLPMapper), ("qformer", QFormerMapper)]
)
def test_build_mapper_and_backward(kind, cls):
    torch.manual_seed(0)
    cfg = ModelConfig(mapper=kind, mlp_hidden=32, qformer_width=32, qformer_layers=1)
    m = build_mapper(cfg, d_enc=16, d_llm=24)
    assert isinstance(m, cls)
    pooled, tokens = torch.randn(3, 16), torch.randn(3, 7, 16)
    out = m(pooled, tokens)
    assert out.shape == (3, cfg.n_prefix, 24)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_qformer_reads_the_tokens():
    torch.manual_seed(0)
    m = QFormerMapper(16, 24, n_layers=1, d_model=32).eval()
    pooled, tokens = torch.randn(2, 16), torch.randn(2, 5, 16)
    assert not torch.allclose(m(pooled, tokens), m(pooled, tokens + 1.0))


def test_bad_shapes_are_named():
    m = AttentionMapper(16, 32)
    with pytest.raises(ValueError, match=r"pooled ECG vector must be \(B, 16\)"):
        m(torch.randn(2, 8))
    with pytest.raises(ValueError, match="not divisible"):
        AttentionMapper(16, 30, n_heads=8)
    with pytest.raises(ValueError, match="encoder tokens"):
        QFormerMapper(16, 24, d_model=32)(torch.randn(2, 16), torch.randn(2, 5, 8))

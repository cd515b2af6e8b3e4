"""Fusion modules: the paper's parameter count, its exact forward, eval-mode determinism, build_mapper; the
grounded mapper (buffers, checkpoint, spread, norm) and `prefix_spread`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tolerances import rounding_tolerance

from ecgray.config import ModelConfig
from ecgray.models.fusion import (
    GROUNDED_BUFFERS,
    AttentionMapper,
    GroundedMapper,
    MLPMapper,
    QFormerMapper,
    build_mapper,
    centre_on_support,
    mapper_buffers,
    prefix_spread,
    spread,
)


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


# ------------------------------------------------------------------------------------ the grounded mapper

D_ENC, D_LLM, N_PREFIX = 32, 48, 4


def realistic_features(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, D_ENC) pooled vectors of n ECGs drawn with `generator` from one fixed distribution shaped like a
    real encoder's: a large component shared by every ECG, a few strong directions of variation, small
    isotropic noise and unequal scales per dim (the demo's encoder: across-ECG spread / norm of mean ~1.3)."""
    world = torch.Generator().manual_seed(0)
    shared = 2.0 * torch.randn(D_ENC, generator=world)
    directions = torch.randn(6, D_ENC, generator=world)
    scale = torch.rand(D_ENC, generator=world) + 0.5
    x = torch.randn(n, 6, generator=generator) @ directions + 0.3 * torch.randn(n, D_ENC, generator=generator)
    return (shared + 1.2 * x) * scale


def grounded(seed: int = 0, dropout: float = 0.1, token_norm: float = 3.15) -> GroundedMapper:
    g = torch.Generator().manual_seed(1000 + seed)
    train = realistic_features(512, g)  # the meta-train side's ECGs
    stats = {
        "feature_mean": train.mean(0),
        "feature_std": train.std(0, correction=0),
        "token_norm": token_norm,
    }
    cfg = ModelConfig(mapper="grounded", n_prefix=N_PREFIX, mlp_hidden=64, grounded_dropout=dropout)
    torch.manual_seed(seed)
    return build_mapper(cfg, D_ENC, D_LLM, stats)


def test_grounded_mapper_shapes_and_fixed_tensors_are_buffers_not_parameters():
    m = grounded()
    assert isinstance(m, GroundedMapper)
    out = m(torch.randn(5, D_ENC))
    assert out.shape == (5, N_PREFIX, D_LLM)
    params, buffers = dict(m.named_parameters()), mapper_buffers(m)
    assert sorted(buffers) == sorted(GROUNDED_BUFFERS)
    assert not set(buffers) & set(params)
    assert set(GROUNDED_BUFFERS) <= set(m.state_dict())  # saved with the weights
    assert n_trainable(m) == D_ENC * 64 + 64 + 64 * N_PREFIX * D_LLM + N_PREFIX * D_LLM + N_PREFIX * D_LLM
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    with pytest.raises(ValueError, match=r"pooled ECG vector must be \(B, 32\)"):
        m(torch.randn(2, 8))


def test_the_inner_loop_adapts_parameters_never_buffers():
    from ecgray.meta.maml import adapt

    m = grounded(dropout=0.0)
    before = {k: v.clone() for k, v in mapper_buffers(m).items()}
    pooled, target = torch.randn(6, D_ENC), torch.randn(6, N_PREFIX, D_LLM)

    def loss_fn(fast, data):  # the model's call: functional_call over the mapper's parameters only
        return (torch.func.functional_call(m, fast, (data,)) - target).square().mean()

    params = dict(m.named_parameters())
    fast = adapt(loss_fn, params, pooled, inner_steps=3, inner_lr=0.5).fast_weights
    assert sorted(fast) == sorted(params)
    assert all(not torch.equal(fast[k], params[k]) for k in params)
    assert all(torch.equal(v, before[k]) for k, v in mapper_buffers(m).items())


def test_grounded_buffers_survive_the_checkpoint_and_one_without_them_is_refused(tmp_path):
    from ecgray.config import Config
    from ecgray.models.checkpoint import load_checkpoint, load_mapper_state, save_checkpoint

    m = grounded().eval()
    cfg = Config(model=ModelConfig(mapper="grounded", n_prefix=N_PREFIX, mlp_hidden=64))
    save_checkpoint(tmp_path / "ckpt", m.state_dict(), cfg)
    state, loaded = load_checkpoint(tmp_path / "ckpt")
    again = build_mapper(loaded.model, D_ENC, D_LLM, state)
    load_mapper_state(again, state)
    for k, v in mapper_buffers(m).items():
        assert torch.equal(mapper_buffers(again)[k], v)
    pooled = torch.randn(3, D_ENC)
    assert torch.equal(again.eval()(pooled), m(pooled))

    # saved from parameters only (what the inner loop and the optimizer hold): refused, naming what lacks
    save_checkpoint(tmp_path / "params", dict(m.named_parameters()), cfg)
    bare, _ = load_checkpoint(tmp_path / "params")
    with pytest.raises(ValueError, match=r"grounded needs its fixed tensors \['feature_mean', 'feature_std'"):
        build_mapper(loaded.model, D_ENC, D_LLM, bare)
    with pytest.raises(ValueError, match=r"has no \['feature_mean', 'feature_std', 'token_norm'\]"):
        load_mapper_state(m, bare)
    with pytest.raises(ValueError, match="fixed tensors"):
        build_mapper(loaded.model, D_ENC, D_LLM)  # a fresh one without statistics


def test_grounded_prefixes_differ_between_ecgs_at_the_token_norm():
    g = torch.Generator().manual_seed(7)
    pooled = realistic_features(256, g)  # ECGs the statistics were not computed on
    features = spread(pooled)
    assert 1.0 < features["ratio"] < 2.0  # the structure the test is about: a dominant shared component
    for seed in range(3):
        m = grounded(seed)
        result = prefix_spread(m, pooled)
        # the ECG reaches the prefix: spread of the order of the features' (the paper's mapper on the demo:
        # ratio 0.01, cosine 0.9999; this mapper without its standardisation: ratio ~0.9, cosine ~0.55)
        assert features["ratio"] < result["ratio"] < 10 * features["ratio"], result
        assert result["cosine"] < 0.4, result
        prefix = m.eval()(pooled)
        norms = prefix.norm(dim=-1)  # (B, n_prefix)
        expected = torch.full_like(norms, 3.15)
        torch.testing.assert_close(norms, expected, **rounding_tolerance(prefix, reduction=D_LLM))
        assert result["norm"] == pytest.approx(3.15, rel=1e-5)
    # the learned position vectors start small beside the ECG's part
    m = grounded()
    with torch.no_grad():
        ecg_part = m.fc2(torch.nn.functional.gelu(m.fc1((pooled - m.feature_mean) / m.feature_std)))
    assert (
        m.position.norm(dim=-1).mean() < 0.25 * ecg_part.unflatten(-1, (N_PREFIX, D_LLM)).norm(dim=-1).mean()
    )


def test_grounded_mapper_is_deterministic_in_eval_mode_only():
    m = grounded(dropout=0.5)
    pooled = torch.randn(4, D_ENC)
    m.eval()
    assert torch.equal(m(pooled), m(pooled))
    torch.testing.assert_close(m(pooled[2:]), m(pooled)[2:])  # rows are independent
    m.train()
    assert not torch.allclose(m(pooled), m(pooled))


@pytest.mark.filterwarnings("ignore:encoder.checkpoint is None")
def test_grounded_model_takes_fresh_statistics_or_the_checkpoints(tmp_path):
    """build_model: a fresh grounded mapper needs the meta-train statistics and gets the frozen LLM's
    token-embedding norm; from a checkpoint, its own tensors (never recomputed)."""
    from ecgray.config import load_config
    from ecgray.models.ecg_lm import build_model
    from ecgray.train.toy import toy_overrides

    cfg = load_config(None, [*toy_overrides(tmp_path), "model.mapper=grounded", "model.mlp_hidden=16"])
    with pytest.raises(ValueError, match=r"\['feature_mean', 'feature_std'\], which were not given"):
        build_model(cfg)
    stats = {"feature_mean": torch.randn(16), "feature_std": torch.rand(16) + 0.5}
    model = build_model(cfg, feature_stats=stats)
    embed = model.llm.get_input_embeddings().weight
    assert float(model.mapper.token_norm) == pytest.approx(float(embed.norm(dim=-1).median()), rel=1e-6)
    assert torch.equal(model.mapper.feature_mean, stats["feature_mean"])
    assert set(model.mapper_params()) == {k for k, _ in model.mapper.named_parameters()}
    assert not set(model.mapper_params()) & set(GROUNDED_BUFFERS)
    state = {k: v * 2 if k in GROUNDED_BUFFERS else v for k, v in model.mapper.state_dict().items()}
    loaded = build_model(cfg, mapper_state=state)  # the checkpoint's statistics, not recomputed
    assert all(torch.equal(mapper_buffers(loaded.mapper)[k], state[k]) for k in GROUNDED_BUFFERS)


def test_prefix_spread_on_a_hand_built_case():
    class Rows(torch.nn.Module):  # the "prefix" of ECG b is its pooled vector, one prefix vector
        def forward(self, pooled, tokens=None):
            return pooled[:, None, :]

    mapper = Rows().train()
    # two orthogonal unit rows: mean (0.5, 0.5), norm 1/sqrt(2); each row 1/sqrt(2) from it
    result = prefix_spread(mapper, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert result == pytest.approx({"ratio": 1.0, "cosine": 0.0, "norm": 1.0}, abs=1e-12)
    assert mapper.training  # its mode is restored
    # identical rows: no spread, cosine 1; rows (3, 4) and (-3, 4): mean (0, 4), each 3 from it, cosine 7/25
    assert prefix_spread(mapper, torch.tensor([[3.0, 4.0]] * 3)) == pytest.approx(
        {"ratio": 0.0, "cosine": 1.0, "norm": 5.0}
    )
    assert prefix_spread(mapper, torch.tensor([[3.0, 4.0], [-3.0, 4.0]])) == pytest.approx(
        {"ratio": 0.75, "cosine": 7 / 25, "norm": 5.0}
    )
    with pytest.raises(ValueError, match="at least 2 rows"):
        spread(torch.ones(1, 3))


def test_pooled_stats_streams_the_train_split(monkeypatch):
    """Mean and std over the batches equal those of all train-split ECGs of the source at once; a dead
    dimension's std is floored; too few ECGs are refused."""
    import numpy as np

    from ecgray import features
    from ecgray.data import shards

    g = torch.Generator().manual_seed(3)
    n = 50
    pooled = realistic_features(n, g)
    pooled[:, 0] = 4.0  # a dead dimension
    splits = np.array(["train", "valid", "test", "train", "train"] * 10)
    sources = np.array(["ptbxl"] * 45 + ["mimic"] * 5)
    ids = np.arange(100, 100 + n, dtype=np.int64)

    class Features:
        ecg_ids, d_enc = ids, D_ENC

        def features(self, batch):
            return None, pooled[np.asarray(batch) - 100]

    class ECGs:
        def __init__(self, keep):
            self.splits, self.sources = splits[keep], sources[keep]

        def rows(self, batch):
            return np.asarray(batch) - 100

    monkeypatch.setattr(features.FeatureStore, "open", classmethod(lambda cls, *a, **k: Features()))
    monkeypatch.setattr(shards.ECGStore, "open", classmethod(lambda cls, *a, **k: ECGs(slice(None))))
    stats = features.pooled_stats("features", "prepared", "ptbxl", batch_size=7)
    chosen = pooled[torch.from_numpy((splits == "train") & (sources == "ptbxl"))].double()
    std = chosen.std(0, correction=0)
    assert stats["feature_mean"].dtype == torch.float32
    torch.testing.assert_close(stats["feature_mean"].double(), chosen.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(stats["feature_std"][1:].double(), std[1:], rtol=0, atol=1e-6)
    assert float(stats["feature_std"][0]) == pytest.approx(0.01 * float(std.median()), rel=1e-6)
    with pytest.raises(ValueError, match="1 ECG\\(s\\) of split 'valid' from source 'mimic'"):
        features.pooled_stats("features", "prepared", "mimic", split="valid")


# ------------------------------------------------------------------------ meta.support_centring


def test_centring_on_the_support_set_standardises_around_its_mean():
    """centre_on_support: the mapper's standardisation of the shifted features subtracts the support set's
    mean (not the meta-train one), for support and query alike; one shift per episode, over every ECG."""
    m = grounded(dropout=0.0).eval()
    g = torch.Generator().manual_seed(7)
    support, query = realistic_features(20, g) + 5.0, realistic_features(8, g) + 5.0  # a shifted episode
    s, q = centre_on_support(m, support, query)
    tol = rounding_tolerance([support], reduction=support.shape[0])
    torch.testing.assert_close(s.mean(0), m.feature_mean, **tol)
    shift = m.feature_mean - support.mean(0)  # one shift for both sets
    torch.testing.assert_close(s, support + shift, rtol=0, atol=0)
    torch.testing.assert_close(q, query + shift, rtol=0, atol=0)
    # what the mapper standardises: the query relative to the support set's mean
    terms = [query, m.feature_mean, support.mean(0)]  # the tolerance: roundings of sums of these
    torch.testing.assert_close(q - m.feature_mean, query - support.mean(0), **rounding_tolerance(terms, 3))
    # two ECGs per item: the mean over both positions of every support item
    pairs = support.reshape(10, 2, D_ENC)
    s2, q2 = centre_on_support(m, pairs, query.reshape(4, 2, D_ENC))
    torch.testing.assert_close(s2.reshape(-1, D_ENC), s, rtol=0, atol=0)
    with pytest.raises(ValueError, match="meta.support_centring=true needs model.mapper=grounded"):
        centre_on_support(build_mapper(ModelConfig(), D_ENC, D_LLM), support, query)


def test_support_centring_is_refused_for_a_mapper_without_statistics(tmp_path):
    from ecgray.config import load_config
    from ecgray.models.ecg_lm import build_model
    from ecgray.train.toy import toy_overrides

    cfg = load_config(None, [*toy_overrides(tmp_path), "meta.support_centring=true"])
    with pytest.raises(ValueError, match="model.mapper=attention has no feature statistics"):
        build_model(cfg)

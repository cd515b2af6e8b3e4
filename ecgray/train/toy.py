"""A tiny prepared dataset (the `ecgray prepare` layout: qa/ + ecgs/ Parquet shards) of random ECGs and
single-verify questions, for the distributed-training tests and benchmarks (seconds to write, no WFDB).
Real runs use `ecgray synth` / `ecgray prepare` output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_toy_prepared(
    out_dir: str | Path,
    n_templates: int = 5,
    per_class: int = 12,
    fs: int = 100,
    window_s: float = 1.0,
    seed: int = 0,
    shard_rows: int = 1024,
) -> Path:
    """n_templates verify templates x {yes, no} classes of per_class samples (one question group each),
    one random ECG per sample at fs Hz for window_s seconds. Class split 80/20 -> 2 * n_templates classes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ecgray.data.shards import ecg_schema, qa_schema, signals_to_arrow

    out = Path(out_dir)
    (out / "qa").mkdir(parents=True, exist_ok=True)
    (out / "ecgs").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    qa, ecg_ids = [], []
    for t in range(n_templates):
        tid = 100 + t  # outside the excluded templates
        for answer in ("yes", "no"):
            for _ in range(per_class):
                sid = len(qa)
                ecg_ids.append(sid + 1)
                qa.append({
                    "sample_id": sid, "template_id": tid, "question_id": tid * 10 + (answer == "yes"),
                    "question_type": "single-verify", "attribute_type": "scp_code",
                    "question": f"Does this ECG show symptoms of code {t}?", "answer": [answer],
                    "ecg_id": [sid + 1], "attribute": [f"code {t}"], "source": "ptbxl", "variant": "template",
                    "split": "train",
                })  # fmt: skip
    pq.write_table(pa.Table.from_pylist(qa, schema=qa_schema()), out / "qa" / "part-00000.parquet")
    n = len(ecg_ids)
    t_samples = int(round(fs * window_s))
    for f, start in enumerate(range(0, n, shard_rows)):  # shards of shard_rows ECGs, as prepare writes them
        ids = ecg_ids[start : start + shard_rows]
        b = len(ids)
        signals = rng.standard_normal((b, 12, t_samples)).astype(np.float32)  # (B, 12, T)
        columns = {
            "ecg_id": pa.array(ids, pa.int64()),
            "source": pa.array(["ptbxl"] * b),
            "patient_id": pa.array(ids, pa.int64()),
            "fs": pa.array([fs] * b, pa.int32()),
            "signal": signals_to_arrow(signals),
            "lead_mask": pa.array([[True] * 12] * b, pa.list_(pa.bool_(), 12)),
            "split": pa.array(["train"] * b),
            "nan_count": pa.array([0] * b, pa.int32()),
            "metadata": pa.array([json.dumps({})] * b),
        }
        table = pa.table(columns, schema=ecg_schema(t_samples))
        pq.write_table(table, out / "ecgs" / f"part-{f:05d}.parquet", row_group_size=64)
    return out


def toy_overrides(prepared_dir: str | Path) -> list[str]:
    """Dotted overrides that fit a tiny model to `write_toy_prepared`'s data (2-way 2-shot, 3 inner steps)."""
    return [
        f"data.prepared_dir={prepared_dir}", "data.fs=100", "data.window_s=1.0",
        "encoder.fs=100", "encoder.window_s=1.0", "encoder.d_enc=16", "encoder.n_layers=1", "encoder.n_heads=2",
        "encoder.patch=25", "encoder.stem_channels=8", "encoder.random_init=true",
        "model.llm=tiny-llama", "model.dropout=0.0", "model.n_heads=2", "model.max_answer_tokens=4",
        "episodes.n_way=2", "episodes.k_shot=2", "episodes.n_query=2",
        "episodes.meta_val_fraction=0.25",  # 8 meta-train-side classes -> 6 meta-train, 2 meta-val
        "episodes.min_class_size={single-verify: 10, single-choose: 10, single-query: 10}",
        "meta.inner_steps=3", "meta.query_from_step=2", "meta.inner_lr=0.05", "meta.meta_lr=0.01",
        "meta.eval_episodes=2", "eval.options=support",
    ]  # fmt: skip

"""The demo pipeline end to end at a tiny size (tiny random LLaMA, tiny encoder, few episodes): every stage
runs for real, and the report, resolved config, checkpoint and figures are where users look for them."""

from __future__ import annotations

import json

import pytest

from ecgray.config import load_config

pytestmark = pytest.mark.slow

TINY = [
    "data.fs=100", "data.window_s=2.5", "data.record_fs=100",
    "encoder.d_enc=32", "encoder.n_layers=1", "encoder.n_heads=2", "encoder.stem_channels=8",
    "encoder.fs=100", "encoder.pretrain_steps=3", "encoder.pretrain_batch_size=16", "encoder.probe_labels=[]",
    "model.llm=tiny-llama", "model.n_heads=2", "model.dropout=0.0",
    "episodes.protocol=grounded", "episodes.n_way=2", "episodes.k_shot=2", "episodes.n_query=2",
    "meta.inner_steps=2", "meta.tasks_per_step=2", "meta.outer_steps=2", "meta.eval_every=2",
    "meta.eval_episodes=2", "meta.checkpoint_every=2",
    "train.num_workers=2", "train.name=demo_test",
    "eval.episodes=2", "eval.episodes_by_type={single-verify: 3}", "eval.supervised_steps=5",
    "synth.patients=500",
]  # fmt: skip


CIV = "comparison_irrelevant-verify"
COMPARISON = [  # meta-training mixes in a comparison type (two ECGs per sample); the demo evaluates it too
    "episodes.question_type=mixed", f"episodes.mixed_types=[single-verify, {CIV}]",
    f"eval.episodes_by_type={{single-verify: 3, {CIV}: 2}}",
]  # fmt: skip


def test_demo_pipeline_end_to_end(tmp_path, ray_session):
    from ecgray.demo import eval_types, run_demo

    cfg = load_config(None, [*TINY, *COMPARISON])
    assert eval_types(cfg) == ["single-verify", "single-choose", "single-query", CIV]
    assert CIV not in eval_types(load_config(None, TINY))  # comparison types only when named
    out = tmp_path / "demo"
    report = run_demo(cfg, out)

    assert report["completed"]
    for name in ("report.md", "report.json", "config.yaml", "versions.json", "checkpoint/mapper.safetensors",
                 "checkpoint/config.yaml", "encoder/encoder.safetensors", "figures/episode.png"):  # fmt: skip
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["results"] == report["results"]
    assert report["llm_precision"] == "float32 on cpu"  # the tiny config's model.dtype=auto on this CPU
    assert "(float32 on cpu)" in (out / "report.md").read_text()
    methods = {(r["protocol"], r["question_type"], r["method"]) for r in report["results"]}
    controls = (
        "text_lookup",
        "support_majority",
        "encoder_prototype",
        "blind_llm",
        "ecg_free",
        "finetune_scratch",
    )
    for qt in ("single-verify", "single-choose", "single-query", CIV):
        for protocol, suffix in (("grounded", qt), ("paper", f"paper_{qt}")):
            assert (out / "figures" / f"accuracy_vs_step_{suffix}.png").stat().st_size > 10_000
            assert (out / "figures" / f"per_class_{suffix}.png").is_file()
            assert {(protocol, qt, m) for m in ("meta_test", *controls)} <= methods
            verdict = report["learning_evidence"][protocol][qt]
            assert set(verdict["against"]) == {"text_lookup", "ecg_free", "blind_llm", "shuffled_ecg"}
    assert report["headline_protocol"] == "grounded"
    compared = {(c["protocol"], c["question_type"], c["baseline"]) for c in report["comparisons"]}
    assert ("grounded", "single-verify", "text_lookup") in compared and (
        "paper",
        "single-choose",
        "ecg_free",
    ) in compared
    for c in report["comparisons"]:
        assert set(c) == {"protocol", "question_type", "method", "baseline", "mean_difference", "ci_low",
                          "ci_high", "p_value", "episodes"}  # fmt: skip
        assert c["ci_low"] <= c["mean_difference"] <= c["ci_high"] and 0.0 <= c["p_value"] <= 1.0
    for row in report["results"]:
        assert row["episodes"] == (3 if row["question_type"] == "single-verify" else 2)
        assert 0.0 <= row["ci_low"] <= row["exact_match_last"] <= row["ci_high"] <= 1.0
        if row["protocol"] == "grounded" and row["method"] == "text_lookup":
            assert row["exact_match_last"] <= 0.6  # the text cannot decide a grounded episode
    report_md = (out / "report.md").read_text()
    assert (
        "## grounded protocol (headline)" in report_md and "## paper protocol (for comparison)" in report_md
    )
    served = report["served"]
    assert len(served["answers"]) == 2 * 2  # n_way x n_query answered over HTTP
    assert all(a["predicted"]["answer"] in ("yes", "no") for a in served["answers"])
    assert "| single-verify | meta_test | 3 |" in report_md
    for method in ("meta_test", *controls):  # the comparison row, with every control
        assert f"| {CIV} | {method} | 2 |" in report_md

    # a second run reuses every cached stage and gives the same results
    again = run_demo(cfg, out)
    assert again["results"] == report["results"]
    assert (
        again["seconds_per_stage"]["meta-train"] == "cached"
        and again["seconds_per_stage"]["synth"] == "cached"
    )


def test_cached_stages_are_reused_only_for_the_config_that_made_them(tmp_path):
    from ecgray.demo import check_run_config

    cfg = load_config(None, TINY)
    out = tmp_path / "demo"
    out.mkdir()
    check_run_config(cfg, out)  # first run: records the config
    (out / "report.json").write_text("{}")
    check_run_config(load_config(None, TINY), out)  # the same config again: reuse
    changed = load_config(None, [*TINY, "meta.inner_lr=0.01", "eval.episodes_by_type={single-choose: 4}"])
    with pytest.raises(
        ValueError,
        match=r"different config \(eval.episodes_by_type.single-choose, eval.episodes_by_type.single-verify, meta.inner_lr differ",
    ):
        check_run_config(changed, out)
    assert (out / "report.json").read_text() == "{}"  # nothing written is touched
    (out / "demo_config.yaml").unlink()
    with pytest.raises(ValueError, match="holds files but no demo_config.yaml"):
        check_run_config(cfg, out)


def test_the_llm_is_fetched_in_a_background_process_and_its_error_reaches_the_wait(tmp_path):
    from ecgray import demo

    local = tmp_path / "llm"
    local.mkdir()
    (local / "config.json").write_text("{}")
    demo.prefetch_llm(str(local))()  # a local HF directory: resolved, nothing raised
    demo.prefetch_llm("tiny-llama")()  # built in-process: no process at all
    missing = demo.prefetch_llm(str(tmp_path / "absent.gguf"))
    with pytest.raises(RuntimeError, match=r"fetching the LLM .*absent.gguf.*FileNotFoundError: GGUF file"):
        missing()

"""Meta-test evaluation: metric numbers by hand, determinism, untouched meta weights, the baselines, lead
masking, and `ecgray eval` end to end on a tiny prepared dir + checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tolerances import rounding_tolerance

from ecgray.config import (
    LEAD_NAMES,
    Config,
    DataConfig,
    EncoderConfig,
    EpisodeConfig,
    EvalConfig,
    MetaConfig,
    ModelConfig,
)
from ecgray.data.episodes import EpisodeSampler
from ecgray.data.shards import ECGStore
from ecgray.eval import baselines as B
from ecgray.eval import metrics
from ecgray.eval.meta_test import (
    canonical_answer,
    encode_ecgs,
    load_template_answers,
    mask_leads,
    meta_test,
    options_mode,
    prompt_key,
    query_options,
)
from ecgray.models.ecg_lm import build_model

T = 100  # samples per ECG: 4 encoder tokens of 25
ATTRS = ["baseline drift", "static noise", "burst noise", "electrodes problems"]
QUESTION = "Does this ECG show symptoms of {}?"


def qa_rows() -> list[dict]:
    """Template 27 (single-verify): 4 attributes x yes/no = 8 classes, one question group of 6 each."""
    rows, sid = [], 0
    for qid, attr in enumerate(ATTRS):
        for answer in ("yes", "no"):
            for _ in range(6):
                rows.append(
                    {"sample_id": sid, "template_id": 27, "question_id": qid, "question_type": "single-verify",
                     "attribute_type": "noise", "question": QUESTION.format(attr), "answer": [answer],
                     "ecg_id": [sid + 1], "attribute": [attr], "source": "ptbxl", "variant": "template",
                     "split": "train"}
                )  # fmt: skip
                sid += 1
    return rows


def tiny_cfg(**eval_kw) -> Config:
    return Config(
        data=DataConfig(fs=40, window_s=2.5),
        episodes=EpisodeConfig(
            n_way=2,
            k_shot=2,
            n_query=2,
            min_group_size=4,
            meta_train_fraction=0.5,
            min_class_size={"single-verify": 4, "single-choose": 4, "single-query": 4},
        ),  # fmt: skip
        encoder=EncoderConfig(
            d_enc=16, n_layers=1, n_heads=2, patch=25, stem_channels=8, fs=40, random_init=True
        ),
        model=ModelConfig(llm="tiny-llama", dropout=0.5),
        meta=MetaConfig(inner_steps=2, inner_lr=0.5),
        eval=EvalConfig(episodes=2, supervised_steps=3, supervised_batch_size=4, **eval_kw),
    )


def tiny_store(n: int, seed: int = 0) -> ECGStore:
    rng = np.random.default_rng(seed)
    signals = rng.normal(size=(n, 12, T)).astype(np.float32)
    mask = np.ones((n, 12), dtype=bool)
    mask[0, 7] = False  # ECG 1 lacks V2
    return ECGStore(np.arange(1, n + 1), signals, mask, np.arange(n), ["ptbxl"] * n, ["train"] * n, fs=40)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the tiny models are ~100x slower with intra-op threads fighting over shared cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world():
    cfg = tiny_cfg()
    rows = qa_rows()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-init encoder warns
        model = build_model(cfg)
    episodes = EpisodeSampler(rows, cfg.episodes, "meta-test", seed=0).episodes(2)
    return cfg, rows, model, tiny_store(len(rows)), episodes


# --------------------------------------------------------------------------------------------- metrics


BIGEMINAL = "bigeminal pattern (unknown origin, supraventricular, or ventricular)"  # an answer with commas


def test_exact_match_compares_sets():
    assert metrics.exact_match("v1, lead i", ["lead i", "v1"])
    assert metrics.exact_match(["Yes "], "yes")
    assert not metrics.exact_match("v1", ["lead i", "v1"])
    assert not metrics.exact_match("v1, lead i, v2", ["lead i", "v1"])
    assert metrics.exact_match(["v1", "lead i"], ["lead i", "v1"])  # answer lists: sets, by identity
    assert not metrics.exact_match(["v1, lead i"], ["lead i", "v1"])  # one answer is not two


def test_exact_match_keeps_answers_with_commas_whole():
    # an answer list (constrained decoding's option) is never split
    assert metrics.exact_match([BIGEMINAL], [BIGEMINAL])
    assert metrics.exact_match([BIGEMINAL.upper() + " "], [BIGEMINAL])
    assert not metrics.exact_match(["supraventricular"], [BIGEMINAL])
    assert metrics.answer_set([BIGEMINAL, "sinus rhythm"]) == {BIGEMINAL, "sinus rhythm"}
    # free text equal to the answer matches; so does a multi-answer set in either order
    assert metrics.exact_match(BIGEMINAL, [BIGEMINAL])
    assert metrics.exact_match(f"{BIGEMINAL}, sinus rhythm", ["sinus rhythm", BIGEMINAL])
    assert metrics.exact_match(f"sinus rhythm, {BIGEMINAL}", ["sinus rhythm", BIGEMINAL])
    assert metrics.exact_match(f"sinus rhythm, {BIGEMINAL}, sinus rhythm", ["sinus rhythm", BIGEMINAL])
    # part of the answer, or the answer cut up differently, does not
    assert not metrics.exact_match("bigeminal pattern (unknown origin", [BIGEMINAL])
    assert not metrics.exact_match(BIGEMINAL, [BIGEMINAL, "sinus rhythm"])
    assert not metrics.exact_match(
        "supraventricular, bigeminal pattern (unknown origin, or ventricular)", [BIGEMINAL]
    )
    assert not metrics.reads_as("", [BIGEMINAL]) and metrics.reads_as("", [])


def test_token_accuracy_by_hand():
    golds = [[5], [7, 8, 9]]
    preds = [[6], [7, 3]]  # 0/1 right; 1/3 right (the missing third token counts wrong)
    assert metrics.token_accuracy(preds, golds) == pytest.approx(1 / 4)
    # BOS (id 1) prepended to both: (0 + 1) + (1 + 1) right of 2 + 4 positions
    assert metrics.token_accuracy(preds, golds, bos=1) == pytest.approx(3 / 6)
    # yes/no floor with BOS: all wrong answers still give 50 %
    assert metrics.token_accuracy([[4], [4]], [[5], [6]], bos=1) == pytest.approx(0.5)
    assert metrics.token_matches([7, 8, 9, 10], [7, 8]) == (2, 2)  # extra tokens are ignored
    with pytest.raises(ValueError, match="2 predictions but 1 gold"):
        metrics.token_accuracy(preds, golds[:1])


def test_confidence_intervals_by_hand():
    values = [0.5, 1.0, 0.0, 0.5]
    std = math.sqrt(0.5 / 3)  # ddof=1
    t = metrics.mean_ci(values, method="t")
    assert t["mean"] == pytest.approx(0.5) and t["std"] == pytest.approx(std)
    assert t["half_width"] == pytest.approx(3.182446305284263 * std / 2)  # t_{0.975, 3}
    n = metrics.mean_ci(values, method="normal")
    assert n["half_width"] == pytest.approx(1.959963984540054 * std / 2)
    assert (n["lo"], n["hi"]) == pytest.approx((0.5 - n["half_width"], 0.5 + n["half_width"]))
    assert math.isnan(metrics.mean_ci([0.7])["half_width"])
    # the default is the bootstrap percentile interval, inside the values' range
    b = metrics.mean_ci(values)
    assert b["mean"] == pytest.approx(0.5) and 0.0 <= b["lo"] < 0.5 < b["hi"] <= 1.0
    assert b["half_width"] == pytest.approx((b["hi"] - b["lo"]) / 2)
    with pytest.raises(ValueError, match="method"):
        metrics.mean_ci(values, method="jackknife")


def test_summarize_per_type_step_and_class():
    rec = metrics.episode_record
    records = [
        rec(0, "single-verify", ["a", "b"], [0, 1], [[True, False], [True, True]], [0.75, 1.0], [0.5, 1.0], ["a", "b"]),
        rec(1, "single-verify", ["a", "c"], [0, 1], [[False, False], [False, True]], [0.5, 0.75], [0.0, 0.5], ["a", "c"]),
        rec(2, "single-choose", ["d", "e"], [0, 1], [[True, True], [True, False]], [1.0, 0.5], [1.0, 0.0], ["d", "e"]),
    ]  # fmt: skip
    s = metrics.summarize(records)
    assert set(s) == {"single-verify", "single-choose", "all"}
    v = s["single-verify"]
    assert v["episodes"] == 2 and v["steps"] == [0, 1]
    assert [c["mean"] for c in v["exact_match"]] == pytest.approx([0.25, 0.75])
    assert [c["mean"] for c in v["token_acc"]] == pytest.approx([0.25, 0.75])
    assert [c["mean"] for c in s["all"]["exact_match"]] == pytest.approx(
        [(0.5 + 0 + 1) / 3, (1 + 0.5 + 0.5) / 3]
    )
    # per class at the last step: a right once of twice, b right, c right
    assert v["per_class"] == {
        "a": {"correct": 1, "total": 2, "accuracy": 0.5},
        "b": {"correct": 1, "total": 1, "accuracy": 1.0},
        "c": {"correct": 1, "total": 1, "accuracy": 1.0},
    }


# ------------------------------------------------------------------------------------------- options


def test_query_options_template_and_support():
    episode = {
        "support": [{"template_id": 3, "answer": ["both"]}, {"template_id": 3, "answer": ["v1", "lead i"]}],
        "query": [{"sample_id": 9, "template_id": 3, "answer": ["v2"], "question_type": "single-query"}],
    }
    table = {3: ["none", "V2"]}
    # options are answer lists (identities), sorted by their text
    assert query_options(episode, table, "template") == [[["none"], ["v2"]]]
    assert query_options(episode, table, "support") == [[["both"], ["lead i", "v1"]]]
    assert query_options(episode, table, "template+support") == [
        [["both"], ["lead i", "v1"], ["none"], ["v2"]]
    ]
    assert query_options(episode, table) == query_options(episode, table, "template+support")  # not choose
    with pytest.raises(ValueError, match="template 3 has no admissible answers"):
        query_options(episode, {}, "template")
    assert load_template_answers(Config())[27] == ["no", "yes"]


def test_choose_options_are_the_candidates_the_question_names():
    table = {40: ["AFIB", "SR", "STACH", "both", "none"]}
    query = {"sample_id": 1, "template_id": 40, "question_type": "single-choose", "answer": ["sr"],
             "attribute": ["afib", "sr"], "question": "which of afib or sr does this ecg show?"}  # fmt: skip
    episode = {"support": [{"template_id": 40, "answer": ["stach"]}], "query": [query]}
    # the support answer "stach" names another question's candidate: not a choice of this one
    assert query_options(episode, table) == [[["afib"], ["both"], ["none"], ["sr"]]]
    assert ["stach"] in query_options(episode, table, "template+support")[0]
    # `both` / `none` are offered even where the template does not list them (no ECG-QA template lists
    # `both`, but the class rules make it of every two-answer sample); no template table is needed
    assert query_options(episode, {40: ["AFIB", "SR"]}) == [[["afib"], ["both"], ["none"], ["sr"]]]
    assert query_options(episode, None) == [[["afib"], ["both"], ["none"], ["sr"]]]
    # an admissible answer with commas stays one option
    big = {**query, "attribute": [BIGEMINAL, "sinus rhythm"]}
    assert query_options({"support": [], "query": [big]}, None) == [
        [[BIGEMINAL], ["both"], ["none"], ["sinus rhythm"]]
    ]
    assert [BIGEMINAL] in query_options(
        {"support": [], "query": [{**query, "template_id": 7}]}, load_template_answers(Config()), "template"
    )[0]
    with pytest.raises(ValueError, match="without its attribute list"):
        query_options({"support": [], "query": [{**query, "attribute": None}]}, table)


def _option_episode(sample: dict, question_type: str) -> dict:
    """A one-query episode (no support) of an ECG-QA sample, its answer by the class rules."""
    from ecgray.data.episodes import class_answer

    query = {"sample_id": sample["sample_id"], "template_id": sample["template_id"], "question_type": question_type,
             "answer": class_answer(sample, question_type), "attribute": sample["attribute"]}  # fmt: skip
    return {"support": [], "query": [query]}


@pytest.fixture(scope="module")
def synth_rows(tmp_path_factory) -> list[dict]:
    """Every sample of a small synthetic world (24 patients: ~1 s), with its ECG-QA split."""
    from ecgray.synth.world import generate_world

    out = tmp_path_factory.mktemp("synth")
    generate_world(out, 24, seed=3, progress=False)
    return [
        {**s, "split": split}
        for split in ("train", "valid", "test")
        for f in sorted((out / "ecgqa/ptbxl/template" / split).glob("*.json"))
        for s in json.loads(f.read_text())
    ]


def test_option_sets_hold_every_answer_the_class_rules_make(synth_rows):
    from ecgray.data.episodes import class_keys

    table = load_template_answers(Config())  # the synthetic world's (= ECG-QA PTB-XL's) table
    cfg = EpisodeConfig(n_way=5, k_shot=1, n_query=1, min_group_size=2, meta_train_fraction=0.5,
                        min_class_size={"single-verify": 2, "single-choose": 2, "single-query": 2})  # fmt: skip
    golds: dict[str, set] = {}
    for qt in ("single-verify", "single-choose", "single-query"):
        qcfg = dataclasses.replace(cfg, question_type=qt)
        for side in ("meta-train", "meta-test"):
            for episode in EpisodeSampler(synth_rows, qcfg, side, seed=1).episodes(60):
                for item, options in zip(episode["query"], query_options(episode, table), strict=True):
                    assert canonical_answer(item["answer"]) in options, (item["class"], options)
                    golds.setdefault(qt, set()).add(", ".join(item["answer"]))
    assert {"both", "none"} <= golds["single-choose"]  # the answers the template lists never hold
    # every single-choose sample the class rules keep, by itself: 2-answer ones (-> both) included
    kept = [s for s in synth_rows if s["question_type"] == "single-choose" and class_keys(s, "single-choose")]
    assert sum(len(s["answer"]) == 2 for s in kept) >= 5
    for sample in kept:
        episode = _option_episode(sample, "single-choose")
        assert canonical_answer(episode["query"][0]["answer"]) in query_options(episode, table)[0]


def test_option_sets_hold_every_answer_of_the_real_shards(shared_data):
    # the real samples under shared/data (single-verify noise templates only for now: no single-choose
    # shard is there; any that is added is checked the same way), with each source's own table
    from ecgray.data.ecgqa import SOURCES, read_template_answers, version_dir
    from ecgray.data.episodes import class_keys

    checked: dict[str, int] = {}
    for source in SOURCES:
        table = read_template_answers(shared_data / "ecgqa", source)
        for path in sorted(version_dir(shared_data / "ecgqa", source).glob("*/*/*.json")):
            for sample in json.loads(path.read_text()):
                qt = sample["question_type"]
                if qt not in ("single-verify", "single-choose", "single-query") or not class_keys(sample, qt):
                    continue
                episode = _option_episode(sample, qt)
                gold = canonical_answer(episode["query"][0]["answer"])
                assert gold in query_options(episode, table)[0], (path, sample)
                checked[qt] = checked.get(qt, 0) + 1
    assert checked["single-verify"] == 2 * 1038  # template 27 in both wordings (method.md's worked example)


# ----------------------------------------------------------------------------------------- meta-test


def test_meta_test_is_deterministic_and_leaves_the_meta_weights_alone(world):
    cfg, _, model, store, episodes = world
    model.train()  # meta_test must switch dropout off itself, and restore the mode afterwards
    meta_params = model.mapper_params()
    before = {k: v.detach().clone() for k, v in meta_params.items()}
    first = meta_test(model, meta_params, episodes, store, cfg)
    second = meta_test(model, meta_params, episodes, store, cfg)
    assert first == second
    cache: dict = {}
    assert (
        meta_test(model, meta_params, episodes, store, cfg, feature_cache=cache)["episodes"]
        == first["episodes"]
    )
    n_ecgs = len({i["ecg_id"] for ep in episodes for i in ep["support"] + ep["query"]})
    assert len(cache) == n_ecgs and all(key[0] is None for key in cache)
    assert model.mapper.training
    for k, v in model.mapper_params().items():
        assert torch.equal(v, before[k]) and v.grad is None
    s = first["summary"]["single-verify"]
    assert first["steps"] == [0, 1, 2] and s["episodes"] == 2 and len(s["exact_match"]) == 3
    assert all(0 <= c["mean"] <= 1 for m in metrics.METRICS for c in s[m])
    # yes/no: one answer token + BOS -> the BOS-included accuracy is (1 + acc) / 2 per episode
    for rec in first["episodes"]:
        assert rec["token_acc_bos"] == pytest.approx([(1 + a) / 2 for a in rec["token_acc"]])
        assert all(p in (["no"], ["yes"]) for p in rec["predictions"])  # constrained: answer lists
    model.eval()


def test_episodes_adapted_in_lockstep_equal_one_at_a_time(world):
    # eval.episodes_per_pass batches several episodes' inner loops and decoding; each keeps its own fast
    # weights, so every per-episode record (answers, metrics per step) is the one-at-a-time result
    import dataclasses

    from ecgray.eval import meta_test as mt

    cfg, rows, model, store, _ = world
    episodes = EpisodeSampler(rows, cfg.episodes, "meta-test", seed=3).episodes(3)
    params = model.mapper_params()
    runs, prefixes = {}, {}
    decode = mt.decode
    for n in (1, 2, 3):
        seen = prefixes[n] = []  # every query prefix decoded, in episode order per step
        mt.decode = lambda m, prefix, q, o, seen=seen: seen.append(prefix.clone()) or decode(m, prefix, q, o)
        ecfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, episodes_per_pass=n))
        try:
            runs[n] = meta_test(model, params, episodes, store, ecfg)["episodes"]
        finally:
            mt.decode = decode
        runs[f"scratch {n}"] = B.finetune_scratch(model, episodes, store, ecfg)["episodes"]
    # the prefixes (made by each episode's own fast weights) after every inner step, grouped per step
    steps, nq = cfg.meta.inner_steps + 1, len(episodes[0]["query"])
    one = torch.cat(prefixes[1]).reshape(3, steps, -1).transpose(0, 1)  # one episode at a time
    for n in (2, 3):
        flat = torch.cat([torch.cat([p.reshape(p.shape[0], -1) for p in prefixes[n]])])
        groups = [list(range(i, min(i + n, 3))) for i in range(0, 3, n)]
        start, got = 0, torch.empty_like(one)
        for g in groups:  # a group's step-s pass holds its episodes' query prefixes in order
            for s in range(steps):
                block = flat[start : start + len(g) * nq].reshape(len(g), -1)
                for j, e in enumerate(g):
                    got[s, e] = block[j]
                start += len(g) * nq
        # the same mapper math batched otherwise: no sum on the way is longer than a prefix's size
        torch.testing.assert_close(got, one, **rounding_tolerance(one, one.shape[-1]))
    for n in (2, 3):
        for one, batched in ((runs[1], runs[n]), (runs["scratch 1"], runs[f"scratch {n}"])):
            for a, b in zip(one, batched, strict=True):
                assert a["predictions"] == b["predictions"] and a["exact_match"] == b["exact_match"]
                assert a["token_acc"] == pytest.approx(b["token_acc"], abs=1e-9)
    bad = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, episodes_per_pass=0))
    with pytest.raises(ValueError, match="eval.episodes_per_pass"):
        meta_test(model, params, episodes, store, bad)


def one_at_a_time(model, method, episode: dict, cfg: Config, template_answers) -> list:
    """The definition, for one method on one episode (what ecgray ran before the lockstep path): adapt on
    every support row, answer every query row after every inner step. -> StepScore per step 0..inner_steps."""
    from ecgray.eval.meta_test import answer_query
    from ecgray.meta import adapt

    (sp, st), (qp, qt) = method.features(episode)
    options = query_options(episode, template_answers, options_mode(cfg))
    questions, golds = [i["question"] for i in episode["query"]], [i["answer"] for i in episode["query"]]
    support = episode["support"]
    task = model.task_data(sp, st, [i["question"] for i in support], [i["answer"] for i in support])
    scores = []

    def answer(step, fast):
        with torch.no_grad():
            scores.append(answer_query(model, model.fuse(qp, qt, fast), questions, golds, options))

    model.eval()
    answer(0, method.start(0))
    adapt(model.loss_fn(), method.start(0), model.task_set([task]), cfg.meta.inner_steps, cfg.meta.inner_lr,
          on_step=answer)  # fmt: skip
    return scores


@pytest.mark.parametrize("stride", [1, 2])
def test_adapting_methods_in_lockstep_equal_each_alone_by_the_definition(world, stride):
    """run_adapting runs the model, ecg_free (one row per distinct prompt) and finetune_scratch on several
    episodes as one task batch and answers only at the reported steps (eval.curve_stride): every record is
    the definition's, one method on one episode with every row, at those steps."""
    from ecgray.eval.meta_test import meta_learned, reported_steps, run_adapting

    cfg, rows, model, store, _ = world
    episodes = EpisodeSampler(rows, cfg.episodes, "meta-test", seed=3).episodes(3)
    cfg = dataclasses.replace(
        cfg, eval=dataclasses.replace(cfg.eval, episodes_per_pass=2, curve_stride=stride)
    )
    params = model.mapper_params()
    methods = [
        meta_learned(model, params, store),
        B.ecg_free_method(model, params, store),
        B.finetune_scratch_method(model, store, cfg),
        B.shuffled_ecg_method(model, params, store, cfg),  # the model's inner loop, run once for both
    ]
    assert methods[-1].adapts_like == "meta_test"
    answers = load_template_answers(cfg)
    results = run_adapting(model, methods, episodes, cfg, template_answers=answers)
    steps = reported_steps(cfg.meta.inner_steps, stride)
    assert steps == ([0, 1, 2] if stride == 1 else [0, 2])
    assert list(results) == ["meta_test", "ecg_free", "finetune_scratch", "shuffled_ecg"]
    for mine, theirs in zip(
        results["shuffled_ecg"]["episodes"], results["meta_test"]["episodes"], strict=True
    ):
        assert mine["support_loss"] == theirs["support_loss"]  # one inner loop
    for method in methods:
        result = results[method.name]
        assert result["steps"] == steps and result["method"] == method.name
        for episode, record in zip(episodes, result["episodes"], strict=True):
            expected = one_at_a_time(model, method, episode, cfg, answers)
            picked = [expected[s] for s in steps]
            assert record["exact_match"] == [float(np.mean(s.correct)) for s in picked], method.name
            assert record["predictions"] == picked[-1].predictions
            assert record["token_acc"] == pytest.approx([s.token_acc for s in picked], abs=1e-9)
    # a method that claims another's inner loop but starts elsewhere is refused, not answered wrongly
    moved = {k: v + 0.01 for k, v in params.items()}
    other = dataclasses.replace(
        methods[0], name="elsewhere", start=lambda index: moved, adapts_like="meta_test"
    )
    with pytest.raises(ValueError, match=r"elsewhere adapts like meta_test, but on episode 0"):
        run_adapting(model, [methods[0], other], episodes[:1], cfg, template_answers=answers)
    # the module's meta weights are untouched, and a stride below 1 is named
    with pytest.raises(ValueError, match="eval.curve_stride"):
        reported_steps(2, 0)


def test_step_zero_is_the_unadapted_model_and_adaptation_moves_it(world):
    cfg, _, model, store, episodes = world
    import dataclasses

    params = model.mapper_params()
    no_adapt = meta_test(
        model, params, episodes, store, dataclasses.replace(cfg, meta=MetaConfig(inner_steps=0))
    )
    adapted = meta_test(model, params, episodes, store, cfg)
    assert no_adapt["steps"] == [0]
    for a, b in zip(no_adapt["episodes"], adapted["episodes"], strict=True):
        assert a["exact_match"][0] == b["exact_match"][0] and a["token_acc"][0] == b["token_acc"][0]
    # the query answers' scores change after adaptation (the fast weights are used)
    from ecgray.eval.meta_test import ecg_features

    (sp, st), (qp, qt) = ecg_features(model, store)(episodes[0])
    questions = [i["question"] for i in episodes[0]["query"]]
    with torch.no_grad():
        s0 = model.score_options(model.fuse(qp, qt, params), questions, [["yes", "no"]] * len(questions))
    from ecgray.meta import adapt

    support = episodes[0]["support"]
    task = model.task_data(sp, st, [i["question"] for i in support], [i["answer"] for i in support])
    model.eval()
    fast = adapt(model.loss_fn(), params, model.task_set([task]), 2, cfg.meta.inner_lr).fast_weights
    with torch.no_grad():
        s2 = model.score_options(model.fuse(qp, qt, fast), questions, [["yes", "no"]] * len(questions))
    assert not torch.allclose(torch.stack(s0), torch.stack(s2))


def test_paper_compat_scores_the_official_prediction(world):
    cfg, _, model, store, episodes = world
    import dataclasses

    view = B._view(model, paper_compat=True)
    res = meta_test(view, model.mapper_params(), episodes[:1], store, cfg)
    rec = res["episodes"][0]
    # target = [BOS, answer token]: BOS-included accuracy = mean of the two positions' hits
    from ecgray.eval.meta_test import ecg_features

    _, (qp, qt) = ecg_features(model, store)(episodes[0])
    q = episodes[0]["query"]
    with torch.no_grad():
        prefix = view.fuse(qp, qt, model.mapper_params())
        batch = view.collate(view.prompt_rows([i["question"] for i in q], [i["answer"] for i in q]))
        pred = view.target_predictions(prefix, batch)
    hits = (pred == batch.target_ids) & batch.target_mask
    assert rec["token_acc_bos"][0] == pytest.approx(float(hits.sum() / batch.target_mask.sum()))
    assert rec["token_acc"][0] == pytest.approx(float(hits[:, 1:].sum() / batch.target_mask[:, 1:].sum()))
    with pytest.raises(ValueError, match="paper_compat"):
        B.blind_llm(view, episodes, store, dataclasses.replace(cfg))


# ----------------------------------------------------------------------------------------- baselines


def test_baselines_return_the_meta_test_structure(world):
    cfg, rows, model, store, episodes = world
    params = model.mapper_params()
    before = {k: v.detach().clone() for k, v in params.items()}
    ref = meta_test(model, params, episodes, store, cfg)
    items = B.meta_train_items(rows, cfg)
    sup_params, losses = B.train_supervised(model, items, store, cfg)
    results = {
        "blind_llm": B.blind_llm(model, episodes, store, cfg),
        "ecg_free": B.ecg_free(model, params, episodes, store, cfg),
        "supervised": B.supervised(model, sup_params, episodes, store, cfg),
        "finetune_scratch": B.finetune_scratch(model, episodes, store, cfg),
        "in_context": B.in_context(model, params, episodes, store, cfg),
    }
    for name, res in results.items():
        assert set(res) == set(ref), name
        assert res["method"] == name
        assert res["steps"] == ([0] if name in ("blind_llm", "in_context") else [0, 1, 2]), name
        assert set(res["summary"]) == {"single-verify"}
        assert len(res["episodes"]) == len(episodes)
    for k, v in model.mapper_params().items():
        assert torch.equal(v, before[k])
    # supervised: meta-train classes only (the meta-test ones never), and the loss went somewhere
    test_classes = {c for ep in episodes for c in ep["classes"]}
    assert items and not test_classes & {i["class"] for i in items}
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert any(
        not torch.equal(sup_params[k], B.fresh_mapper_params(model, cfg.eval.seed)[k]) for k in sup_params
    )


def test_blind_llm_answers_from_the_question_alone(world):
    cfg, _, model, store, episodes = world
    res = B.blind_llm(model, episodes[:1], store, cfg)
    tok, llm = model.tokenizer, model.llm
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    for item, pred in zip(episodes[0]["query"], res["episodes"][0]["predictions"], strict=True):
        scores = {}
        for option in ("no", "yes"):
            # the text as the tokenizer writes it whole; the prompt ends at "Answer:", the answer brings
            # its leading space (ecgray.models.ecg_lm's layout)
            text = f"Question: {item['question'].lower()}Answer:"
            prompt = [tok.bos_token_id] + ids(text)
            target = ids(f"{text} {option}")[len(prompt) - 1 :] + [tok.eos_token_id]
            with torch.no_grad():
                logits = llm(torch.tensor([prompt + target[:-1]])).logits[0]
            lp = F.log_softmax(logits[len(prompt) - 1 :], -1)
            scores[option] = float(lp[torch.arange(len(target)), torch.tensor(target)].sum())
        assert pred == [max(scores, key=scores.get)]


def test_blind_llm_decodes_each_distinct_prompt_once_for_all_episodes(world, monkeypatch):
    """The prompts of every episode in shared passes give each episode what it gets alone."""
    cfg, _, model, store, episodes = world
    calls = []
    score_options = type(model).score_options
    monkeypatch.setattr(
        type(model),
        "score_options",
        lambda self, *a, **k: calls.append(len(a[1])) or score_options(self, *a, **k),
    )
    together = B.blind_llm(model, episodes, store, cfg)
    answers = B._options(model, cfg, None)
    prompts = {
        prompt_key(item, opts)
        for ep in episodes
        for item, opts in zip(ep["query"], B._query_options(model, cfg, ep, answers), strict=True)
    }
    assert len(prompts) < sum(len(ep["query"]) for ep in episodes)  # prompts repeat: sharing is tested
    assert calls == [len(prompts)]  # one pass, one row per distinct (question, options)
    monkeypatch.setattr(B, "BLIND_ROWS_PER_PASS", 1)
    calls.clear()
    one_by_one = B.blind_llm(model, episodes, store, cfg)
    assert calls == [1] * len(prompts)
    for k, episode in enumerate(episodes):
        alone = B.blind_llm(model, [episode], store, cfg)["episodes"][0]
        for res in (together, one_by_one):
            assert res["episodes"][k]["predictions"] == alone["predictions"]
            assert res["episodes"][k]["exact_match"] == alone["exact_match"]


def test_ecg_free_ignores_the_ecgs_and_finetune_scratch_starts_fresh(world):
    cfg, rows, model, store, episodes = world
    params = model.mapper_params()
    other = tiny_store(len(rows), seed=5)
    assert B.ecg_free(model, params, episodes, store, cfg) == B.ecg_free(model, params, episodes, other, cfg)
    scratch = B.finetune_scratch(model, episodes, store, cfg)
    fresh = meta_test(model, B.fresh_mapper_params(model, cfg.eval.seed), episodes, store, cfg)
    assert scratch["episodes"] == fresh["episodes"]


def test_in_context_cache_equals_one_full_forward(world):
    cfg, _, model, store, episodes = world
    view = B._view(model, prompt_layout="prefix_first")
    items = B._context_items(episodes[0], 1)
    assert [i["class"] for i in items] == episodes[0]["classes"]  # one shot per class, interleaved
    params = model.mapper_params()
    pooled, tokens = encode_ecgs(model, store, [i["ecg_id"] for i in items], None)
    query = episodes[0]["query"][0]
    qp, qt = encode_ecgs(model, store, [query["ecg_id"]], None)
    with torch.no_grad():
        sp, qprefix = view.fuse(pooled, tokens, params), view.fuse(qp, qt, params)
        embeds = B._context_embeds(view, sp, items)
        context = B._context_cache(view, embeds)
        batch = view.collate(view.prompt_rows([query["question"]], [["yes"]]), use_cache=False)
        nll = view.token_nll(qprefix, B._with_context(batch, context))[0]
        # by hand: [context ; query prefix ; "Question: q" "Answer: yes"] through the plain HF forward
        after = view.prompt_rows([query["question"]], [["yes"]]).after[0]
        x = torch.cat([embeds[0], qprefix[0], view.embed(torch.tensor(after))], 0)[None]
        logits = model.llm(inputs_embeds=x).logits[0]
        target = batch.target_ids[0][batch.target_mask[0]]
        first = embeds.shape[1] + qprefix.shape[1] + len(after) - (len(target) - 1) - 1
        ref = F.cross_entropy(logits[first : first + len(target)], target, reduction="none")
    # the same forward with the context from a cache: sums reordered; the longest is the vocabulary's
    # log-softmax over logits of this magnitude
    torch.testing.assert_close(nll[: len(target)], ref, **rounding_tolerance(logits, logits.shape[-1]))


# ------------------------------------------------------------------------------------------- leads


def test_mask_leads_changes_only_the_dropped_leads():
    store = tiny_store(3)
    signals, mask = store.signals([1, 2, 3]), store.lead_mask([1, 2, 3])
    kept = ["I", "II", "V2"]
    s, m = mask_leads(signals, mask, kept)
    keep = np.isin(LEAD_NAMES, kept)
    assert np.array_equal(m, mask & keep[None])
    assert not m[0, 7] and m[1, 7]  # ECG 1 has no V2 in its recording: it stays absent
    assert np.array_equal(s[:, keep][m[:, keep]], signals[:, keep][m[:, keep]])
    assert not s[:, ~keep].any() and not s[0, 7].any()
    assert np.array_equal(mask_leads(signals, mask, None)[0], signals)
    assert np.array_equal(store.signals([1, 2, 3]), signals)  # the store is untouched
    with pytest.raises(ValueError, match="unknown: \\['V7'\\]"):
        mask_leads(signals, mask, ["I", "V7"])


def test_lead_subset_features_see_only_their_leads(world):
    cfg, rows, model, store, episodes = world
    ids = [2, 3]
    base = encode_ecgs(model, store, ids, ["I"])[0]
    changed = tiny_store(len(rows))
    changed._signals[1:3, 1:] += 5.0  # every lead but I of ECGs 2, 3
    assert torch.equal(encode_ecgs(model, changed, ids, ["I"])[0], base)
    assert not torch.equal(encode_ecgs(model, changed, ids, None)[0], encode_ecgs(model, store, ids, None)[0])
    changed._signals[1:3, 0] += 5.0
    assert not torch.equal(encode_ecgs(model, changed, ids, ["I"])[0], base)
    res = meta_test(model, model.mapper_params(), episodes, store, cfg, leads=["I"])
    assert res["steps"] == [0, 1, 2]


# ------------------------------------------------------------------------------------------ the CLI


def write_prepared(folder, rows, store):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ecgray.data.shards import ecg_schema, qa_schema, signals_to_arrow

    (folder / "ecgs").mkdir(parents=True)
    (folder / "qa").mkdir()
    ids = store.ecg_ids
    n = len(ids)
    table = pa.table(
        {
            "ecg_id": pa.array(ids, pa.int64()),
            "source": ["ptbxl"] * n,
            "patient_id": pa.array(store.patient_ids(ids), pa.int64()),
            "fs": pa.array([store.fs] * n, pa.int32()),
            "signal": signals_to_arrow(store.signals(ids)),
            "lead_mask": pa.array(store.lead_mask(ids).tolist(), pa.list_(pa.bool_(), 12)),
            "split": ["train"] * n,
            "nan_count": pa.array([0] * n, pa.int32()),
            "metadata": ["{}"] * n,
        },
        schema=ecg_schema(T),
    )
    pq.write_table(table, folder / "ecgs" / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=qa_schema()), folder / "qa" / "part-0.parquet")


def test_eval_qa_read_once_gives_each_stage_its_rows_and_refuses_other_data(tmp_path):
    from ecgray.data.shards import read_qa
    from ecgray.eval.cli import EvalQA

    verify = qa_rows()
    choose = [r | {"sample_id": r["sample_id"] + 1000, "question_type": "single-choose"} for r in verify]
    write_prepared(tmp_path / "prepared", verify + choose, tiny_store(len(verify)))
    cfg = tiny_cfg()
    qa = EvalQA.read(cfg, tmp_path / "prepared", ["single-verify", "single-choose"])
    for qt in ("single-verify", "single-choose"):
        stage = dataclasses.replace(cfg, episodes=dataclasses.replace(cfg.episodes, question_type=qt))
        assert qa.rows_for(stage, tmp_path / "prepared") == read_qa(
            tmp_path / "prepared", question_types=[qt]
        )
    with pytest.raises(ValueError, match=r"read from .*prepared .* not for .*elsewhere"):
        qa.rows_for(cfg, tmp_path / "elsewhere")
    query = dataclasses.replace(cfg, episodes=dataclasses.replace(cfg.episodes, question_type="single-query"))
    with pytest.raises(ValueError, match=r"types \['single-verify', 'single-choose'\]\), not for"):
        qa.rows_for(query, tmp_path / "prepared")
    other_variant = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, variant="paraphrased"))
    with pytest.raises(ValueError, match="variant=paraphrased"):
        qa.rows_for(other_variant, tmp_path / "prepared")


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, world, capsys):
    from ecgray.cli import main
    from ecgray.models.checkpoint import save_checkpoint

    cfg, rows, model, store, _ = world
    write_prepared(tmp_path / "prepared", rows, store)
    save_checkpoint(tmp_path / "ckpt", model.mapper.state_dict(), cfg, {"step": 1})
    argv = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "prepared"),
            "--out", str(tmp_path / "out"), "--no-progress",
            "--set", "eval.lead_subsets={I: [I], limb: [I, II, III, aVR, aVL, aVF]}"]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "meta_test" in printed and "leads limb" in printed and "text_lookup" in printed
    out = tmp_path / "out"
    for name in ("results.json", "config.yaml", "versions.json", "accuracy_vs_step.png", "per_class.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert set(res["results"]) == {"meta_test", *cfg.eval.baselines}
    # paired comparisons with every baseline of eval.compare_against that ran, on the same episodes
    assert {r["baseline"] for r in res["comparisons"]} == set(cfg.eval.compare_against) & set(
        cfg.eval.baselines
    )
    assert all(r["episodes"] == cfg.eval.episodes and r["method"] == "meta_test" for r in res["comparisons"])
    assert set(res["lead_subsets"]) == {"I", "limb"}
    assert res["config"]["eval"]["lead_subsets"]["limb"] == ["I", "II", "III", "aVR", "aVL", "aVF"]
    assert res["episodes"] == cfg.eval.episodes
    # the same episodes and weights as the library call
    episodes = EpisodeSampler(rows, cfg.episodes, "meta-test", seed=cfg.eval.seed).episodes(cfg.eval.episodes)
    direct = meta_test(model, model.mapper_params(), episodes, store, cfg)
    assert res["results"]["meta_test"]["episodes"] == json.loads(json.dumps(direct["episodes"]))
    assert (out / "accuracy_vs_step.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_help_and_bad_checkpoint(tmp_path, capsys):
    from ecgray.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--help"])
    assert exit_.value.code == 0 and "--checkpoint" in capsys.readouterr().out
    code = main(
        ["eval", "--checkpoint", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"checkpoint {tmp_path}: no mapper.safetensors, and no checkpoint_* folder" in err


def test_cli_names_bad_data(tmp_path, capsys):
    from ecgray.cli import main
    from ecgray.models.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(1)}, tiny_cfg())
    argv = [
        "eval",
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--data",
        str(tmp_path / "nothing"),
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 2
    assert "no Parquet shards" in capsys.readouterr().err
    assert main([*argv, "--set", "eval.baselines=[oracle]"]) == 2
    assert "eval.baselines.0" in capsys.readouterr().err


def test_eval_refuses_data_that_splits_unlike_the_checkpoint_and_reads_only_held_out_samples():
    from ecgray.data.episodes import (
        EpisodeError,
        EpisodeSampler,
        build_classes,
        sample_identity,
        split_classes,
        split_keys,
    )
    from ecgray.eval.cli import held_out

    rows = qa_rows()
    trained = dataclasses.replace(tiny_cfg().episodes, protocol="paper", meta_val_fraction=0.0)
    stored = split_keys(rows, trained)
    samples, cfg, expected = held_out(rows, trained, trained, stored, "prepared")  # its own protocol
    assert samples == rows and cfg == trained and expected == stored
    # the sampler checks the stored split on the classes it builds: its keys are split_keys'
    assert EpisodeSampler(rows, cfg, "meta-test", expected_split=expected).split_keys == stored
    moved = dataclasses.replace(trained, split_seed=7)
    with pytest.raises(EpisodeError, match=r"prepared: the data splits differently .*single-verify meta-"):
        EpisodeSampler(rows, moved, "meta-test", expected_split=stored, where="prepared")
    # another protocol: checked here under the checkpoint's rules ...
    with pytest.raises(EpisodeError, match=r"prepared: the data splits differently .*single-verify meta-"):
        held_out(rows, dataclasses.replace(moved, protocol="grounded"), moved, stored, "prepared")
    # ... and only the samples of the checkpoint's meta-test side, all on the meta-test side
    other = dataclasses.replace(trained, protocol="grounded")
    samples, cfg, expected = held_out(rows, other, trained, stored, "prepared")
    assert expected is None
    test_side = split_classes(build_classes(rows, "single-verify", trained), trained)["meta-test"]
    expected = {sample_identity(s) for groups in test_side.values() for g in groups.values() for s in g}
    assert {sample_identity(s) for s in samples} == expected and expected
    assert (cfg.meta_train_fraction, cfg.meta_val_fraction, cfg.protocol) == (0.0, 0.0, "grounded")


# ------------------------------------------------------------------------ two ECGs (comparison types)

CIV, CIQ = "comparison_irrelevant-verify", "comparison_irrelevant-query"
COMPARE = "Does the second ECG no longer show symptoms of {} as compared to the first ECG?"


def comparison_rows() -> list[dict]:
    """Template 58 (comparison_irrelevant-verify): 4 questions x yes/no, 6 samples each, two ECGs per sample
    (ECG ids 1..96: sample s has 2s + 1, 2s + 2)."""
    rows, sid = [], 0
    for qid, attr in enumerate(ATTRS):
        for answer in ("yes", "no"):
            for _ in range(6):
                rows.append(
                    {"sample_id": sid, "template_id": 58, "question_id": qid, "question_type": CIV,
                     "attribute_type": "scp_code", "question": COMPARE.format(attr), "answer": [answer],
                     "ecg_id": [2 * sid + 1, 2 * sid + 2], "attribute": None, "source": "ptbxl",
                     "variant": "template", "split": "train"}
                )  # fmt: skip
                sid += 1
    return rows


@pytest.fixture(scope="module")
def comparison_world(world):
    cfg, _, model, _, _ = world
    ccfg = dataclasses.replace(
        cfg, episodes=dataclasses.replace(cfg.episodes, question_type=CIV, min_class_size={CIV: 4})
    )
    rows = comparison_rows()
    episodes = EpisodeSampler(rows, ccfg.episodes, "meta-test", seed=0).episodes(2)
    return ccfg, rows, model, tiny_store(2 * len(rows)), episodes


def test_two_ecg_items_are_encoded_first_then_second(comparison_world):
    from ecgray.eval.meta_test import ecg_features, encode_items

    cfg, _, model, store, episodes = comparison_world
    items = episodes[0]["support"]
    pooled, tokens = encode_items(model, store, items, None)
    assert pooled.shape == (len(items), 2, model.encoder.d_enc) and tokens is None
    for j in (0, 1):
        torch.testing.assert_close(
            pooled[:, j], encode_ecgs(model, store, [i["ecg_id"][j] for i in items], None)[0]
        )
    (sp, _), (qp, _) = ecg_features(model, store)(episodes[0])
    assert sp.shape[:2] == (len(items), 2) and qp.shape[:2] == (len(episodes[0]["query"]), 2)
    with pytest.raises(ValueError, match=r"items of \[1, 2\] ECGs together"):
        encode_items(model, store, [{"ecg_id": 1}, items[0]], None)


def test_meta_test_and_every_baseline_on_two_ecg_episodes(comparison_world):
    cfg, rows, model, store, episodes = comparison_world
    params = model.mapper_params()
    before = {k: v.detach().clone() for k, v in params.items()}
    cache: dict = {}
    ref = meta_test(model, params, episodes, store, cfg, feature_cache=cache)
    assert len(cache) == len({e for ep in episodes for i in ep["support"] + ep["query"] for e in i["ecg_id"]})
    assert ref == meta_test(model, params, episodes, store, cfg)  # deterministic, cache or not
    assert set(ref["summary"]) == {CIV} and ref["steps"] == [0, 1, 2]
    items = B.meta_train_items(rows, cfg)
    assert items and all(len(i["ecg_id"]) == 2 for i in items)
    sup_params, losses = B.train_supervised(model, items, store, cfg)
    results = {
        "blind_llm": B.blind_llm(model, episodes, store, cfg),
        "ecg_free": B.ecg_free(model, params, episodes, store, cfg),
        "supervised": B.supervised(model, sup_params, episodes, store, cfg),
        "finetune_scratch": B.finetune_scratch(model, episodes, store, cfg),
        "in_context": B.in_context(model, params, episodes, store, cfg),
        **{name: getattr(B, name)(model, episodes, store, cfg) for name in B.CONTROLS},
    }
    for name, res in results.items():
        assert set(res) == set(ref) and set(res["summary"]) == {CIV}, name
        assert all(p in (["no"], ["yes"]) for r in res["episodes"] for p in r["predictions"]), name
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # ecg_free: both ECGs zero, so another store answers the same; the meta-learned model reads them
    other = tiny_store(2 * len(rows), seed=5)
    assert B.ecg_free(model, params, episodes, store, cfg) == B.ecg_free(model, params, episodes, other, cfg)
    for k, v in model.mapper_params().items():
        assert torch.equal(v, before[k])


def test_single_and_two_ecg_episodes_in_lockstep_equal_one_at_a_time(world, comparison_world):
    """eval.episodes_per_pass runs one- and two-ECG episodes in one pass (support sets bucketed apart,
    query sets decoded per prefix width): each episode's record is its one-at-a-time result."""
    cfg, _, model, store, single = world
    _, _, _, pair_store, pairs = comparison_world
    assert len(pair_store) >= len(store)  # ECG ids 1..96 cover the single episodes' 1..48
    episodes = [single[0], pairs[0], single[1], pairs[1]]
    params = model.mapper_params()
    runs = {}
    for n in (1, 4):
        ecfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, episodes_per_pass=n))
        runs[n] = meta_test(model, params, episodes, pair_store, ecfg)["episodes"]
    for a, b in zip(runs[1], runs[4], strict=True):
        assert a["predictions"] == b["predictions"] and a["exact_match"] == b["exact_match"]
        assert a["token_acc"] == pytest.approx(b["token_acc"], abs=1e-9)
    assert {r["question_type"] for r in runs[4]} == {"single-verify", CIV}


def test_option_sets_hold_every_answer_of_the_real_comparison_shards(shared_data):
    """Constrained decoding's options on paper and grounded episodes of the real comparison samples
    (PTB-XL and MIMIC): the template's admissible answers plus the support's answer sets hold every query's
    answer (a set of several is reachable through the support items of its class)."""
    from ecgray.data.ecgqa import read_split, read_template_answers

    for source, n_way in (("ptbxl", 4), ("mimic", 4)):
        samples = read_split(shared_data / "ecgqa", source, "template", "test")
        table = read_template_answers(shared_data / "ecgqa", source)
        for protocol, sizes in (("grounded", {}), ("paper", {"min_class_size": {CIQ: 25}})):
            ecfg = EpisodeConfig(question_type=CIQ, protocol=protocol, n_way=n_way if protocol == "grounded" else 2,
                                 meta_train_fraction=1.0, meta_val_fraction=0.0, **sizes)  # fmt: skip
            for episode in EpisodeSampler(samples, ecfg, "meta-train", seed=0).episodes(10):
                for item, options in zip(episode["query"], query_options(episode, table), strict=True):
                    assert canonical_answer(item["answer"]) in options, (source, item["class"])


def _prepare_without_ray(world_dir, out, data_cfg) -> None:
    """`ecgray prepare`'s output for a synthetic world, read with its own per-batch reader (no Ray)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ecgray.data.prepare import collect, read_batch
    from ecgray.data.shards import ECG_COLUMNS, ecg_schema, qa_schema

    data_cfg = dataclasses.replace(
        data_cfg, ptbxl_dir=str(world_dir / "ptbxl"), ecgqa_dir=str(world_dir / "ecgqa")
    )
    collected = collect(data_cfg)
    batch = {k: np.array([i[k] for i in collected.items]) for k in collected.items[0]}
    table = read_batch(batch, dataclasses.asdict(data_cfg))
    assert table.column("error").null_count == len(table)
    (out / "ecgs").mkdir(parents=True)
    (out / "qa").mkdir()
    ecgs = table.select(ECG_COLUMNS).cast(ecg_schema(data_cfg.n_samples))
    pq.write_table(ecgs, out / "ecgs" / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist(collected.samples, schema=qa_schema()), out / "qa" / "part-0.parquet")


@pytest.mark.slow
def test_eval_reports_comparison_types_with_the_controls_on_the_synthetic_world(tmp_path, world, capsys):
    """`ecgray eval` on the synthetic world (100 patients: ECG-QA's four comparison types, two ECGs per
    sample): every comparison type, under the grounded protocol and one under the paper's, reported with
    the meta-test, the controls and the paired comparisons."""
    from ecgray.cli import main
    from ecgray.config import COMPARISON_TYPES
    from ecgray.eval.cli import evaluate
    from ecgray.models.checkpoint import save_checkpoint
    from ecgray.synth.world import generate_world

    base, _, model, _, _ = world
    data = DataConfig(fs=40, window_s=2.5, record_fs=100)
    generate_world(tmp_path / "synth", 100, seed=0, progress=False)
    _prepare_without_ray(tmp_path / "synth", tmp_path / "prepared", data)
    cfg = dataclasses.replace(
        base,
        data=data,
        episodes=EpisodeConfig(
            protocol="grounded",
            n_way=2,
            k_shot=2,
            n_query=2,
            question_type="mixed",
            mixed_types=list(COMPARISON_TYPES),
        ),  # fmt: skip
        eval=dataclasses.replace(base.eval, episodes=2, bootstrap_samples=200),
    )
    save_checkpoint(tmp_path / "ckpt", model.mapper.state_dict(), cfg, {"step": 1})
    controls = {
        "text_lookup",
        "support_majority",
        "encoder_prototype",
        "blind_llm",
        "ecg_free",
        "shuffled_ecg",
        "finetune_scratch",
    }
    for qt in COMPARISON_TYPES:
        qcfg = dataclasses.replace(cfg, episodes=dataclasses.replace(cfg.episodes, question_type=qt))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            payload = evaluate(
                qcfg, tmp_path / "ckpt", tmp_path / "prepared", tmp_path / "out" / qt, progress=False
            )
        assert set(payload["results"]) == {"meta_test", *controls}, qt
        for name, res in payload["results"].items():
            assert set(res["summary"]) == {qt} and res["summary"][qt]["episodes"] == 2, (qt, name)
        assert {c["baseline"] for c in payload["comparisons"]} == set(cfg.eval.compare_against) & controls
        assert payload["straddling_samples"] == 0 and set(payload["learning_evidence"]) == {qt}
        text = payload["results"]["text_lookup"]["summary"][qt]["exact_match"][0]["mean"]
        assert text <= 0.75, qt  # grounded: every question with two answers, the text cannot decide
        saved = json.loads((tmp_path / "out" / qt / "results.json").read_text())
        assert set(saved["results"]) == set(payload["results"])
    # the CLI, paper protocol, one type: the summary table names the type beside the controls
    argv = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "prepared"),
            "--out", str(tmp_path / "paper"), "--no-progress", "--set", "episodes.protocol=paper",
            f"episodes.question_type={CIV}", f"episodes.min_class_size={{{CIV}: 4}}", "episodes.min_group_size=4"]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("meta_test", *controls):
        assert any(line.startswith(name) and CIV in line for line in printed.splitlines()), name


# ------------------------------------------------------------------- one candidate set per comparison

CHOOSE = "Which of {} or {} does this ECG show?"
CHOOSE_ATTRS = [("afib", "sr"), ("afib", "stach"), ("sr", "stach"), ("afib", "sbrad")]


def choose_rows() -> list[dict]:
    """Template 38 (single-choose): 4 questions x 4 answers (either candidate, both, none), 6 samples each."""
    rows, sid = [], 0
    for qid, (a, b) in enumerate(CHOOSE_ATTRS):
        for answer in ([a], [b], [a, b], ["none"]):
            for _ in range(6):
                rows.append(
                    {"sample_id": sid, "template_id": 38, "question_id": qid, "question_type": "single-choose",
                     "attribute_type": "scp_code", "question": CHOOSE.format(a, b), "answer": answer,
                     "ecg_id": [sid + 1], "attribute": [a, b], "source": "ptbxl", "variant": "template",
                     "split": "train"}
                )  # fmt: skip
                sid += 1
    return rows


@pytest.fixture(scope="module")
def choose_world(world):
    """Grounded single-choose episodes: one question each, with 2 of its 4 answers, balanced."""
    cfg, _, model, _, _ = world
    ccfg = dataclasses.replace(
        cfg, episodes=dataclasses.replace(cfg.episodes, question_type="single-choose", protocol="grounded")
    )
    rows = choose_rows()
    episodes = EpisodeSampler(rows, ccfg.episodes, "meta-test", seed=0).episodes(2)
    return ccfg, rows, model, tiny_store(len(rows)), episodes


def test_question_support_options_are_the_answers_the_support_shows_for_the_question():
    from ecgray.eval.meta_test import options_mode

    q1, q2 = CHOOSE.format("afib", "sr"), CHOOSE.format("afib", "stach")
    support = [{"template_id": 38, "question": q, "answer": a}
               for q, a in ((q1, ["afib"]), (q1, ["both"]), (q1, ["afib"]), (q2, ["none"]), (q2, ["stach"]))]  # fmt: skip
    query = [{"sample_id": 7, "template_id": 38, "question_type": "single-choose", "question": q,
              "answer": ["afib"], "attribute": ["afib", "sr"]} for q in (q1, q2)]  # fmt: skip
    episode = {"support": support, "query": query}
    # each query: its own question's support answers only (another question's are not offered)
    assert query_options(episode, None, "question_support") == [[["afib"], ["both"]], [["none"], ["stach"]]]
    assert query_options(episode, None, "question")[0] == [["afib"], ["both"], ["none"], ["sr"]]
    stray = {"support": support, "query": [{**query[0], "question": CHOOSE.format("sr", "stach")}]}
    with pytest.raises(ValueError, match="query sample 7: no support item asks its question"):
        query_options(stray, None, "question_support")
    with pytest.raises(ValueError, match="eval.options=auto: resolve it with options_mode"):
        query_options(episode, None, "auto")
    # auto: question_support under the grounded protocol, question under the paper's; a set mode stays
    cfg = tiny_cfg()
    grounded = dataclasses.replace(cfg, episodes=dataclasses.replace(cfg.episodes, protocol="grounded"))
    assert (cfg.eval.options, options_mode(cfg), options_mode(grounded)) == (
        "auto",
        "question",
        "question_support",
    )
    fixed = dataclasses.replace(grounded, eval=dataclasses.replace(cfg.eval, options="template"))
    assert options_mode(fixed) == "template"


def test_every_method_chooses_among_the_same_candidates_and_grounded_choose_chance_is_half(
    choose_world, monkeypatch
):
    """Every method (the model, the LLM baselines, the shortcut controls) is given, and picks from, exactly
    the comparison's option list per query on the same episodes: with the default eval.options (auto ->
    question_support on grounded episodes) the two answers the support set shows for the query's question,
    so the chance level of grounded single-choose is 1/2 for every method."""
    from ecgray.eval import cli
    from ecgray.eval import meta_test as mt
    from ecgray.models.ecg_lm import ECGLanguageModel

    cfg, _, model, store, episodes = choose_world
    params = model.mapper_params()
    key = lambda opts: tuple(tuple(o) for o in opts)  # noqa: E731
    expected_options = [query_options(ep, None, "question_support") for ep in episodes]
    expected = {(q["question"], key(o)) for ep, opts in zip(episodes, expected_options, strict=True)
                for q, o in zip(ep["query"], opts, strict=True)}  # fmt: skip
    assert {len(o) for _, o in expected} == {2} and len({o for _, o in expected}) > 1

    given: dict[str, set] = {}
    current = {"method": None}

    def note(questions, options):
        given.setdefault(current["method"], set()).update(
            (q, key(o)) for q, o in zip(questions, options, strict=True)
        )

    score_options = ECGLanguageModel.score_options

    def spy_score(self, prefix, questions, options, *args, **kwargs):  # the LLM methods' option scoring
        note(questions, options)
        return score_options(self, prefix, questions, options, *args, **kwargs)

    run_episodes = B.run_episodes

    def spy_run(*args, answerer, **kwargs):  # the non-adapting methods: what their answerer is given
        def answer(m, p, sf, qf, episode, options):
            note([i["question"] for i in episode["query"]], options)
            return answerer(m, p, sf, qf, episode, options)

        return run_episodes(*args, answerer=answer, **kwargs)

    monkeypatch.setattr(ECGLanguageModel, "score_options", spy_score)
    monkeypatch.setattr(B, "run_episodes", spy_run)
    calls = {
        "meta_test": lambda: meta_test(model, params, episodes, store, cfg),
        "shuffled_ecg": lambda: B.shuffled_ecg(model, params, episodes, store, cfg),
        "ecg_free": lambda: B.ecg_free(model, params, episodes, store, cfg),
        "finetune_scratch": lambda: B.finetune_scratch(model, episodes, store, cfg),
        "supervised": lambda: B.supervised(model, params, episodes, store, cfg),
        "blind_llm": lambda: B.blind_llm(model, episodes, store, cfg),
        "in_context": lambda: B.in_context(model, params, episodes, store, cfg),
        **{name: (lambda name=name: getattr(B, name)(model, episodes, store, cfg)) for name in B.CONTROLS},
    }
    results = {}
    for name, call in calls.items():
        current["method"] = name
        results[name] = call()
    assert set(given) == set(calls)
    for name, res in results.items():
        assert given[name] == expected, name
        assert res["options"] == "question_support", name
        for ep, opts, rec in zip(episodes, expected_options, res["episodes"], strict=True):
            assert rec["n_options"] == [2] * len(ep["query"]), name
            assert all(p in o for p, o in zip(rec["predictions"], opts, strict=True)), name
        assert res["summary"]["single-choose"]["chance"] == 0.5, name
    assert cli.chance_by_type(results) == {"single-choose": 0.5}
    # the template's candidates (+ both / none): 4 options per query, chance 1/4, for the controls too
    wide = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, options="question"))
    assert B.text_lookup(model, episodes, store, wide)["summary"]["single-choose"]["chance"] == 0.25
    assert mt.options_mode(wide) == "question"
    # a method scored among other options is named
    other = {**results["text_lookup"], "summary": {"single-choose": {"chance": 0.25}}}
    with pytest.raises(ValueError, match="text_lookup chose among other options"):
        cli.chance_by_type({"meta_test": results["meta_test"], "text_lookup": other})


# ---------------------------------------------------------------------------------------- shuffled_ecg


def test_ecg_derangement_gives_every_item_another_ecg_where_possible():
    for keys in ([1, 1, 2, 2, 3], [1, 2, 3, 4], [(1, 2), (1, 2), (3, 4), (5, 6)], [7, 7, 7, 8, 8, 9]):
        perms = set()
        for seed in range(20):
            p = B.ecg_derangement(keys, np.random.default_rng(seed))
            assert sorted(p) == list(range(len(keys)))
            assert all(keys[p[i]] != keys[i] for i in range(len(keys))), (keys, p)
            perms.add(tuple(p))
        assert len(perms) > 1  # seeded, not fixed
    # one ECG held by more than half: as many items as possible (2 (n - 3) = 2) get another ECG
    for seed in range(10):
        p = B.ecg_derangement([1, 1, 1, 2], np.random.default_rng(seed))
        assert sorted(p) == [0, 1, 2, 3] and sum([1, 1, 1, 2][p[i]] != [1, 1, 1, 2][i] for i in range(4)) == 2
    assert B.ecg_derangement([5, 5, 5], np.random.default_rng(0)) == [0, 1, 2]  # one ECG: nothing to swap


def test_shuffled_ecg_answers_with_the_episode_query_ecgs_permuted(world):
    from ecgray.eval.meta_test import ecg_features

    cfg, _, model, store, episodes = world
    params = model.mapper_params()
    method = B.shuffled_ecg_method(model, params, store, cfg)
    assert method.name == "shuffled_ecg" and method.reads_ecg
    real = ecg_features(model, store)
    for episode in episodes:
        (sp, st), (qp, qt) = method.features(episode)
        (rsp, _), (rqp, _) = real(episode)
        assert torch.equal(sp, rsp) and st is None and qt is None  # the support set is the real one
        p = B.query_permutation(episode, cfg.eval.seed)
        n = len(episode["query"])
        assert sorted(p) == list(range(n)) and p != list(range(n))
        assert torch.equal(qp, rqp[p])  # the episode's own query features, permuted
        ids = [i["ecg_id"] for i in episode["query"]]
        assert len(set(ids)) == n and all(ids[p[i]] != ids[i] for i in range(n))
        assert not any(torch.equal(qp[i], rqp[i]) for i in range(n))  # no query keeps its own ECG
        assert B.query_permutation(episode, cfg.eval.seed) == p  # deterministic per episode
    first = B.shuffled_ecg(model, params, episodes, store, cfg)
    assert first == B.shuffled_ecg(model, params, episodes, store, cfg)
    assert first["method"] == "shuffled_ecg" and first["steps"] == [0, 1, 2]
    # every record is the definition's: the meta-learned mapper adapted on the real support set, answering
    # the (unchanged) questions and golds with the permuted query features
    answers = load_template_answers(cfg)
    for episode, record in zip(episodes, first["episodes"], strict=True):
        expected = one_at_a_time(model, method, episode, cfg, answers)
        assert record["exact_match"] == [float(np.mean(s.correct)) for s in expected]
        assert record["predictions"] == expected[-1].predictions
    assert "shuffled_ecg" in B.BASELINES and "shuffled_ecg" in EvalConfig().baselines
    assert "shuffled_ecg" in EvalConfig().compare_against


# ------------------------------------------------------------------------------- the loss floor


def test_blind_loss_floor_of_items_matches_the_loss_averaging_by_hand(world, choose_world):
    cfg, _, model, _, _ = world
    ln2 = math.log(2)
    verify = [{"question": QUESTION.format(a), "answer": [ans], "ecg_id": 1}
              for a in ATTRS[:2] for ans in ("yes", "no")]  # fmt: skip
    # yes and no are one token each here: the loss averages answer token + EOS, so ln 2 / 2 per item
    assert len(model.answer_ids(["yes"])) == len(model.answer_ids(["no"])) == 1
    assert metrics.blind_loss_floor(verify, model) == pytest.approx(ln2 / 2)
    # the paper's quirk: targets [BOS, answer], read at fixed positions: BOS is certain, the answer ln 2
    assert metrics.blind_loss_floor(verify, B._view(model, paper_compat=True)) == pytest.approx(ln2 / 2)
    # choose: afib (4 tokens) vs none (2 tokens) part at their first token: 2 ln 2 over 5 + 3 tokens
    q = CHOOSE.format("afib", "sr")
    choose = [{"question": q, "answer": a, "ecg_id": 1} for a in (["afib"], ["none"])]
    assert [len(model.answer_ids(a["answer"])) for a in choose] == [4, 2]
    assert model.answer_ids(["afib"])[0] != model.answer_ids(["none"])[0]
    assert metrics.blind_loss_floor(choose, model) == pytest.approx(2 * ln2 / 8)
    # the ECG count is part of the prompt: a one- and a two-ECG item of one question are told apart
    assert metrics.blind_loss_floor([verify[0], {**verify[1], "ecg_id": [1, 2]}], model) == 0.0
    # repeated items count as often as they occur (tokenised once): 3 yes and 1 no of one question
    skewed = [verify[0]] * 3 + [verify[1]]
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # the answer token's entropy; EOS is certain
    assert metrics.blind_loss_floor(skewed, model) == pytest.approx(h / 2)
    assert metrics.blind_loss_floor(verify[:2], model, weights=[3, 1]) == pytest.approx(h / 2)
    with pytest.raises(ValueError, match="no items"):
        metrics.blind_loss_floor([], model)
    with pytest.raises(ValueError, match=r"items without \['answer'\]"):
        metrics.blind_loss_floor([{"question": q, "ecg_id": 1}], model)


def test_the_optimal_blind_predictor_reaches_the_floor_and_an_ecg_free_mapper_stays_above(world):
    """The floor against losses computed as the model computes them: (1) cross-entropy, reduced like
    `task_losses` (every target token of every row, one mean), of a predictor putting each prompt's
    empirical next-token distribution at every target position equals the floor; (2) the ECG-free mapper
    adapted on a support set never goes below it; (3) meta-test records hold the support loss per inner
    step (the loss the inner loop differentiates) beside that floor."""
    from ecgray.eval.meta_test import ecg_features
    from ecgray.meta import adapt

    cfg, rows, model, store, episodes = world
    grounded = dataclasses.replace(cfg.episodes, protocol="grounded", n_way=2)
    episode = EpisodeSampler(rows, grounded, "meta-test", seed=0).episodes(1)[0]
    support = episode["support"]
    floor = metrics.blind_loss_floor(support, model)
    questions, answers = [i["question"] for i in support], [i["answer"] for i in support]
    batch = model.collate(model.prompt_rows(questions, answers), use_cache=False)
    targets = [batch.target_ids[r][batch.target_mask[r]].tolist() for r in range(len(support))]
    counts: dict = {}  # (question, target prefix) -> next-token counts, from whole sequences
    for question, target in zip(questions, targets, strict=True):
        for j in range(len(target)):
            counts.setdefault((question, tuple(target[:j])), Counter())[target[j]] += 1
    vocab = model.logits(torch.zeros(1, model.d_llm)).shape[-1]
    nll = []
    for question, target in zip(questions, targets, strict=True):
        logits = torch.full((len(target), vocab), -1e9, dtype=torch.float64)
        for j in range(len(target)):
            seen = counts[(question, tuple(target[:j]))]
            for token, c in seen.items():
                logits[j, token] = math.log(c / sum(seen.values()))
        nll.append(F.cross_entropy(logits, torch.tensor(target), reduction="none"))
    assert float(torch.cat(nll).mean()) == pytest.approx(floor, rel=1e-12)
    assert floor == pytest.approx(math.log(2) / 2)  # grounded verify, balanced: ln 2 over answer + EOS

    params = model.mapper_params()
    (sp, st), _ = B.ecg_free_method(model, params, store).features(episode)
    task = model.task_set([model.task_data(sp, st, questions, answers)])
    model.eval()
    result = adapt(model.loss_fn(), params, task, 30, 1.0)
    losses = result.support_losses[:, 0]
    assert losses[-1] < losses[0]  # it learns the answer frequencies ...
    tol = rounding_tolerance(losses, vocab)["atol"]
    assert float(losses.min()) >= floor - tol  # ... but cannot read the ECG it is not given

    res = meta_test(model, params, [episode], store, cfg)
    rec = res["episodes"][0]
    assert (
        rec["support_loss_floor"] == pytest.approx(floor) and len(rec["support_loss"]) == cfg.meta.inner_steps
    )
    (sp, st), _ = ecg_features(model, store)(episode)
    with torch.no_grad():
        start = model.task_losses([params], [model.task_data(sp, st, questions, answers)])[0]
    assert rec["support_loss"][0] == pytest.approx(float(start), abs=tol)
    s = res["summary"]["single-verify"]
    assert s["support_loss"] == pytest.approx(rec["support_loss"]) and s[
        "support_loss_floor"
    ] == pytest.approx(floor)
    from ecgray.eval.cli import support_loss_text

    assert support_loss_text(s) == (
        f"support loss {rec['support_loss'][0]:.3f} -> {rec['support_loss'][-1]:.3f} (ECG-blind floor {floor:.3f})"
    )


def test_demo_report_states_the_options_chance_and_loss_floor(tmp_path):
    """The demo's report (report.json rows, report.md table): the option mode and chance level beside the
    accuracies, the adapting methods' support loss beside its ECG-blind floor, and learning evidence that
    needs the shuffled-ECG control too."""
    from ecgray.demo import LEARNING_EVIDENCE_AGAINST, build_report

    cfg = tiny_cfg()
    cfg = dataclasses.replace(cfg, episodes=dataclasses.replace(cfg.episodes, protocol="grounded"))
    qt = "single-choose"

    def result(name: str, right: list[bool], adapting: bool) -> dict:
        records = [
            metrics.episode_record(
                i, qt, ["a", "b"], [0, 1] if adapting else [0], [[ok, ok]] * (2 if adapting else 1),
                [1.0] * (2 if adapting else 1), [1.0] * (2 if adapting else 1), ["a", "b"], n_options=[2, 2],
                support_loss=[0.9, 0.5] if adapting else None, support_loss_floor=0.3466 if adapting else None,
            )
            for i, ok in enumerate(right)
        ]  # fmt: skip
        steps = [0, 1] if adapting else [0]
        summary = metrics.summarize(records, n_resamples=200)
        return {"method": name, "options": "question_support", "steps": steps, "summary": summary,
                "episodes": records}  # fmt: skip

    results = {"meta_test": result("meta_test", [True] * 12, True)}
    for name in LEARNING_EVIDENCE_AGAINST:
        results[name] = result(name, [False] * 12, name in ("ecg_free", "shuffled_ecg"))
    comparisons = metrics.compare_results(
        results, against=LEARNING_EVIDENCE_AGAINST, n_resamples=200, protocol="grounded"
    )
    payload = {"results": results, "comparisons": comparisons, "llm_dtype": "float32", "device": "cpu"}
    report = build_report(cfg, tmp_path, {"grounded": {qt: payload}}, None, {}, 1.0)
    rows = {r["method"]: r for r in report["results"]}
    assert all(r["chance"] == 0.5 and r["options"] == "question_support" for r in rows.values())
    assert rows["meta_test"]["support_loss_last"] == 0.5 and rows["meta_test"]["support_loss_floor"] == 0.3466
    assert rows["text_lookup"]["support_loss_first"] is None
    assert set(report["learning_evidence"]["grounded"][qt]["against"]) == set(LEARNING_EVIDENCE_AGAINST)
    assert (
        "shuffled_ecg" in LEARNING_EVIDENCE_AGAINST
        and report["learning_evidence"]["grounded"][qt]["evidence"]
    )
    md = (tmp_path / "report.md").read_text()
    assert "Answer options: question_support (eval.options=auto)." in md
    assert (
        f"| {qt} | meta_test | 12 | 1.000 | 1.000 | [1.000, 1.000] | 0.500 | 1.000 | 0.900 -> 0.500 (floor 0.347) |"
        in md
    )
    assert f"| {qt} | text_lookup | 12 | 0.000 | 0.000 | [0.000, 0.000] | 0.500 | 1.000 |  |" in md
    assert "text_lookup, ecg_free, blind_llm, shuffled_ecg" in md

"""The shortcut controls (text_lookup, support_majority, encoder_prototype): answers by hand on hand-built
episodes, the nearest-class-mean rule on hand-made features, and the shared loop's result structure."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from ecgray.config import (
    Config,
    DataConfig,
    EncoderConfig,
    EpisodeConfig,
    EvalConfig,
    MetaConfig,
    ModelConfig,
)
from ecgray.data.shards import ECGStore
from ecgray.eval import baselines as B
from ecgray.eval.meta_test import encode_ecgs, meta_test
from ecgray.models.ecg_lm import build_model

T = 100  # samples per ECG
BIGEMINAL = "bigeminal pattern (unknown origin, supraventricular, or ventricular)"
QUESTION = "Does this ECG show symptoms of {}?"


def item(ecg_id: int, question: str, answer: list[str], cls: str) -> dict:
    """One episode item (the fields EpisodeSampler gives), template 27 single-verify unless told."""
    return {"sample_id": ecg_id, "ecg_id": ecg_id, "question": question, "answer": answer, "class": cls,
            "template_id": 27, "question_type": "single-verify", "attribute": None}  # fmt: skip


def build_episode(ways: list[tuple[str, list[str]]], k_shot: int, n_query: int) -> dict:
    """An episode with one class per (question, answer) way: k_shot support + n_query query items each."""
    support, query, classes, ecg = [], [], [], 1
    for question, answer in ways:
        cls = f"27_{question}_{', '.join(answer)}"
        classes.append(cls)
        for j in range(k_shot + n_query):
            (support if j < k_shot else query).append(item(ecg, question, answer, cls))
            ecg += 1
    return {"classes": classes, "support": support, "query": query}


def paper_episode() -> dict:
    """The paper's protocol: every class is a distinct question with one answer."""
    ways = [(QUESTION.format("baseline drift"), ["no"]), (QUESTION.format("static noise"), ["yes"]),
            (QUESTION.format("burst noise"), ["no"])]  # fmt: skip
    return build_episode(ways, k_shot=2, n_query=2)


def grounded_episode() -> dict:
    """Every question with both answers, balanced: the text cannot decide."""
    ways = [(QUESTION.format(a), [ans]) for a in ("baseline drift", "static noise") for ans in ("yes", "no")]
    return build_episode(ways, k_shot=2, n_query=2)


def tiny_cfg() -> Config:
    return Config(
        data=DataConfig(fs=40, window_s=2.5),
        episodes=EpisodeConfig(n_way=3, k_shot=2, n_query=2, min_group_size=4,
                               min_class_size={"single-verify": 4, "single-choose": 4, "single-query": 4}),
        encoder=EncoderConfig(d_enc=16, n_layers=1, n_heads=2, patch=25, stem_channels=8, fs=40, random_init=True),
        model=ModelConfig(llm="tiny-llama"),
        meta=MetaConfig(inner_steps=1),
        eval=EvalConfig(episodes=2, bootstrap_samples=200),
    )  # fmt: skip


def tiny_store(n: int, seed: int = 0) -> ECGStore:
    rng = np.random.default_rng(seed)
    signals = rng.normal(size=(n, 12, T)).astype(np.float32)
    mask = np.ones((n, 12), dtype=bool)
    return ECGStore(np.arange(1, n + 1), signals, mask, np.arange(n), ["ptbxl"] * n, ["train"] * n, fs=40)


@pytest.fixture(scope="module")
def world():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models are slower with intra-op threads on shared cores
    cfg = tiny_cfg()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-init encoder warns
        model = build_model(cfg).eval()
    yield cfg, model, tiny_store(40)
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------- the answers


def test_majority_answer_counts_identities_and_breaks_ties_by_text():
    items = [{"answer": a} for a in (["v1", "lead i"], ["Lead I", "v1"], [BIGEMINAL], [BIGEMINAL], ["v2"])]
    # a tie (2 x {lead i, v1}, 2 x bigeminal): the text "bigeminal ..." sorts before "lead i, v1"
    assert B.majority_answer(items) == [BIGEMINAL]
    assert B.majority_answer(items[:2] + items[4:]) == ["lead i", "v1"]
    assert B.majority_answer([{"answer": ["yes"]}, {"answer": ["no"]}]) == ["no"]
    with pytest.raises(ValueError, match="no items"):
        B.majority_answer([])


def test_text_lookup_reads_the_answer_off_the_question_text():
    paper = paper_episode()
    assert B.text_lookup_answers(paper) == [q["answer"] for q in paper["query"]]
    # each question with 2 yes + 2 no in the support: a tie, "no" sorts first
    assert B.text_lookup_answers(grounded_episode()) == [["no"]] * 8
    # a question no support item asks: the support set's majority (no: 4 of 6)
    unseen = {**paper, "query": [item(99, "Is this ECG paced?", ["yes"], "x")]}
    assert B.text_lookup_answers(unseen) == [["no"]]


def test_prototype_answers_by_hand():
    q1, q2 = QUESTION.format("a"), QUESTION.format("b")
    support = [item(1, q1, ["yes"], "q1 yes"), item(2, q1, ["yes"], "q1 yes"), item(3, q1, ["no"], "q1 no"),
               item(4, q1, ["no"], "q1 no"), item(5, q2, ["yes"], "q2 yes")]  # fmt: skip
    pooled = torch.tensor([[0.0, 0.0], [0.0, 2.0], [4.0, 0.0], [4.0, 2.0], [3.0, 1.5]])
    # prototypes: q1 yes (0, 1), q1 no (4, 1), q2 yes (3, 1.5)
    queries = [item(10, q1, ["no"], "q1 no"), item(11, q1, ["yes"], "q1 yes"), item(12, "other?", ["x"], "x"),
               item(13, q1, ["yes"], "q1 yes")]  # fmt: skip
    query_pooled = torch.tensor([[3.0, 1.4], [1.0, 1.0], [3.0, 1.4], [2.0, 1.0]])
    answers = B.prototype_answers(pooled, support, query_pooled, queries)
    # squared distances: query 0 is nearest to q2's prototype (0.01), but only q1's classes ask its
    # question -> q1 no (1.16, vs 9.16); query 1 -> q1 yes (1 vs 9); query 2 asks nothing the support asks
    # -> all classes -> q2 yes (0.01); query 3 lies half-way between q1 yes and q1 no (4 and 4) -> the first
    # class in sort order, "q1 no"
    assert answers == [["no"], ["yes"], ["yes"], ["no"]]
    with pytest.raises(ValueError, match="4 support vectors for 5 items"):
        B.prototype_answers(pooled[:4], support, query_pooled, queries)


# ------------------------------------------------------------------------- through the shared loop


def test_text_lookup_scores_one_on_the_paper_protocol_and_chance_on_a_grounded_episode(world):
    cfg, model, store = world
    paper = B.text_lookup(model, [paper_episode()], store, cfg)
    rec = paper["episodes"][0]
    assert rec["exact_match"] == [1.0] and rec["token_acc"] == [1.0] and rec["token_acc_bos"] == [1.0]
    assert paper["summary"]["single-verify"]["exact_match"][0]["mean"] == 1.0
    grounded = B.text_lookup(model, [grounded_episode()], store, cfg)
    em = grounded["episodes"][0]["exact_match"][0]
    assert em <= 0.6 and em == pytest.approx(0.5)  # "no" for every query: right on the 4 "no" queries


def test_support_majority_answers_every_query_alike(world):
    cfg, model, store = world
    res = B.support_majority(model, [paper_episode(), grounded_episode()], store, cfg)
    first, second = res["episodes"]
    assert first["predictions"] == [["no"]] * 6 and first["exact_match"] == [pytest.approx(4 / 6)]
    assert second["predictions"] == [["no"]] * 8 and second["exact_match"] == [0.5]
    assert first["per_class"] == {"27_Does this ECG show symptoms of baseline drift?_no": [2, 2],
                                  "27_Does this ECG show symptoms of burst noise?_no": [2, 2],
                                  "27_Does this ECG show symptoms of static noise?_yes": [0, 2]}  # fmt: skip


def test_encoder_prototype_is_the_nearest_class_mean_of_the_encoder_features(world):
    cfg, model, store = world
    episodes = [paper_episode(), grounded_episode()]
    cache: dict = {}
    res = B.encoder_prototype(model, episodes, store, cfg, feature_cache=cache)
    # paper protocol: one class per question, so the restriction leaves the text's answer
    assert res["episodes"][0]["exact_match"] == [1.0]
    # grounded: by hand, from the encoder's pooled vectors
    ep = episodes[1]
    pooled, _ = encode_ecgs(model, store, [i["ecg_id"] for i in ep["support"] + ep["query"]], None)
    support, query = pooled[: len(ep["support"])].double(), pooled[len(ep["support"]) :].double()
    expected = []
    for q_vec, q in zip(query, ep["query"], strict=True):
        classes = sorted({s["class"] for s in ep["support"] if s["question"] == q["question"]})
        means = {
            c: support[[j for j, s in enumerate(ep["support"]) if s["class"] == c]].mean(0) for c in classes
        }
        best = min(classes, key=lambda c: float(((q_vec - means[c]) ** 2).sum()))
        expected.append(next(s["answer"] for s in ep["support"] if s["class"] == best))
    assert res["episodes"][1]["predictions"] == expected
    right = [p == q["answer"] for p, q in zip(expected, ep["query"], strict=True)]
    assert res["episodes"][1]["exact_match"] == [pytest.approx(np.mean(right))]
    # each ECG encoded once: the cache holds all of them, and a second run encodes nothing
    assert len(cache) == len({i["ecg_id"] for e in episodes for i in e["support"] + e["query"]})
    encode = model.encode
    model.encode = lambda *a, **k: pytest.fail("encoded an ECG twice")
    try:
        again = B.encoder_prototype(model, episodes, store, cfg, feature_cache=cache)
    finally:
        model.encode = encode
    assert again == res


def test_controls_return_the_meta_test_structure(world):
    cfg, model, store = world
    episodes = [paper_episode(), grounded_episode()]
    ref = meta_test(model, model.mapper_params(), episodes, store, cfg)
    for name in B.CONTROLS:
        res = getattr(B, name)(
            model, episodes, store, cfg, template_answers=None, progress=False, feature_cache={}
        )
        assert set(res) == set(ref) and res["method"] == name and res["steps"] == [0]
        assert set(res["summary"]) == set(ref["summary"]) == {"single-verify"}
        assert set(res["summary"]["single-verify"]) == set(ref["summary"]["single-verify"])
        assert [r["index"] for r in res["episodes"]] == [r["index"] for r in ref["episodes"]] == [0, 1]
        assert [r["classes"] for r in res["episodes"]] == [r["classes"] for r in ref["episodes"]]
        for rec in res["episodes"]:
            assert set(rec) == set(ref["episodes"][0])
            assert all(isinstance(p, list) for p in rec["predictions"])  # answers, not text
    # the controls choose among the comparison's options, as the model does: a mode that reads the
    # admissible-answer table needs it (none ships for MIMIC), one built from the support set does not
    mimic = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="mimic"))
    with pytest.raises(ValueError, match="data.source='mimic' needs data.ecgqa_dir"):
        B.text_lookup(model, episodes, store, mimic)
    from_support = dataclasses.replace(mimic, eval=dataclasses.replace(cfg.eval, options="question_support"))
    by_support = B.text_lookup(model, episodes, store, from_support)
    by_template = B.text_lookup(model, episodes, store, cfg)
    for a, b in zip(by_support["episodes"], by_template["episodes"], strict=True):
        assert a["predictions"] == b["predictions"] and a["exact_match"] == b["exact_match"]
    # the paper episode's questions each show one answer; the grounded one's two (template 27: yes / no)
    assert [r["n_options"] for r in by_support["episodes"]] == [[1] * 6, [2] * 8]
    assert [r["n_options"] for r in by_template["episodes"]] == [[2] * 6, [2] * 8]
    assert by_support["options"] == "question_support" and by_template["options"] == "question"


# --------------------------------------------------------------------------- two ECGs per item

CIV = "comparison_irrelevant-verify"
COMPARE = "Does the second ECG no longer show symptoms of {} as compared to the first ECG?"


def test_prototype_answers_of_two_ecgs_are_the_concatenation_of_both():
    """A comparison item's feature is [pooled(first) ; pooled(second)] (module docstring of baselines):
    neither ECG alone, nor their difference, decides these queries."""
    q = COMPARE.format("x")
    support = [item(1, q, ["no"], "57_q1_no"), item(2, q, ["yes"], "57_q1_yes")]
    s = torch.tensor([[[0.0], [0.0]], [[0.0], [4.0]]])  # (S, 2, 1): no = (0, 0), yes = (0, 4)
    queries = [
        item(10, q, ["yes"], "57_q1_yes"),
        item(11, q, ["no"], "57_q1_no"),
        item(12, q, ["yes"], "57_q1_yes"),
    ]
    # query 0: the first ECG ties (0 vs 0), the second and the concatenation say yes; query 1: the
    # concatenation says no (1 vs 9); query 2 = (5, 9): the difference (4) equals yes's exactly, the
    # concatenation's squared distances are 25 + 81 = 106 (no) vs 25 + 25 = 50 (yes)
    qs = torch.tensor([[[0.0], [3.5]], [[0.0], [1.0]], [[5.0], [9.0]]])
    assert B.prototype_answers(s, support, qs, queries) == [["yes"], ["no"], ["yes"]]
    flat = B.prototype_answers(s.flatten(1), support, qs.flatten(1), queries)
    assert flat == B.prototype_answers(s, support, qs, queries)
    # by the first ECG alone the first query ties and goes to the first class in sort order, "no"
    assert B.prototype_answers(s[:, 0], support, qs[:, 0], queries)[0] == ["no"]


def comparison_episode(first_ecg: int = 1) -> dict:
    """A grounded comparison_irrelevant-verify episode: two questions x yes / no, two ECG ids per item."""
    support, query, classes, ecg = [], [], [], first_ecg
    for qid, subject in enumerate(("abnormal qrs", "sinus rhythm")):
        question = COMPARE.format(subject)
        for answer in (["yes"], ["no"]):
            cls = f"57_q{qid}_{answer[0]}"
            classes.append(cls)
            for j in range(4):
                it = item(ecg, question, answer, cls) | {"ecg_id": [ecg, ecg + 1], "template_id": 57,
                                                         "question_type": CIV}  # fmt: skip
                (support if j < 2 else query).append(it)
                ecg += 2
    return {"classes": classes, "support": support, "query": query}


def test_controls_on_two_ecg_episodes_read_both_ecgs(world):
    cfg, model, store = world
    episodes = [comparison_episode()]
    cache: dict = {}
    res = {name: getattr(B, name)(model, episodes, store, cfg, feature_cache=cache) for name in B.CONTROLS}
    assert len(cache) == 32  # both ECGs of each of the 16 items, once
    for name, r in res.items():
        assert set(r["summary"]) == {CIV} and r["steps"] == [0], name
    assert res["text_lookup"]["episodes"][0]["exact_match"] == [0.5]  # grounded: the text cannot decide
    # encoder_prototype: nearest class mean of the concatenated pooled vectors, by hand
    ep = episodes[0]
    ids = [e for i in ep["support"] + ep["query"] for e in i["ecg_id"]]
    pooled = encode_ecgs(model, store, ids, None)[0].reshape(16, -1).double()  # (items, 2 D_enc)
    support, query = pooled[:8], pooled[8:]
    expected = []
    for q_vec, q in zip(query, ep["query"], strict=True):
        classes = sorted({s["class"] for s in ep["support"] if s["question"] == q["question"]})
        means = {
            c: support[[j for j, s in enumerate(ep["support"]) if s["class"] == c]].mean(0) for c in classes
        }
        best = min(classes, key=lambda c: float(((q_vec - means[c]) ** 2).sum()))
        expected.append(next(s["answer"] for s in ep["support"] if s["class"] == best))
    assert res["encoder_prototype"]["episodes"][0]["predictions"] == expected
    # swapping the two ECGs of every item changes the features the prototype reads
    swapped = [{**ep, "support": [{**i, "ecg_id": i["ecg_id"][::-1]} for i in ep["support"]],
                "query": [{**i, "ecg_id": i["ecg_id"][::-1]} for i in ep["query"]]}]  # fmt: skip
    again = encode_ecgs(model, store, [e for i in swapped[0]["support"] for e in i["ecg_id"]], None)[0]
    assert not torch.equal(again.reshape(8, -1), pooled[:8].float())

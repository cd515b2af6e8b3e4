"""Class keys, size filters, splits and the episode sampler (method.md section 1)."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest

from ecgray.config import EpisodeConfig
from ecgray.data.episodes import (
    SPLITS,
    EpisodeError,
    EpisodeSampler,
    build_classes,
    check_split_keys,
    class_answer,
    class_keys,
    ecgs_per_sample,
    item_ecg_ids,
    sample_identity,
    seeded_split,
    split_classes,
    split_keys,
    straddles,
    straddling_samples,
)

VERIFY, CHOOSE, QUERY = "single-verify", "single-choose", "single-query"


def qa(tid, answer, attribute, qtype=VERIFY, qid=1, sid=0, ecg=1, split=None):
    sample = {
        "template_id": tid,
        "question_id": qid,
        "sample_id": sid,
        "question_type": qtype,
        "attribute_type": "noise",
        "question": f"q{qid}?",
        "answer": list(answer),
        "ecg_id": [ecg],
        "attribute": None if attribute is None else list(attribute),
    }
    if split is not None:
        sample["split"] = split
    return sample


def group(n, tid, answer, attribute, qtype=VERIFY, qid=1, first_sid=0, split=None, first_ecg=None):
    """n samples of one question; ECG ids follow the sample ids unless first_ecg is given."""
    first_ecg = first_sid if first_ecg is None else first_ecg
    return [qa(tid, answer, attribute, qtype, qid, first_sid + i, first_ecg + i, split) for i in range(n)]


def small_cfg(**changes) -> EpisodeConfig:
    """Small size filters and no meta-val side (the tests of the paper's two-way split); tests of meta-val
    and of the grounded protocol set their own."""
    cfg = EpisodeConfig(
        min_class_size={VERIFY: 20, CHOOSE: 20, QUERY: 20}, min_group_size=10, meta_val_fraction=0.0
    )
    return dataclasses.replace(cfg, **changes)


def world(n_templates=10, classes_per_template=2, per_class=30, qtype=VERIFY, split_of=None):
    """Synthetic samples: n_templates x classes_per_template classes of per_class samples, one group each."""
    samples, sid = [], 0
    for t in range(n_templates):
        tid = 100 + t
        for c in range(classes_per_template):
            answer = ["yes"] if qtype == VERIFY else [f"ans{c}"]
            attr = [f"attr{c}"]
            for i in range(per_class):
                split = split_of(i) if split_of else None
                samples.append(qa(tid, answer, attr, qtype, qid=tid * 10 + c, sid=sid, ecg=sid, split=split))
                sid += 1
    return samples


# ----------------------------------------------------------------------------- class keys


def test_verify_keys():
    assert class_keys(qa(27, ["no"], ["baseline drift"]), VERIFY) == ["27_baseline drift_no"]
    assert class_keys(qa(2, ["yes"], ["lead V1", "lead I"]), VERIFY) == ["2_lead I+lead V1_yes"]
    assert class_keys(qa(1, ["not sure"], ["x"]), VERIFY) == []
    for tid in (4, 14, 17, 26, 28, 31, 40):
        assert class_keys(qa(tid, ["yes"], ["x"]), VERIFY) == []
    assert class_keys(qa(26, ["yes"], ["x"]), VERIFY, excluded_templates=[]) == ["26_x_yes"]
    with pytest.raises(EpisodeError, match="sample 0: single-verify answer must be one of"):
        class_keys(qa(2, ["maybe"], ["x"]), VERIFY)
    with pytest.raises(EpisodeError, match="question_type 'single-verify', asked for 'single-choose'"):
        class_keys(qa(2, ["yes"], ["x"]), CHOOSE)


def test_choose_keys_one_both_none_and_more():
    attrs = ["static noise", "baseline drift"]
    assert class_keys(qa(30, ["static noise"], attrs, CHOOSE), CHOOSE) == [
        "30_baseline drift+static noise_static noise"
    ]
    both = qa(30, ["static noise", "baseline drift"], attrs, CHOOSE)
    assert class_keys(both, CHOOSE) == ["30_baseline drift+static noise_both"]
    assert class_answer(both, CHOOSE) == ["both"]
    assert class_keys(qa(30, ["a", "b", "c"], ["a", "b", "c"], CHOOSE), CHOOSE) == []
    assert class_keys(qa(30, ["none"], attrs, CHOOSE), CHOOSE) == [
        "30_baseline drift_none",
        "30_static noise_none",
    ]


def test_query_keys_are_order_free():
    a = qa(42, ["rr interval", "qrs duration"], ["x"], QUERY)
    b = qa(42, ["qrs duration", "rr interval"], ["x"], QUERY)
    assert class_keys(a, QUERY) == class_keys(b, QUERY) == ["42_x_qrs duration, rr interval"]
    assert class_answer(a, QUERY) == ["qrs duration", "rr interval"]
    assert class_keys(qa(3, ["none"], None, QUERY), QUERY) == ["3__none"]


def test_bad_samples_name_the_sample_and_field():
    sample = qa(27, ["no"], ["x"], sid=77)
    del sample["question_id"]
    with pytest.raises(EpisodeError, match="sample 77: missing field 'question_id'"):
        build_classes([sample], VERIFY, EpisodeConfig(min_class_size={VERIFY: 1}, min_group_size=1))
    with pytest.raises(EpisodeError, match="sample 78: answer must be a list"):
        class_keys(qa(27, "no", ["x"], sid=78) | {"answer": "no"}, VERIFY)


# ----------------------------------------------------------------------------- worked example


@pytest.fixture(scope="module")
def shard(shared_data):
    path = shared_data / "ecgqa/ptbxl/template/train/120000.json"
    return json.loads(path.read_text())


def test_worked_example(shard):
    """method.md's worked example, step by step, on the real shard."""
    assert len(shard) == 10_000
    assert Counter(s["template_id"] for s in shard) == {26: 5528, 28: 3434, 27: 1038}
    # 26 and 28 are excluded templates, so only template 27 gives keys.
    keys = Counter(k for s in shard for k in class_keys(s, VERIFY))
    assert sum(keys.values()) == 1038
    assert sum(n for k, n in keys.items() if k.endswith("_no")) == 715
    assert sum(n for k, n in keys.items() if k.endswith("_yes")) == 323
    assert keys == {
        "27_baseline drift_no": 200, "27_burst noise_no": 200, "27_static noise_no": 200,
        "27_electrodes problems_no": 115, "27_baseline drift_yes": 100, "27_burst noise_yes": 100,
        "27_static noise_yes": 100, "27_electrodes problems_yes": 23,
    }  # fmt: skip
    classes = build_classes(shard, VERIFY, EpisodeConfig())
    assert {k: {q: len(g) for q, g in v.items()} for k, v in classes.items()} == {
        "27_baseline drift_no": {1745: 200},
        "27_burst noise_no": {1747: 200},
        "27_static noise_no": {1746: 200},
    }
    # The input order does not matter.
    assert build_classes(shard[::-1], VERIFY, EpisodeConfig()) == classes


def test_size_filters():
    cfg = EpisodeConfig()
    samples = group(139, 27, ["no"], ["a"]) + group(140, 27, ["no"], ["b"], first_sid=1000)
    assert list(build_classes(samples, VERIFY, cfg)) == ["27_b_no"]
    # A class of 140 whose question groups are 135 + 5: the 5-group is dropped.
    samples = group(135, 27, ["no"], ["c"], qid=1) + group(5, 27, ["no"], ["c"], qid=2, first_sid=500)
    assert {q: len(g) for q, g in build_classes(samples, VERIFY, cfg)["27_c_no"].items()} == {1: 135}
    # 14 choose samples in groups of 7: big enough a class, no group >= 10 -> no class.
    samples = group(7, 30, ["x"], ["x", "y"], CHOOSE, qid=1) + group(
        7, 30, ["x"], ["x", "y"], CHOOSE, qid=2, first_sid=50
    )
    assert build_classes(samples, CHOOSE, cfg) == {}
    assert list(
        build_classes(samples[:7] + group(7, 30, ["x"], ["x", "y"], CHOOSE, qid=1, first_sid=50), CHOOSE, cfg)
    ) == ["30_x+y_x"]
    samples = group(49, 42, ["p"], ["q"], QUERY) + group(50, 42, ["r"], ["q"], QUERY, first_sid=100)
    assert list(build_classes(samples, QUERY, cfg)) == ["42_q_r"]


# ----------------------------------------------------------------------------- splits


def test_class_split_is_seeded_80_20_and_disjoint():
    cfg = small_cfg()
    classes = build_classes(world(), VERIFY, cfg)
    assert len(classes) == 20
    sides = split_classes(classes, cfg)
    train, test = set(sides["meta-train"]), set(sides["meta-test"])
    assert (len(train), len(test)) == (16, 4)
    assert not train & test and train | test == set(classes)
    # The documented procedure: sorted keys, default_rng(222).permutation, first floor(0.8 n) to meta-train.
    keys = sorted(classes)
    order = np.random.default_rng(222).permutation(len(keys))
    assert train == {keys[i] for i in order[:16]}
    assert split_classes(classes, cfg) == sides
    other = split_classes(classes, dataclasses.replace(cfg, split_seed=1))
    assert set(other["meta-train"]) != train
    assert seeded_split(range(15), 0.8, 0)[0].__len__() == 12


def test_patient_split_keeps_train_and_test_ecgs_apart():
    cfg = small_cfg(split_mode="patient")
    # Each class: 12 train, 6 valid, 12 test samples; ECG ids differ per sample, so per split.
    samples = world(split_of=lambda i: "train" if i < 12 else "valid" if i < 18 else "test")
    sides = split_classes(build_classes(samples, VERIFY, cfg), cfg)
    class_sides = split_classes(build_classes(samples, VERIFY, cfg), small_cfg())
    for side, qa_split in (("meta-train", "train"), ("meta-test", "test")):
        assert set(sides[side]) == set(class_sides[side])
        members = [s for groups in sides[side].values() for g in groups.values() for s in g]
        assert {s["split"] for s in members} == {qa_split}
        assert len(members) == 12 * len(sides[side])
    ecgs = {
        side: {s["ecg_id"][0] for groups in sides[side].values() for g in groups.values() for s in g}
        for side in sides
    }
    assert ecgs["meta-train"] and ecgs["meta-test"] and not ecgs["meta-train"] & ecgs["meta-test"]
    # Groups that fall below min_group_size on one side are dropped there.
    thin = world(split_of=lambda i: "train" if i < 25 else "test")
    thin_sides = split_classes(build_classes(thin, VERIFY, cfg), cfg)
    assert len(thin_sides["meta-train"]) == 16 and thin_sides["meta-test"] == {}
    with pytest.raises(EpisodeError, match="split_mode 'patient' needs the ECG-QA split"):
        split_classes(build_classes(world(), VERIFY, cfg), cfg)


def test_template_split_holds_out_whole_templates():
    cfg = small_cfg(split_mode="template")
    classes = build_classes(world(n_templates=10, classes_per_template=3), VERIFY, cfg)
    sides = split_classes(classes, cfg)
    tids = {side: {int(k.split("_")[0]) for k in sides[side]} for side in sides}
    assert (len(tids["meta-train"]), len(tids["meta-test"])) == (8, 2)
    assert not tids["meta-train"] & tids["meta-test"]
    assert len(sides["meta-train"]) == 24 and len(sides["meta-test"]) == 6
    order = np.random.default_rng(222).permutation(10)
    assert tids["meta-train"] == {100 + int(i) for i in order[:8]}


# ----------------------------------------------------------------------------- sampler


def test_episodes_shape_and_no_replacement():
    cfg = small_cfg(meta_train_fraction=1.0)
    sampler = EpisodeSampler(world(), cfg, "meta-train", seed=3)
    for ep in sampler.episodes(20):
        assert json.loads(json.dumps(ep)) == ep
        assert len(ep["classes"]) == len(set(ep["classes"])) == 5
        assert len(ep["support"]) == 25 and len(ep["query"]) == 25
        ids = [it["sample_id"] for it in ep["support"] + ep["query"]]
        assert len(set(ids)) == 50
        for way, key in enumerate(ep["classes"]):
            items = ep["support"][5 * way : 5 * way + 5] + ep["query"][5 * way : 5 * way + 5]
            assert {it["class"] for it in items} == {key}
            assert len({it["question"] for it in items}) == 1  # one question group per class
        item = ep["support"][0]
        assert set(item) == {
            "sample_id",
            "ecg_id",
            "question",
            "answer",
            "class",
            "template_id",
            "question_type",
            "attribute",
        }
        assert (
            isinstance(item["ecg_id"], int) and item["answer"] == ["yes"] and item["question_type"] == VERIFY
        )


def test_episodes_are_deterministic():
    cfg = small_cfg(meta_train_fraction=1.0)
    samples = world()
    a = EpisodeSampler(samples, cfg, "meta-train", seed=5).episodes(10)
    b = EpisodeSampler(samples[::-1], cfg, "meta-train", seed=5).episodes(10)
    c = EpisodeSampler(samples, cfg, "meta-train", seed=6).episodes(10)
    assert a == b and a != c
    assert EpisodeSampler(samples, cfg, "meta-train", seed=5).episodes(4) == a[:4]
    assert len({json.dumps(ep) for ep in a}) == 10


def test_meta_test_episodes_use_meta_test_classes():
    cfg = small_cfg(n_way=2)
    samples = world()
    sides = split_classes(build_classes(samples, VERIFY, cfg), cfg)
    test_classes = {
        k for ep in EpisodeSampler(samples, cfg, "meta-test", 0).episodes(30) for k in ep["classes"]
    }
    assert test_classes == set(sides["meta-test"])
    train_classes = {
        k for ep in EpisodeSampler(samples, cfg, "meta-train", 0).episodes(30) for k in ep["classes"]
    }
    assert train_classes <= set(sides["meta-train"]) and not train_classes & test_classes


def test_mixed_draws_each_episode_from_one_type():
    cfg = small_cfg(question_type="mixed", meta_train_fraction=1.0, n_way=3)
    samples = world(4, 1, qtype=VERIFY)
    offset = len(samples)
    for qtype in (CHOOSE, QUERY):
        extra = world(4, 1, qtype=qtype)
        for s in extra:
            s["sample_id"] += offset
            s["question_id"] += offset
        offset += len(extra)
        samples += extra
    types = []
    for ep in EpisodeSampler(samples, cfg, "meta-train", 0).episodes(30):
        kinds = {it["question_type"] for it in ep["support"] + ep["query"]}
        assert len(kinds) == 1
        types.append(kinds.pop())
    assert set(types) == {VERIFY, CHOOSE, QUERY}
    with pytest.raises(EpisodeError, match="meta-train single-choose .* 0 eligible classes"):
        EpisodeSampler(world(4, 1), cfg, "meta-train", 0)

    # mixed_types narrows the draw: only verify and query episodes, and choose classes are not needed
    two = dataclasses.replace(cfg, mixed_types=[VERIFY, QUERY])
    assert two.types() == [VERIFY, QUERY]
    kinds = {
        it["question_type"]
        for ep in EpisodeSampler(samples, two, "meta-train", 0).episodes(30)
        for it in ep["support"] + ep["query"]
    }
    assert kinds == {VERIFY, QUERY}
    no_choose = [s for s in samples if s["question_type"] != CHOOSE]
    assert len(EpisodeSampler(no_choose, two, "meta-train", 0).episodes(5)) == 5


def test_mixed_types_must_be_distinct_and_known():
    from ecgray.config import ConfigError, load_config

    assert load_config(None, ["episodes.question_type=single-choose"]).episodes.types() == [CHOOSE]
    for bad, match in (("[]", "distinct question types"), (f"[{VERIFY},{VERIFY}]", "distinct question types"),
                       (f"[{VERIFY},bogus]", "episodes.mixed_types.1")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            load_config(None, ["episodes.question_type=mixed", f"episodes.mixed_types={bad}"])


def test_none_samples_shared_by_classes_are_not_repeated():
    cfg = small_cfg(question_type=CHOOSE, meta_train_fraction=1.0, n_way=2)
    # 25 "none" answers to "a or b?": each sits in 30_a_none and 30_b_none, same question group.
    samples = group(25, 30, ["none"], ["a", "b"], CHOOSE)
    sampler = EpisodeSampler(samples, cfg, "meta-train", 0)
    for ep in sampler.episodes(10):
        assert sorted(ep["classes"]) == ["30_a_none", "30_b_none"]
        ids = [it["sample_id"] for it in ep["support"] + ep["query"]]
        assert len(set(ids)) == 20
    # With 12 shared samples the two classes cannot both get 10 unused ones.
    tight_cfg = dataclasses.replace(cfg, min_class_size={CHOOSE: 10})
    tight = EpisodeSampler(samples[:12], tight_cfg, "meta-train", 0)
    with pytest.raises(EpisodeError, match="could not find 10 unused samples per class"):
        tight.episode(0)


def test_errors_name_the_counts():
    samples = world(2, 2)
    with pytest.raises(
        EpisodeError,
        match=r"meta-train single-verify \(class split\): 3 eligible classes of 3, fewer than n_way=5",
    ):
        EpisodeSampler(samples, small_cfg(), "meta-train", 0)
    with pytest.raises(
        EpisodeError, match=r"0 eligible classes of 4.*= 20 \+ 5 = 25 samples \(largest group here: 20\)"
    ):
        EpisodeSampler(
            world(2, 2, per_class=20), small_cfg(meta_train_fraction=1.0, n_way=2, k_shot=20), "meta-train", 0
        )
    with pytest.raises(EpisodeError, match="split 'train': expected one of"):
        EpisodeSampler(samples, small_cfg(), "train", 0)
    with pytest.raises(EpisodeError, match="episodes.k_shot must be >= 1, got 0"):
        EpisodeSampler(samples, small_cfg(k_shot=0), "meta-train", 0)
    with pytest.raises(EpisodeError, match="sample_id 0 occurs twice"):
        EpisodeSampler(samples + samples[:1], small_cfg(), "meta-train", 0)


def test_real_shard_episodes(shard):
    cfg = EpisodeConfig(n_way=2, meta_train_fraction=1.0, meta_val_fraction=0.0)
    ep = EpisodeSampler(shard, cfg, "meta-train", seed=0).episode(0)
    assert set(ep["classes"]) <= {"27_baseline drift_no", "27_burst noise_no", "27_static noise_no"}
    assert all(it["answer"] == ["no"] and it["template_id"] == 27 for it in ep["support"] + ep["query"])
    with pytest.raises(
        EpisodeError, match="meta-train single-verify \\(class split\\): 2 eligible classes of 2"
    ):
        EpisodeSampler(shard, EpisodeConfig(meta_val_fraction=0.0), "meta-train", 0)


# ----------------------------------------------------------------------------- CLI


def write_qa_parquet(prepared_dir, samples, source="ptbxl", variant="template"):
    """A tiny `qa/` table with the columns of docs/architecture.md."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("sample_id", pa.int64()), ("template_id", pa.int32()), ("question_id", pa.int32()),
        ("question_type", pa.string()), ("attribute_type", pa.string()), ("question", pa.string()),
        ("answer", pa.list_(pa.string())), ("ecg_id", pa.list_(pa.int64())),
        ("attribute", pa.list_(pa.string())), ("source", pa.string()), ("variant", pa.string()),
        ("split", pa.string()),
    ])  # fmt: skip
    rows = [{**s, "source": source, "variant": variant, "split": s.get("split", "train")} for s in samples]
    (prepared_dir / "qa").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), prepared_dir / "qa" / "part-00000.parquet")


def test_cli_help_and_bad_dir(tmp_path, capsys):
    from ecgray.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["episodes", "--help"])
    assert exit_info.value.code == 0 and "--k-shot" in capsys.readouterr().out
    assert main(["episodes", "--data", str(tmp_path)]) == 2
    assert f"{tmp_path}: no qa/ folder" in capsys.readouterr().err


def test_cli_prints_episodes_from_a_qa_table(tmp_path, capsys):
    pytest.importorskip("ecgray.data.shards", reason="read_qa (ecgray/data/shards.py) has not landed yet")
    from ecgray.cli import main

    samples = world(split_of=lambda i: "train" if i < 15 else "test")
    write_qa_parquet(tmp_path, samples)
    args = ["episodes", "--data", str(tmp_path), "--question-type", VERIFY, "--n-way", "2", "--k-shot", "3",
            "--n-query", "2", "--split", "meta-test", "--count", "4", "--seed", "7",
            "--set", "episodes.min_class_size.single-verify=20"]  # fmt: skip
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    episodes = [json.loads(line) for line in lines]
    cfg = small_cfg(n_way=2, k_shot=3, n_query=2)
    assert episodes == EpisodeSampler(samples, cfg, "meta-test", seed=7).episodes(4)
    assert all(len(ep["support"]) == 6 and len(ep["query"]) == 4 for ep in episodes)
    # patient mode: meta-test episodes only use ECG-QA test-split samples (sample i >= 15 of each class).
    assert main([*args, "--split-mode", "patient"]) == 0
    for line in capsys.readouterr().out.splitlines():
        ep = json.loads(line)
        assert all(it["sample_id"] % 30 >= 15 for it in ep["support"] + ep["query"])
    assert main([*args, "--n-way", "9"]) == 2
    assert "fewer than n_way=9" in capsys.readouterr().err


def test_patient_mode_on_real_ecg_ids_shares_no_patient(shared_data):
    """Samples on real PTB-XL ECG ids, split as ECG-QA splits them: no patient on both sides."""
    import csv

    ecgqa = shared_data / "ecgqa/ptbxl"
    split_of_ecg = {}
    for split in ("train", "test"):
        rows = [line.split("\t") for line in (ecgqa / f"{split}_ecgs.tsv").read_text().splitlines()]
        split_of_ecg.update({int(ecg): split for _, ecg in rows})
    with open(shared_data / "ptbxl/ptbxl_database_subset.csv", newline="") as f:
        patient_of = {int(r["ecg_id"]): int(float(r["patient_id"])) for r in csv.DictReader(f)}
    ids = {
        s: sorted(e for e, sp in split_of_ecg.items() if sp == s and e in patient_of)
        for s in ("train", "test")
    }
    samples = world(split_of=lambda i: "train" if i < 15 else "test")
    counters = {"train": 0, "test": 0}
    for s in samples:
        s["ecg_id"] = [ids[s["split"]][counters[s["split"]]]]
        counters[s["split"]] += 1
    cfg = small_cfg(split_mode="patient", n_way=3)
    patients = {}
    for side in ("meta-train", "meta-test"):
        episodes = EpisodeSampler(samples, cfg, side, seed=0).episodes(20)
        patients[side] = {patient_of[it["ecg_id"]] for ep in episodes for it in ep["support"] + ep["query"]}
    assert len(patients["meta-train"]) > 50 and len(patients["meta-test"]) > 20
    assert not patients["meta-train"] & patients["meta-test"]


# ----------------------------------------------------------------------------- meta-val, disjointness


def side_samples(sides) -> dict[str, set]:
    return {
        side: {sample_identity(x) for groups in classes.values() for g in groups.values() for x in g}
        for side, classes in sides.items()
    }


def test_meta_val_is_carved_from_the_meta_train_side_and_leaves_meta_test_alone():
    classes = build_classes(world(), VERIFY, small_cfg())
    two_way = split_classes(classes, small_cfg())
    three_way = split_classes(classes, small_cfg(meta_val_fraction=0.25))
    assert set(three_way["meta-test"]) == set(two_way["meta-test"])
    assert set(three_way["meta-train"]) | set(three_way["meta-val"]) == set(two_way["meta-train"])
    assert (len(three_way["meta-train"]), len(three_way["meta-val"])) == (12, 4)  # 16 * 0.75
    assert not set(three_way["meta-train"]) & set(three_way["meta-val"])
    other = split_classes(classes, small_cfg(meta_val_fraction=0.25, meta_val_seed=5))
    assert set(other["meta-val"]) != set(three_way["meta-val"])
    with pytest.raises(EpisodeError, match="meta_val_fraction must lie in"):
        split_classes(classes, small_cfg(meta_val_fraction=1.0))
    # patient mode: meta-val keeps ECG-QA's valid split
    cfg = small_cfg(split_mode="patient", meta_val_fraction=0.25)
    samples = world(split_of=lambda i: "train" if i < 12 else "valid" if i < 24 else "test")
    sides = split_classes(build_classes(samples, VERIFY, cfg), cfg)
    assert {s[2] for s in side_samples(sides)["meta-val"]} == {"valid"}


def test_no_sample_sits_on_two_sides_single_choose_none():
    """A paper single-choose `none` sample is filed under one key per attribute, and the keys split
    independently: it must still end up on one side only."""
    cfg = small_cfg(question_type=CHOOSE, meta_val_fraction=0.2)
    samples, sid = [], 0
    for t in range(12):
        tid, attrs = 200 + t, [f"a{t}", f"b{t}"]
        for answer in ([f"a{t}"], [f"b{t}"], ["none"]):
            samples += group(20, tid, answer, attrs, CHOOSE, qid=tid, first_sid=sid)
            sid += 20
    sides = split_classes(build_classes(samples, CHOOSE, cfg), cfg)
    members = side_samples(sides)
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not members[a] & members[b], (a, b)
    # the case arises: some none samples had their two keys on different sides of the documented key split
    train_val, _ = seeded_split(build_classes(samples, CHOOSE, cfg), cfg.meta_train_fraction, cfg.split_seed)
    first = set(train_val)
    split_none = [
        t for t in range(12) if (f"{200 + t}_a{t}_none" in first) != (f"{200 + t}_b{t}_none" in first)
    ]
    assert split_none, "no none sample straddles the split: the test would not exercise the rule"
    assert all(members.values())


def grounded_cfg(**changes) -> EpisodeConfig:
    kw = {"protocol": "grounded", "n_way": 4, "k_shot": 2, "n_query": 2, "meta_val_fraction": 0.2}
    return small_cfg(**{**kw, **changes})


def grounded_world(n_questions=20, per_answer=8, qtype=VERIFY):
    """n_questions questions, each with two answers of per_answer samples (verify: yes / no)."""
    samples, sid = [], 0
    for q in range(n_questions):
        tid = 300 + q % 4
        answers = (["yes"], ["no"]) if qtype == VERIFY else ([f"a{q}"], [f"b{q}"])
        for answer in answers:
            samples += group(per_answer, tid, answer, [f"a{q}", f"b{q}"], qtype, qid=q, first_sid=sid)
            sid += per_answer
    return samples


def test_grounded_episodes_ask_every_question_with_two_answers_balanced():
    cfg = grounded_cfg()
    sampler = EpisodeSampler(grounded_world(), cfg, "meta-train", seed=0)
    for ep in sampler.episodes(20):
        assert len(ep["classes"]) == 4 and len(set(ep["classes"])) == 4
        for part, per in (("support", 2), ("query", 2)):
            by_question: dict[str, Counter] = {}
            for it in ep[part]:
                by_question.setdefault(it["question"], Counter())[it["answer"][0]] += 1
            assert len(by_question) == 2
            assert all(c == Counter({"yes": per, "no": per}) for c in by_question.values()), by_question
        ids = [it["sample_id"] for it in ep["support"] + ep["query"]]
        assert len(set(ids)) == len(ids) == 16
    assert sampler.episodes(3) == EpisodeSampler(grounded_world(), cfg, "meta-train", seed=0).episodes(3)


def test_grounded_split_is_per_question():
    cfg = grounded_cfg()
    sides = split_classes(build_classes(grounded_world(), VERIFY, cfg), cfg)
    questions = {side: {q for groups in classes.values() for q in groups} for side, classes in sides.items()}
    assert [len(questions[s]) for s in SPLITS] == [
        12,
        4,
        4,
    ]  # 20 -> 16 / 4, then 16 -> 12 / 4 (0.2 of 16 = 3.2)
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not questions[a] & questions[b]
    # every answer of a question sits on its side: each question keeps both its classes
    for classes in sides.values():
        per_q = Counter(q for groups in classes.values() for q in groups)
        assert set(per_q.values()) == {2}


def test_grounded_size_filter_is_per_answer_class_and_n_way_must_fit():
    # 3 samples per answer < k_shot + n_query = 4: nothing is eligible
    with pytest.raises(EpisodeError, match="0 eligible questions of 12"):
        EpisodeSampler(grounded_world(per_answer=3), grounded_cfg(min_answer_size=3), "meta-train", 0)
    with pytest.raises(EpisodeError, match="n_way=5 must be a multiple of episodes.answers_per_question=2"):
        EpisodeSampler(grounded_world(), grounded_cfg(n_way=5), "meta-train", 0)
    # answers below the minimum drop out of their question; a question left with one answer is not eligible
    lopsided = grounded_world(n_questions=20)
    lopsided = [
        s for s in lopsided if not (s["question_id"] % 2 and s["answer"] == ["no"] and s["sample_id"] % 8 > 2)
    ]
    sampler = EpisodeSampler(lopsided, grounded_cfg(), "meta-train", 0)
    assert all(qid % 2 == 0 for qid, _ in sampler.pools[VERIFY])


def test_grounded_single_choose_none_is_one_answer_of_its_question():
    sample = qa(30, ["none"], ["b", "a"], CHOOSE)
    assert class_keys(sample, CHOOSE, protocol="grounded") == ["30_a+b_none"]
    assert class_keys(sample, CHOOSE) == ["30_a_none", "30_b_none"]


def test_split_keys_are_checked_naming_the_keys():
    cfg = small_cfg(meta_val_fraction=0.25)
    samples = world()
    stored = split_keys(samples, cfg)
    check_split_keys(stored, split_keys(samples, cfg), "data")  # the same data: fine
    moved = split_keys(samples, dataclasses.replace(cfg, split_seed=1))
    with pytest.raises(
        EpisodeError, match=r"data: the data splits differently .*single-verify meta-(train|val|test)"
    ):
        check_split_keys(stored, moved, "data")


# ----------------------------------------------------------------------------- the shortcut, measured


def text_lookup_accuracy(episodes) -> float:
    from ecgray.eval.baselines import text_lookup_answers

    right = [
        sorted(pred) == sorted(item["answer"])
        for ep in episodes
        for pred, item in zip(text_lookup_answers(ep), ep["query"], strict=True)
    ]
    return sum(right) / len(right)


def test_text_lookup_reads_the_paper_protocol_not_the_grounded_one(shard):
    """On the real shard (template 27, 4 questions with yes and no), the question text names the answer of
    a paper-protocol episode, and cannot in a grounded one."""
    common = {"n_way": 2, "meta_train_fraction": 1.0, "meta_val_fraction": 0.0}
    paper = EpisodeSampler(shard, EpisodeConfig(**common), "meta-train", seed=0).episodes(20)
    assert text_lookup_accuracy(paper) == 1.0
    grounded_cfg_ = EpisodeConfig(protocol="grounded", **common)
    grounded = EpisodeSampler(shard, grounded_cfg_, "meta-train", seed=0).episodes(20)
    assert all(len({it["answer"][0] for it in ep["support"]}) == 2 for ep in grounded)
    assert text_lookup_accuracy(grounded) <= 0.6


@pytest.mark.slow
def test_text_lookup_on_grounded_episodes_of_the_synthetic_world(tmp_path_factory):
    from ecgray.data.ecgqa import read_split
    from ecgray.synth.world import generate_world

    out = tmp_path_factory.mktemp("synth")
    generate_world(out, 120, seed=0, progress=False)
    rows = [
        {**s, "split": split}
        for split in ("train", "valid", "test")
        for s in read_split(out / "ecgqa", "ptbxl", "template", split)
    ]
    for qt in (VERIFY, CHOOSE):
        cfg = EpisodeConfig(question_type=qt, protocol="grounded", n_way=2, k_shot=3, n_query=3)
        episodes = EpisodeSampler(rows, cfg, "meta-test", seed=0).episodes(20)
        for ep in episodes:
            answers_by_question: dict[str, set] = {}
            for it in ep["support"] + ep["query"]:
                answers_by_question.setdefault(it["question"], set()).add(tuple(it["answer"]))
            assert all(len(a) >= 2 for a in answers_by_question.values())
        assert text_lookup_accuracy(episodes) <= 0.6, qt


# ----------------------------------------------------------------------- comparison questions (two ECGs)

CIQ, CIV, CCV = "comparison_irrelevant-query", "comparison_irrelevant-verify", "comparison_consecutive-verify"


def pair(tid, answer, qtype=CIV, qid=1, sid=0, ecgs=(1, 2), split=None, ecg_split=None):
    """A comparison sample: two ECG ids (first, second), no attributes (as ECG-QA writes them)."""
    sample = qa(tid, answer, None, qtype, qid, sid, split=split) | {"ecg_id": list(ecgs)}
    if ecg_split is not None:
        sample["ecg_split"] = list(ecg_split)
    return sample


def test_comparison_types_are_chosen_by_config_and_the_defaults_stay_single():
    from ecgray.config import COMPARISON_TYPES, SINGLE_TYPES, load_config

    assert EpisodeConfig().mixed_types == SINGLE_TYPES == [VERIFY, CHOOSE, QUERY]
    assert EpisodeConfig().types() == [VERIFY]
    cfg = load_config(None, [f"episodes.question_type={CIQ}", f"eval.episodes_by_type={{{CIQ}: 3}}"])
    assert cfg.episodes.types() == [CIQ] and cfg.eval.episodes_for(CIQ) == 3
    mixed = load_config(None, ["episodes.question_type=mixed", f"episodes.mixed_types=[{VERIFY}, {CCV}]"])
    assert mixed.episodes.types() == [VERIFY, CCV]
    assert set(COMPARISON_TYPES) <= set(EpisodeConfig().min_class_size)
    assert [ecgs_per_sample(qt) for qt in [*SINGLE_TYPES, *COMPARISON_TYPES]] == [1, 1, 1, 2, 2, 2, 2]


def test_comparison_keys_verify_yes_no_and_query_answer_sets():
    # verify: yes / no under the question (its subject lives in the text: one question_id per subject)
    assert class_keys(pair(57, ["yes"], qid=511), CIV) == ["57_q511_yes"]
    assert class_keys(pair(43, ["no"], CCV, qid=7), CCV) == ["43_q7_no"]
    assert class_keys(pair(57, ["not sure"]), CIV) == []
    with pytest.raises(EpisodeError, match="comparison_irrelevant-verify answer must be one of yes / no"):
        class_keys(pair(57, ["both"]), CIV)
    # query: the answer set, order-free; none (ECG-QA's empty set) is its own class
    a, b = (
        pair(69, ["rr interval", "qrs duration"], CIQ, qid=2471),
        pair(69, ["qrs duration", "rr interval"], CIQ, qid=2471),
    )
    assert class_keys(a, CIQ) == class_keys(b, CIQ) == ["69_q2471_qrs duration, rr interval"]
    assert class_answer(a, CIQ) == ["qrs duration", "rr interval"]
    assert class_keys(pair(70, ["none"], CIQ, qid=2472), CIQ) == ["70_q2472_none"]
    assert class_keys(pair(70, ["none"], CIQ, qid=2472), CIQ, protocol="grounded") == ["70_q2472_none"]


@pytest.mark.parametrize(
    "path, n, keys_per_template, paper, grounded",
    [
        # PTB-XL test shard: 2 questions; ECG-QA balances it, 25 samples per answer set, `none` 50
        ("ptbxl/template/test/80000.json", 2146, {"69": 22, "70": 64}, ["70_q2472_none"], {2471: 21, 2472: 64}),
        ("mimic-iv-ecg/template/test/270000.json", 4364, {"68": 55, "69": 64, "70": 53},
         ["69_q5342_none", "70_q5343_none"], {5341: 55, 5342: 64, 5343: 53}),
    ],
)  # fmt: skip
def test_comparison_keys_of_the_real_samples(shared_data, path, n, keys_per_template, paper, grounded):
    """The real comparison_irrelevant-query samples (PTB-XL and MIMIC-IV-ECG): one key per answer set of
    each question, whatever order ECG-QA lists the answers in; the paper's size filter (>= 50) keeps the
    `none` classes only, the grounded one (>= k_shot + n_query) nearly every answer of every question."""
    from ecgray.data.episodes import questions_of

    samples = json.loads((shared_data / "ecgqa" / path).read_text())
    assert len(samples) == n and {s["question_type"] for s in samples} == {CIQ}
    assert all(len(s["ecg_id"]) == 2 and s["attribute"] is None for s in samples)
    keys = Counter(k for s in samples for k in class_keys(s, CIQ))
    assert sum(keys.values()) == n  # every sample has exactly one key
    assert dict(Counter(k.split("_")[0] for k in keys)) == keys_per_template
    shuffled = [s for s in samples if s["answer"] != sorted(s["answer"])]
    assert len(shuffled) > n // 4  # ECG-QA's answer lists are unordered: the rule has work to do
    for s in shuffled[:50]:
        assert class_keys(s, CIQ) == class_keys({**s, "answer": sorted(s["answer"])}, CIQ)
    assert sorted(build_classes(samples, CIQ, EpisodeConfig(question_type=CIQ))) == paper
    g = EpisodeConfig(question_type=CIQ, protocol="grounded", n_way=4)
    assert {q: len(a) for q, a in questions_of(build_classes(samples, CIQ, g)).items()} == grounded
    # grounded episodes on the real pairs: each item carries both ECG ids, in ECG-QA's order
    by_id = {s["sample_id"]: s for s in samples}
    episodes = EpisodeSampler(samples, dataclasses.replace(g, meta_train_fraction=1.0, meta_val_fraction=0.0),
                              "meta-train", seed=0).episodes(5)  # fmt: skip
    for ep in episodes:
        for it in ep["support"] + ep["query"]:
            assert it["ecg_id"] == by_id[it["sample_id"]]["ecg_id"] and item_ecg_ids(it) == it["ecg_id"]
            assert it["question_type"] == CIQ and it["answer"] == sorted(by_id[it["sample_id"]]["answer"])


def _real_pairs(shared_data):
    """ECG-QA's PTB-XL split of each real ECG id that has a patient in the PTB-XL subset, and the patients."""
    import csv

    ecgqa = shared_data / "ecgqa/ptbxl"
    split_of_ecg = {}
    for split in ("train", "valid", "test"):
        rows = [line.split("\t") for line in (ecgqa / f"{split}_ecgs.tsv").read_text().splitlines()]
        split_of_ecg.update({int(ecg): split for _, ecg in rows})
    with open(shared_data / "ptbxl/ptbxl_database_subset.csv", newline="") as f:
        patient_of = {int(r["ecg_id"]): int(float(r["patient_id"])) for r in csv.DictReader(f)}
    ids = {
        s: sorted(e for e, sp in split_of_ecg.items() if sp == s and e in patient_of)
        for s in ("train", "valid", "test")
    }
    return ids, patient_of


@pytest.mark.parametrize("protocol", ["paper", "grounded"])
def test_patient_split_keeps_both_ecgs_of_a_comparison_sample_on_one_side(shared_data, protocol):
    """Comparison samples on real PTB-XL ECG ids, both ECGs from the sample's ECG-QA split, plus samples
    whose second ECG is another split's (straddling): under the patient split no sample and no patient
    (of either ECG) sits on two sides, and every straddling sample is dropped and counted."""
    ids, patient_of = _real_pairs(shared_data)
    split_of = {"train": lambda i: i < 14, "valid": lambda i: 14 <= i < 21}
    samples, sid, used = [], 0, {s: 0 for s in ids}
    other = {"train": "test", "valid": "train", "test": "train"}
    for q in range(16):
        for answer in (["yes"], ["no"]):
            for i in range(30):
                split = next((s for s, f in split_of.items() if f(i)), "test")
                first, second = ids[split][used[split]], ids[split][used[split] + 1]
                used[split] += 2
                ecg_split = [split, split]
                if i % 10 == 3:  # the second ECG from another split: its patient is on another side
                    second, ecg_split = ids[other[split]][-1 - sid % 50], [split, other[split]]
                samples.append(pair(300 + q % 4, answer, CIV, qid=q, sid=sid, ecgs=(first, second),
                                    split=split, ecg_split=ecg_split))  # fmt: skip
                sid += 1
    straddling = [s for s in samples if s["ecg_split"][0] != s["ecg_split"][1]]
    assert straddling_samples(samples) == straddling and len(straddling) == 96
    kw = {"protocol": protocol, "n_way": 4 if protocol == "grounded" else 3, "k_shot": 2, "n_query": 2,
          "split_mode": "patient", "meta_val_fraction": 0.25, "min_group_size": 4}  # fmt: skip
    cfg = small_cfg(question_type=CIV, **kw, min_class_size={CIV: 8})
    sides = split_classes(build_classes(samples, CIV, cfg), cfg)
    members = side_samples(sides)
    dropped = {sample_identity(s) for s in straddling}
    patients = {}
    for side in SPLITS:
        assert members[side] and not members[side] & dropped
        sampler = EpisodeSampler(samples, cfg, side, seed=0)
        assert sampler.straddling == len(straddling)
        episodes = sampler.episodes(10)
        ecgs = [e for ep in episodes for it in ep["support"] + ep["query"] for e in item_ecg_ids(it)]
        assert all(len(it["ecg_id"]) == 2 for ep in episodes for it in ep["support"] + ep["query"])
        patients[side] = {patient_of[e] for e in ecgs}
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not members[a] & members[b], (a, b)
                assert not patients[a] & patients[b], (a, b)
    # without the patient split nothing is dropped (the class split never promised disjoint patients)
    class_cfg = dataclasses.replace(cfg, split_mode="class")
    kept = set().union(
        *side_samples(split_classes(build_classes(samples, CIV, class_cfg), class_cfg)).values()
    )
    assert dropped & kept
    assert EpisodeSampler(samples, class_cfg, "meta-train", seed=0).straddling == 0


def test_straddling_needs_one_split_per_ecg_and_is_logged(caplog):
    assert not straddles(pair(57, ["yes"], split="train"))  # no ecg_split: nothing to check
    assert not straddles(pair(57, ["yes"], split="train", ecg_split=["train", "train"]))
    assert straddles(pair(57, ["yes"], split="test", ecg_split=["test", "valid"]))
    assert straddles(qa(27, ["no"], ["x"], split="train") | {"ecg_split": ["test"]})
    with pytest.raises(EpisodeError, match=r"ecg_split \['train'\] does not name the split of each of its 2"):
        straddles(pair(57, ["yes"], split="train", ecg_split=["train"]))
    samples, sid = [], 0
    for q in range(10):
        for i in range(12):
            split = "train" if i < 6 else "test"
            ecg_split = [split, "valid" if i == 5 else split]
            samples.append(pair(57, ["yes"], qid=q, sid=sid, ecgs=(2 * sid, 2 * sid + 1), split=split,
                                ecg_split=ecg_split))  # fmt: skip
            sid += 1
    cfg = small_cfg(question_type=CIV, split_mode="patient", n_way=2, k_shot=2, n_query=2,
                    min_group_size=4, min_class_size={CIV: 4})  # fmt: skip
    with caplog.at_level("WARNING", logger="ecgray.data.episodes"):
        sampler = EpisodeSampler(samples, cfg, "meta-train", seed=0)
    assert sampler.straddling == 10 and "10 samples dropped from every side" in caplog.text
    assert all(sample_identity(s) not in {sample_identity(x) for x in straddling_samples(samples)}
               for ep in sampler.episodes(5) for s in ep["support"] + ep["query"])  # fmt: skip


def test_comparison_episodes_of_the_synthetic_world_carry_both_ecgs_in_order(tmp_path_factory):
    """The synthetic world writes the four comparison types with two ECG ids of one split; grounded and
    paper episodes of them keep both ids (first, second) and every question with two answers (grounded)."""
    from ecgray.config import COMPARISON_TYPES
    from ecgray.data.ecgqa import read_split, read_split_ecgs
    from ecgray.synth.world import generate_world

    out = tmp_path_factory.mktemp("synth")
    generate_world(out, 60, seed=0, progress=False)
    split_of = read_split_ecgs(out / "ecgqa", "ptbxl")
    for split in ("train", "valid", "test"):  # both ECGs of every comparison sample lie in its split
        for s in read_split(out / "ecgqa", "ptbxl", "template", split):
            if s["question_type"] in COMPARISON_TYPES:
                assert [split_of[e] for e in s["ecg_id"]] == [split, split]
    rows = read_split(out / "ecgqa", "ptbxl", "template", "train")  # sample ids are unique within a split
    assert {s["question_type"] for s in rows} >= set(COMPARISON_TYPES)
    by_id = {s["sample_id"]: s for s in rows}
    for qt in COMPARISON_TYPES:
        for protocol in ("grounded", "paper"):
            cfg = EpisodeConfig(question_type=qt, protocol=protocol, n_way=2, k_shot=2, n_query=2,
                                min_group_size=4, min_class_size={qt: 4}, meta_train_fraction=1.0,
                                meta_val_fraction=0.0)  # fmt: skip
            for ep in EpisodeSampler(rows, cfg, "meta-train", seed=0).episodes(4):
                for it in ep["support"] + ep["query"]:
                    assert it["ecg_id"] == by_id[it["sample_id"]]["ecg_id"] and len(set(it["ecg_id"])) == 2
                if protocol == "grounded":
                    answers: dict[str, set] = {}
                    for it in ep["support"]:
                        answers.setdefault(it["question"], set()).add(tuple(it["answer"]))
                    assert all(len(a) == 2 for a in answers.values())


@pytest.mark.slow
def test_the_demo_split_keeps_every_meta_test_patient_out_of_every_trained_stage(tmp_path):
    """The demo's split (configs/demo.yaml) is patient-disjoint: from the class keys a checkpoint stores
    (`split_keys`), no patient of a meta-test item has an ECG in a meta-train or meta-val item, nor in the
    prepared `train` split that encoder pretraining and alignment read (ECG-QA's splits are patient-disjoint,
    and the patient split keeps each side inside one of them)."""
    import csv
    from pathlib import Path

    from ecgray.config import load_config
    from ecgray.data.ecgqa import read_split, read_split_ecgs
    from ecgray.data.episodes import SPLITS, item_ecg_ids, split_keys
    from ecgray.synth.world import generate_world

    demo = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    assert demo.episodes.split_mode == "patient" and demo.episodes.protocol == "grounded"
    generate_world(tmp_path, 600, seed=0, progress=False)
    rows = [
        s
        for split in ("train", "valid", "test")
        for s in read_split(tmp_path / "ecgqa", "ptbxl", "template", split)
    ]
    with open(tmp_path / "ptbxl" / "ptbxl_database.csv", newline="") as f:
        patient_of = {int(r["ecg_id"]): int(float(r["patient_id"])) for r in csv.DictReader(f)}
    ecg_split = read_split_ecgs(tmp_path / "ecgqa", "ptbxl")
    trained_on = {patient_of[e] for e, split in ecg_split.items() if split == "train"}  # encoder, alignment

    small = dataclasses.replace(demo.episodes, n_way=2, k_shot=2, n_query=1)  # 600 patients: small episodes
    stored = split_keys(rows, small)  # what the checkpoint's splits.json holds
    for qt in small.types():
        keys = {side: set(stored[qt][side]) for side in SPLITS}
        assert not keys["meta-test"] & (keys["meta-train"] | keys["meta-val"]), qt
        patients = {}
        for side in SPLITS:
            pool = EpisodeSampler(rows, dataclasses.replace(small, question_type=qt), side, seed=0).pools[qt]
            assert {key for _, answers in pool for key, _ in answers} <= keys[side], (qt, side)
            patients[side] = {
                patient_of[e] for _, answers in pool for _, group in answers for _, item in group
                for e in item_ecg_ids(item)
            }  # fmt: skip
        assert patients["meta-test"], qt
        assert not patients["meta-test"] & (patients["meta-train"] | patients["meta-val"] | trained_on), qt
        assert not patients["meta-val"] & patients["meta-train"], qt

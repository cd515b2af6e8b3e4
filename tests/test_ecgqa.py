"""ECG-QA v1.0.2 readers on the real samples, and their errors on malformed input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from ecgray.data import ecgqa
from ecgray.data.ecgqa import ECGQAError


@pytest.fixture(scope="module")
def root(shared_data) -> Path:
    return shared_data / "ecgqa"


def test_real_template_train_shard(root):
    samples = ecgqa.read_split(root, "ptbxl", "template", "train")
    assert len(samples) == 10_000
    assert Counter(s["question_type"] for s in samples) == {"single-verify": 10_000}
    assert Counter(s["template_id"] for s in samples) == {26: 5528, 28: 3434, 27: 1038}
    first = samples[0]
    assert first == {
        "sample_id": 120000,
        "template_id": 26,
        "question_id": 1709,
        "question_type": "single-verify",
        "attribute_type": "noise",
        "question": "Does this ECG show static noise in lead aVL?",
        "answer": ["no"],
        "ecg_id": [3637],
        "attribute": ["static noise"],
        "source": "ptbxl",
        "variant": "template",
        "split": "train",
    }
    # method.md section 1: template 27 has 1,038 samples, 715 "no" and 323 "yes"
    t27 = Counter(tuple(s["answer"]) for s in samples if s["template_id"] == 27)
    assert t27 == {("no",): 715, ("yes",): 323}


def test_real_comparison_samples_carry_two_ids_and_null_attribute(root):
    for variant in ecgqa.VARIANTS:
        samples = ecgqa.read_split(root, "ptbxl", variant, "test")
        assert len(samples) == 2146
        assert all(s["question_type"] == "comparison_irrelevant-query" for s in samples)
        assert all(len(s["ecg_id"]) == 2 and s["attribute"] is None for s in samples)
    mimic = ecgqa.read_split(root, "mimic", "template", "test")
    assert (
        len(mimic) == 4364 and mimic[0]["ecg_id"] == [43402541, 41006988] and mimic[0]["answer"] == ["none"]
    )
    assert ecgqa.read_split(root, "mimic", "paraphrased", "train") == []  # not in the sample: nothing


def test_paraphrased_shares_ids_with_template(root):
    t = ecgqa.read_split(root, "ptbxl", "template", "train")
    p = ecgqa.read_split(root, "ptbxl", "paraphrased", "train")
    assert [s["sample_id"] for s in t] == [s["sample_id"] for s in p]
    assert [s["question_id"] for s in t] == [s["question_id"] for s in p]
    assert sum(a["question"] != b["question"] for a, b in zip(t, p, strict=True)) > 5000


def test_answers_and_template_answers(root):
    answers = ecgqa.read_answers(root, "ptbxl")
    assert len(answers) == 104 and answers[:3] == ["no", "not sure", "yes"] and "none" in answers
    assert len(ecgqa.read_answers(root, "mimic")) == 188
    per_template = ecgqa.read_template_answers(root, "ptbxl")
    assert len(per_template) == 70 and per_template[1] == ["no", "not sure", "yes"]
    assert all(set(v) <= set(answers) for v in per_template.values())
    assert len(ecgqa.read_template_answers(root, "mimic")) == 60


def test_split_ecgs_and_their_samples(root):
    splits = ecgqa.read_split_ecgs(root, "ptbxl")
    assert Counter(splits.values()) == {"train": 11566, "test": 3214, "valid": 1274}
    assert splits[1] == "test" and splits[3] == "train" and splits[2] == "valid"
    train_ids = ecgqa.ecg_ids(ecgqa.read_split(root, "ptbxl", "template", "train"))
    assert len(train_ids) == 4774 and {splits[i] for i in train_ids} == {"train"}
    assert ecgqa.read_split_ecgs(root, "mimic") == {}


def test_record_paths(tmp_path):
    assert ecgqa.ptbxl_record_path("/d", 3637) == Path("/d/records500/03000/03637_hr")
    (tmp_path / "record_list.csv").write_text(
        "subject_id,study_id,file_name,ecg_time,path\n1,43402541,43402541,2150-01-01,files/p1/s43402541/43402541\n"
    )
    from ecgray.data.ptbxl import read_mimic_record_list

    rl = read_mimic_record_list(tmp_path)
    assert ecgqa.mimic_record_path(tmp_path, rl, 43402541) == tmp_path / "files/p1/s43402541/43402541"


GOOD = {
    "template_id": 1,
    "question_id": 2,
    "sample_id": 3,
    "question_type": "single-verify",
    "attribute_type": "scp_code",
    "question": "q?",
    "answer": ["yes"],
    "ecg_id": [5],
    "attribute": ["x"],
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"answer": "yes"}, r"field 'answer' must be a non-empty list"),
        ({"ecg_id": [5, 6]}, r"single-verify needs 1 integer ecg_id, got \[5, 6\]"),
        ({"question_type": "multi"}, r"question_type 'multi' is not one of"),
        ({"template_id": "1"}, r"field 'template_id' must be an integer"),
        ({"attribute": "x"}, r"field 'attribute' must be a list of strings or null"),
    ],
)
def test_malformed_samples_name_file_and_sample(tmp_path, change, message):
    path = tmp_path / "0.json"
    path.write_text(json.dumps([GOOD, {**GOOD, **change}]))
    with pytest.raises(ECGQAError, match=rf"0\.json: sample 1 \(sample_id 3\): {message}"):
        ecgqa.read_samples(path)


def test_missing_field_bad_json_and_duplicates(tmp_path):
    bad = dict(GOOD)
    del bad["question"]
    (tmp_path / "a.json").write_text(json.dumps([bad]))
    with pytest.raises(ECGQAError, match=r"a\.json: sample 0 \(sample_id 3\): field 'question' missing"):
        ecgqa.read_samples(tmp_path / "a.json")
    (tmp_path / "b.json").write_text("[{")
    with pytest.raises(ECGQAError, match=r"b\.json: not valid JSON"):
        ecgqa.read_samples(tmp_path / "b.json")
    folder = tmp_path / "ptbxl" / "template" / "train"
    folder.mkdir(parents=True)
    (folder / "0.json").write_text(json.dumps([GOOD]))
    (folder / "10.json").write_text(json.dumps([GOOD]))
    with pytest.raises(ECGQAError, match=r"10\.json: sample_id 3 also in .*0\.json"):
        ecgqa.read_split(tmp_path, "ptbxl", "template", "train")

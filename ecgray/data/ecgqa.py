"""ECG-QA v1.0.2 (PTB-XL and MIMIC-IV-ECG versions): samples, answer vocabularies, ECG splits, record paths.

Layout (per version dir `ptbxl/` or `mimic-iv-ecg/`): answers.csv, answers_for_each_template.csv,
{train,valid,test}_ecgs.tsv, {template,paraphrased}/{train,valid,test}/NNNNN.json. Every `ecgqa_dir` argument
is the ECG-QA root (holding `ptbxl/` and/or `mimic-iv-ecg/`) or one of those version folders (`version_dir`).
"""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

# ECG id -> record path, re-exported here: PTB-XL ids through `ptbxl_record_path(ptbxl_dir, ecg_id, fs)`
# (records500/{(id//1000)*1000:05d}/{id:05d}_hr); MIMIC ids are study_ids, resolved through record_list.csv by
# `mimic_record_path(mimic_dir, read_mimic_record_list(mimic_dir), study_id)`.
from ecgray.data.ptbxl import mimic_record_path, read_mimic_record_list  # noqa: F401
from ecgray.data.ptbxl import record_path as ptbxl_record_path  # noqa: F401

QUESTION_TYPES = [
    "single-verify",
    "single-choose",
    "single-query",
    "comparison_consecutive-verify",
    "comparison_consecutive-query",
    "comparison_irrelevant-verify",
    "comparison_irrelevant-query",
]
SOURCES = {"ptbxl": "ptbxl", "mimic": "mimic-iv-ecg"}
"""source name -> version folder inside the ECG-QA root."""
VARIANTS = ["template", "paraphrased"]
SPLITS = ["train", "valid", "test"]


class ECGQAError(ValueError):
    """A malformed ECG-QA file; the message names the file and the sample."""


VERSION_ENTRIES = ("template", "paraphrased", "answers.csv", "train_ecgs.tsv", "test_ecgs.tsv")
"""Names of which a version folder holds at least one."""


def is_version_dir(folder: str | Path) -> bool:
    """True when folder has the contents of an ECG-QA version folder (template/, answers.csv, ...)."""
    return any((Path(folder) / name).exists() for name in VERSION_ENTRIES)


def version_dir(ecgqa_dir: str | Path, source: str) -> Path:
    """ECG-QA root + source ("ptbxl" | "mimic") -> the version folder (which may not exist).

    `ecgqa_dir` may also be that version folder itself (`.../ecgqa/ptbxl` for "ptbxl", `.../mimic-iv-ecg`
    for "mimic"); then it is the version folder of its own source only.
    """
    if source not in SOURCES:
        raise ValueError(f"ECG-QA source {source!r}: expected one of {list(SOURCES)}")
    root = Path(ecgqa_dir)
    child = root / SOURCES[source]
    if not child.is_dir() and root.name == SOURCES[source] and is_version_dir(root):
        return root
    return child


def _check_sample(raw, where: str) -> dict:
    if not isinstance(raw, dict):
        raise ECGQAError(f"{where}: expected an object, got {type(raw).__name__}")

    def field(name, kind):
        if name not in raw:
            raise ECGQAError(f"{where}: field {name!r} missing")
        value = raw[name]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ECGQAError(f"{where}: field {name!r} must be an integer, got {value!r}")
        if kind is str and not isinstance(value, str):
            raise ECGQAError(f"{where}: field {name!r} must be a string, got {value!r}")
        return value

    sample_id = field("sample_id", int)
    where = f"{where} (sample_id {sample_id})"
    question_type = field("question_type", str)
    if question_type not in QUESTION_TYPES:
        raise ECGQAError(f"{where}: question_type {question_type!r} is not one of {QUESTION_TYPES}")
    answer = field("answer", list)
    if not isinstance(answer, list) or not all(isinstance(a, str) for a in answer) or not answer:
        raise ECGQAError(f"{where}: field 'answer' must be a non-empty list of strings, got {answer!r}")
    ecg_id = field("ecg_id", list)
    n_ecg = 1 if question_type.startswith("single") else 2
    if (
        not isinstance(ecg_id, list)
        or len(ecg_id) != n_ecg
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in ecg_id)
    ):
        raise ECGQAError(f"{where}: {question_type} needs {n_ecg} integer ecg_id, got {ecg_id!r}")
    attribute = field("attribute", list)
    if attribute is not None and (
        not isinstance(attribute, list) or not all(isinstance(a, str) for a in attribute)
    ):
        raise ECGQAError(f"{where}: field 'attribute' must be a list of strings or null, got {attribute!r}")
    return {
        "sample_id": sample_id,
        "template_id": field("template_id", int),
        "question_id": field("question_id", int),
        "question_type": question_type,
        "attribute_type": field("attribute_type", str),
        "question": field("question", str),
        "answer": list(answer),
        "ecg_id": list(ecg_id),
        "attribute": None if attribute is None else list(attribute),
    }


def read_samples(path: str | Path) -> list[dict]:
    """One ECG-QA JSON shard -> validated sample dicts (answer and attribute as lists, ecg_id list[int])."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ECGQAError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, list):
        raise ECGQAError(f"{path}: expected a JSON list of samples, got {type(raw).__name__}")
    return [_check_sample(s, f"{path}: sample {i}") for i, s in enumerate(raw)]


def read_split(ecgqa_dir: str | Path, source: str, variant: str, split: str) -> list[dict]:
    """All samples of one source / variant / split, each with `source`, `variant`, `split` added.

    A missing split folder gives []; sample_ids must be unique within it.
    """
    if variant not in VARIANTS or split not in SPLITS:
        raise ValueError(f"ECG-QA variant/split {variant!r}/{split!r}: expected {VARIANTS} / {SPLITS}")
    folder = version_dir(ecgqa_dir, source) / variant / split
    files = sorted(folder.glob("*.json"), key=lambda p: (len(p.stem), p.stem)) if folder.is_dir() else []
    out: list[dict] = []
    seen: dict[int, Path] = {}
    for path in files:
        for sample in read_samples(path):
            if sample["sample_id"] in seen:
                raise ECGQAError(
                    f"{path}: sample_id {sample['sample_id']} also in {seen[sample['sample_id']]}"
                )
            seen[sample["sample_id"]] = path
            sample.update(source=source, variant=variant, split=split)
            out.append(sample)
    return out


def read_answers(ecgqa_dir: str | Path, source: str) -> list[str]:
    """answers.csv (index,class) -> the answer vocabulary in index order."""
    path = version_dir(ecgqa_dir, source) / "answers.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or set(rows[0]) != {"index", "class"}:
        raise ECGQAError(f"{path}: expected columns index,class")
    try:
        indexed = sorted((int(r["index"]), r["class"]) for r in rows)
    except ValueError as err:
        raise ECGQAError(f"{path}: bad index ({err})") from None
    if [i for i, _ in indexed] != list(range(len(indexed))):
        raise ECGQAError(f"{path}: indices are not 0..{len(indexed) - 1}")
    return [c for _, c in indexed]


def read_template_answers(ecgqa_dir: str | Path, source: str) -> dict[int, list[str]]:
    """answers_for_each_template.csv -> template_id -> admissible answers (a Python-literal list per row)."""
    path = version_dir(ecgqa_dir, source) / "answers_for_each_template.csv"
    out: dict[int, list[str]] = {}
    with open(path, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                classes = ast.literal_eval(row["classes"])
                template_id = int(row["template_id"])
            except (KeyError, ValueError, SyntaxError, TypeError):
                raise ECGQAError(
                    f"{path}: line {line}: expected template_id,classes (a Python list)"
                ) from None
            if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
                raise ECGQAError(f"{path}: line {line}: classes {row['classes']!r} is not a list of strings")
            out[template_id] = classes
    return out


def read_split_ecgs(ecgqa_dir: str | Path, source: str) -> dict[int, str]:
    """{train,valid,test}_ecgs.tsv (row_index<TAB>ecg_id, no header) -> ecg_id -> split; absent files skipped."""
    out: dict[int, str] = {}
    folder = version_dir(ecgqa_dir, source)
    for split in SPLITS:
        path = folder / f"{split}_ecgs.tsv"
        if not path.is_file():
            continue
        for line, text in enumerate(path.read_text().splitlines(), start=1):
            if not text.strip():
                continue
            parts = text.split("\t")
            try:
                ecg_id = int(parts[1])
            except (IndexError, ValueError):
                raise ECGQAError(
                    f"{path}: line {line}: expected row_index<TAB>ecg_id, got {text!r}"
                ) from None
            if out.get(ecg_id, split) != split:
                raise ECGQAError(f"{path}: line {line}: ecg_id {ecg_id} is also in the {out[ecg_id]} split")
            out[ecg_id] = split
    return out


def ecg_ids(samples: list[dict]) -> list[int]:
    """Every ECG id the samples refer to, sorted, once each (comparison samples carry two)."""
    return sorted({i for s in samples for i in s["ecg_id"]})

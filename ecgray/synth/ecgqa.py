"""ECG-QA v1.0.2-style questions over the synthetic records: 70 templates (PTB-XL version), seven question
types over six attribute types, answers from ECG-QA's vocabulary and each template's admissible list.

Template ids, answer lists and the noise templates' wordings (26-28) and numeric comparison wordings (68-70)
follow the real files; the other wordings are written in the same style. Each template has several
paraphrases: the `paraphrased` files hold the same samples with one of them.
"""

from __future__ import annotations

import ast
import csv
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from ecgray.synth import vocab

ASSETS = Path(__file__).parent / "assets"

V, C, Q = "single-verify", "single-choose", "single-query"
CCV, CCQ = "comparison_consecutive-verify", "comparison_consecutive-query"
CIV, CIQ = "comparison_irrelevant-verify", "comparison_irrelevant-query"
QUESTION_TYPES_ALL = [V, C, Q, CCV, CCQ, CIV, CIQ]

# template_id -> (question_type, attribute_type, [template wording, paraphrases...])
TEMPLATES: dict[int, tuple[str, str, list[str]]] = {
    1: (V, "scp_code", ["Does this ECG show symptoms of {x}?", "Are there signs of {x} in this ECG?", "Is {x} evident on this ECG?", "Can {x} be seen in this ECG?"]),
    2: (V, "scp_code", ["Does this ECG show {x}?", "Is {x} present in this ECG?", "Can {x} be observed on this ECG?", "Does the ECG reveal {x}?"]),
    3: (Q, "scp_code", ["What diagnostic superclasses does this ECG belong to?", "Which diagnostic superclasses apply to this ECG?", "To which diagnostic superclasses can this ECG be assigned?", "What are the diagnostic superclasses of this ECG?"]),
    4: (C, "scp_code", ["Which symptom does this ECG show including uncertain symptoms, {a} or {b}?", "Including uncertain findings, which of {a} or {b} does this ECG show?", "Counting uncertain symptoms too, does this ECG show {a} or {b}?"]),
    5: (C, "scp_code", ["Which symptom does this ECG show, {a} or {b}?", "Does this ECG show {a} or {b}?", "Which of these does the ECG show: {a} or {b}?", "Between {a} and {b}, which is present in this ECG?"]),
    6: (C, "scp_code", ["Which form-related symptom does this ECG show, {a} or {b}?", "Which form abnormality is present in this ECG, {a} or {b}?", "Does this ECG show the form finding {a} or {b}?"]),
    7: (C, "scp_code", ["Which rhythm does this ECG show, {a} or {b}?", "Is the rhythm of this ECG {a} or {b}?", "Which rhythm is seen on this ECG: {a} or {b}?"]),
    8: (Q, "scp_code", ["What diagnostic symptoms does this ECG show?", "Which diagnostic findings are present in this ECG?", "What diagnoses can be read from this ECG?", "List the diagnostic symptoms shown by this ECG."]),
    9: (Q, "scp_code", ["What diagnostic symptoms does this ECG show, excluding uncertain symptoms?", "Leaving out uncertain findings, which diagnostic symptoms does this ECG show?", "Which certain diagnostic symptoms are present in this ECG?"]),
    10: (Q, "scp_code", ["What rhythm-related symptoms does this ECG show?", "What is the rhythm of this ECG?", "Which rhythm findings are present in this ECG?", "What rhythm can be identified on this ECG?"]),
    11: (Q, "scp_code", ["What form-related symptoms does this ECG show?", "Which form abnormalities are present in this ECG?", "What waveform findings does this ECG show?"]),
    12: (V, "scp_code", ["Does this ECG show symptoms of {x}, excluding uncertain symptoms?", "Leaving out uncertain findings, does this ECG show {x}?", "Is {x} certainly present in this ECG?"]),
    13: (V, "scp_code", ["Does this ECG show symptoms of {x}, including uncertain symptoms?", "Counting uncertain findings, does this ECG show {x}?", "Is {x} present in this ECG, even if uncertain?"]),
    14: (V, "scp_code", ["Does this ECG show {x} in {lead}?", "Is {x} present in {lead} of this ECG?", "Can {x} be seen in {lead}?"]),
    15: (V, "scp_code", ["Does this ECG show symptoms of {x} as its diagnostic superclass?", "Does this ECG belong to the diagnostic superclass {x}?", "Is {x} a diagnostic superclass of this ECG?"]),
    16: (V, "scp_code", ["Is the rhythm of this ECG {x}?", "Does this ECG show a rhythm of {x}?", "Is {x} the rhythm seen on this ECG?"]),
    17: (V, "scp_code", ["Does {lead} of this ECG show symptoms of {x}?", "Is {lead} showing {x} in this ECG?", "Can {x} be detected in {lead} of this ECG?"]),
    18: (Q, "scp_code", ["What form-related symptoms does this ECG show in {lead}?", "Which form abnormalities are present in {lead} of this ECG?", "What waveform findings can be seen in {lead}?"]),
    19: (Q, "scp_code", ["What leads are showing symptoms of {x} in this ECG?", "In which leads does this ECG show {x}?", "Which leads of this ECG display {x}?"]),
    20: (V, "heart_axis", ["Does this ECG show {x}?", "Is there {x} in this ECG?", "Does the heart axis of this ECG indicate {x}?"]),
    21: (C, "heart_axis", ["Which heart axis does this ECG show, {a} or {b}?", "Does this ECG show {a} or {b}?", "Is the heart axis of this ECG {a} or {b}?"]),
    22: (Q, "heart_axis", ["What heart axis does this ECG show?", "What is the heart axis of this ECG?", "Which direction does the heart axis of this ECG point to?"]),
    23: (V, "stage_of_infarction", ["Does this ECG show {x}?", "Is this ECG in the {x}?", "Does the ECG indicate an {x}?"]),
    24: (C, "stage_of_infarction", ["Which stage of myocardial infarction does this ECG show, {a} or {b}?", "Is this ECG in the {a} or the {b}?", "Does the ECG show {a} or {b}?"]),
    25: (Q, "stage_of_infarction", ["What stage of myocardial infarction does this ECG show?", "Which stage of infarction is seen in this ECG?", "What is the stage of the myocardial infarction on this ECG?"]),
    26: (V, "noise", ["Does this ECG show {x} in {lead}?", "Is {x} present in {lead} based on the ECG?", "Does {lead} show any {x} on this ECG?", "Can {x} be detected in {lead} based on the ECG results?", "Is there {x} in {lead} as displayed in this ECG?", "Does the ECG reveal any {x} in {lead}?"]),
    27: (V, "noise", ["Does this ECG show {x}?", "Is there any indication of {x} on this ECG?", "Is there any interference from {x} in this ECG recording?", "Is this ECG reading being affected by any {x}?", "Is the ECG recording showing any signs of {x} interference?", "Is there any {x} present on this ECG?"]),
    28: (V, "noise", ["Does this ECG show any kind of noises in {lead}?", "Is there any noise in {lead} of this ECG?", "Does {lead} of this ECG contain any noise?", "Is {lead} affected by any kind of noise on this ECG?"]),
    29: (V, "noise", ["Does this ECG show any kind of noises?", "Is this ECG affected by any kind of noise?", "Is there any noise on this ECG recording?", "Does the ECG recording contain any noise?"]),
    30: (C, "noise", ["Which noise does this ECG show, {a} or {b}?", "Is this ECG affected by {a} or {b}?", "Which kind of noise is present in this ECG, {a} or {b}?"]),
    31: (C, "noise", ["Which noise does this ECG show in {lead}, {a} or {b}?", "Is {lead} of this ECG affected by {a} or {b}?", "Which kind of noise is present in {lead}, {a} or {b}?"]),
    32: (Q, "noise", ["What kind of noises does this ECG show?", "Which noises are present in this ECG?", "What types of noise affect this ECG recording?", "What interference can be seen on this ECG?"]),
    33: (Q, "noise", ["What kind of noises does this ECG show in {lead}?", "Which noises are present in {lead} of this ECG?", "What types of noise affect {lead} on this ECG?"]),
    34: (Q, "noise", ["What leads are showing {x} in this ECG?", "In which leads does this ECG show {x}?", "Which leads of this ECG are affected by {x}?"]),
    35: (V, "extra_systole", ["Does this ECG show {x}?", "Are there {x} in this ECG?", "Can {x} be seen on this ECG?"]),
    36: (V, "extra_systole", ["Does this ECG show any kind of extra systoles?", "Are there any extra systoles in this ECG?", "Does this ECG contain extra beats of any kind?"]),
    37: (C, "extra_systole", ["Which kind of extra systoles does this ECG show, {a} or {b}?", "Does this ECG show {a} or {b}?", "Which extra beats are present in this ECG, {a} or {b}?"]),
    38: (Q, "extra_systole", ["What kind of extra systoles does this ECG show?", "Which extra systoles are present in this ECG?", "What types of extra beats can be seen on this ECG?"]),
    39: (V, "numeric_feature", ["Does the {x} of this ECG fall {r}?", "Is the {x} of this ECG {r}?", "Does this ECG have a {x} {r}?"]),
    40: (C, "numeric_feature", ["Which range does the {x} of this ECG fall in, {a} or {b}?", "Is the {x} of this ECG {a} or {b}?", "Does the {x} of this ECG lie {a} or {b}?"]),
    41: (Q, "numeric_feature", ["What range does the {x} of this ECG fall in?", "Where does the {x} of this ECG lie relative to the normal range?", "How does the {x} of this ECG compare with the normal range?"]),
    42: (Q, "numeric_feature", ["What numeric features of this ECG fall outside the normal range?", "Which measurements of this ECG are abnormal?", "What numeric values of this ECG lie outside their normal ranges?"]),
}  # fmt: skip

_CMP_SCP = [
    (
        "newly show symptoms of {x}",
        "What symptoms of the second ECG are newly detected as compared to the first ECG?",
    ),
    (
        "no longer show symptoms of {x}",
        "What symptoms of the second ECG have disappeared as compared to the first ECG?",
    ),
    (
        "still show symptoms of {x}",
        "What symptoms of the second ECG are still present as compared to the first ECG?",
    ),
]
_CMP_NUM = [
    (
        "now have a normal {x}",
        "What numeric features of the second ECG now have become normal as compared to the first ECG?",
    ),
    (
        "now have an abnormal {x}",
        "What numeric features of the second ECG are now considered abnormal values as compared to the first ECG?",
    ),
    (
        "still have an abnormal {x}",
        "What numeric features of the second ECG are still abnormal as compared to the first ECG?",
    ),
]


def _cmp_templates() -> None:
    for base, qv, qq in [(43, CCV, CCQ), (57, CIV, CIQ)]:
        for k, (verb, _) in enumerate(_CMP_SCP):
            TEMPLATES[base + k] = (qv, "scp_code", [
                f"Does the second ECG {verb} as compared to the first ECG?",
                f"Compared to the first ECG, does the second ECG {verb}?",
                f"Relative to the first ECG, does the second one {verb}?",
            ])  # fmt: skip
        TEMPLATES[base + 3] = (qv, "scp_code", [
            "Does the second ECG show any symptoms that differ from the first ECG?",
            "Are the symptoms of the second ECG different from those of the first ECG?",
            "Has anything changed in the symptoms of the second ECG as compared to the first ECG?",
        ])  # fmt: skip
        for k, (_, query) in enumerate(_CMP_SCP):
            TEMPLATES[base + 4 + k] = (qq, "scp_code", [query, query.replace("What symptoms", "Which findings"),
                                                        query.replace("as compared to", "relative to")])  # fmt: skip
        for k, (verb, _) in enumerate(_CMP_NUM):
            TEMPLATES[base + 7 + k] = (qv, "numeric_feature", [
                f"Does the second ECG {verb} as compared to the first ECG?",
                f"Compared to the first ECG, does the second ECG {verb}?",
                f"Relative to the first ECG, does the second one {verb}?",
            ])  # fmt: skip
        TEMPLATES[base + 10] = (qv, "numeric_feature", [
            "Does the second ECG have any numeric features with a different range from the first ECG?",
            "Do any measurements of the second ECG fall in a different range than those of the first ECG?",
            "Has the range of any numeric feature changed from the first ECG to the second ECG?",
        ])  # fmt: skip
        for k, (_, query) in enumerate(_CMP_NUM):
            TEMPLATES[base + 11 + k] = (qq, "numeric_feature", [query, query.replace("What numeric features", "Which numerical values"),
                                                                 query.replace("as compared to", "as opposed to")])  # fmt: skip


_cmp_templates()
assert sorted(TEMPLATES) == list(range(1, 71)), sorted(TEMPLATES)


@lru_cache(maxsize=1)
def admissible() -> dict[int, list[str]]:
    """template_id -> ECG-QA's admissible answers (answers_for_each_template.csv, PTB-XL version)."""
    with open(ASSETS / "ecgqa_ptbxl_answers_for_each_template.csv", newline="") as f:
        return {int(r["template_id"]): ast.literal_eval(r["classes"]) for r in csv.DictReader(f)}


@dataclass
class Facts:
    """What one record shows, in ECG-QA's answer names."""

    ecg_id: int
    patient_id: int
    diag: dict[str, float]  # diagnostic statement -> likelihood
    form: list[str]
    rhythm: list[str]
    superclasses: list[str]
    form_leads: dict[str, list[str]]  # form statement -> leads (QA names) where it shows
    axis: str
    stages: list[str]  # [] without MI
    noise: dict[str, list[str]]  # noise type -> leads
    extra: list[str]
    ranges: dict[str, str] = field(default_factory=dict)  # numeric feature -> range answer

    def symptoms(self) -> set[str]:
        return set(self.diag) | set(self.form) | set(self.rhythm)


def _lead(name: str) -> str:
    return f"lead {name}"


def _canon(answers, tid: int) -> list[str]:
    """Unordered answer set -> sorted list inside the template's admissible answers; empty -> ['none']."""
    ok = admissible()[tid]
    out = sorted({a for a in answers if a in ok})
    return out or ["none"]


class QuestionBank:
    """Assigns question ids (one per template x attribute, shared by paraphrases) and renders wordings."""

    def __init__(self):
        self.ids: dict[tuple, int] = {}

    def qid(self, tid: int, key: tuple) -> int:
        k = (tid, key)
        if k not in self.ids:
            self.ids[k] = len(self.ids) + 1
        return self.ids[k]


def _sample(bank, tid, attr, answer, ecg_ids, fill, qkey=None) -> dict:
    qtype, atype, wordings = TEMPLATES[tid]
    return {
        "template_id": tid,
        "question_id": bank.qid(tid, tuple(attr) if qkey is None else qkey),
        "sample_id": -1,
        "question_type": qtype,
        "attribute_type": atype,
        "question": wordings[0].format(**fill),
        "answer": answer,
        "ecg_id": list(ecg_ids),
        "attribute": None if qtype.startswith("comparison") else list(attr),
        "_fill": fill,
    }


# the frequent attribute pairs a choose question asks about (fixed per template so question groups fill up)
CHOOSE_POOLS = {
    4: "diag", 5: "diag", 6: "form", 7: "rhythm", 21: "axis", 24: "stage", 30: "noise", 31: "noise", 37: "extra", 40: "range",
}  # fmt: skip


def _pairs(pool: list[str]) -> list[tuple[str, str]]:
    return [(a, b) for i, a in enumerate(pool) for b in pool[i + 1 :]]


def choose_pools(facts: list[Facts]) -> dict[int, list[tuple[str, str]]]:
    """Per choose template, the option pairs asked: pairs of the most frequent answers in this world."""
    from collections import Counter

    counts = {
        "diag": Counter(a for f in facts for a in f.diag),
        "form": Counter(a for f in facts for a in f.form),
        "rhythm": Counter(a for f in facts for a in f.rhythm),
    }
    pools = {
        "diag": [a for a, _ in counts["diag"].most_common(6)],
        "form": [a for a, _ in counts["form"].most_common(5)],
        "rhythm": [a for a, _ in counts["rhythm"].most_common(4)],
        "axis": list(vocab.AXIS_ANSWERS),
        "stage": list(vocab.STAGE_ANSWERS),
        "noise": list(vocab.NOISE_TYPES),
        "extra": list(vocab.EXTRA_TYPES),
        "range": list(vocab.RANGE_ANSWERS),
    }
    return {tid: _pairs(sorted(pools[name])) for tid, name in CHOOSE_POOLS.items()}


def _choose(bank, tid, a, b, present: set[str], ecg_id, fill_extra=None, qkey_extra=()) -> dict:
    hit = [x for x in (a, b) if x in present]
    answer = sorted(hit) if hit else ["none"]
    fill = {"a": a, "b": b, **(fill_extra or {})}
    return _sample(bank, tid, [a, b], answer, [ecg_id], fill, qkey=(a, b) + qkey_extra)


def single_questions(f: Facts, bank: QuestionBank, pools: dict, rng: np.random.Generator) -> list[dict]:
    """Every single-ECG question type over the six attribute types for one record."""
    out: list[dict] = []
    e = f.ecg_id
    adm = admissible()
    diag_all = [a for a in adm[5] if a != "none"]
    form_all = [a for a in adm[6] if a != "none"]
    rhythm_all = [a for a in adm[7] if a != "none"]
    sure = {a for a, lk in f.diag.items() if lk == 0 or lk >= 50}
    set(f.diag) - sure

    def pick(pool, k, exclude=()):
        pool = [p for p in pool if p not in exclude]
        return [pool[i] for i in rng.choice(len(pool), size=min(k, len(pool)), replace=False)] if pool else []

    # --- scp_code ---
    for x in sorted(f.diag):
        out.append(_sample(bank, 1, [x], ["yes" if x in sure else "not sure"], [e], {"x": x}))
    for x in pick(diag_all, 4, f.diag):
        out.append(_sample(bank, 1, [x], ["no"], [e], {"x": x}))
    present_fr = set(f.form)
    for x in sorted(present_fr) + pick(form_all, 3, present_fr):
        out.append(_sample(bank, 2, [x], ["yes" if x in present_fr else "no"], [e], {"x": x}))
    out.append(_sample(bank, 3, [], _canon(f.superclasses, 3), [e], {}))
    present_diag = set(f.diag)
    for tid, present in [(4, present_diag), (5, sure), (6, set(f.form)), (7, set(f.rhythm))]:
        a, b = pools[tid][rng.integers(len(pools[tid]))]
        out.append(_choose(bank, tid, a, b, present, e))
    out.append(_sample(bank, 8, [], _canon(f.diag, 8), [e], {}))
    out.append(_sample(bank, 9, [], _canon(sure, 9), [e], {}))
    out.append(_sample(bank, 10, [], _canon(f.rhythm, 10), [e], {}))
    out.append(_sample(bank, 11, [], _canon(f.form, 11), [e], {}))
    for tid, positive in [(12, sure), (13, present_diag)]:
        x = (
            pick(sorted(present_diag), 1)
            if present_diag and rng.uniform() < 0.5
            else pick(diag_all, 1, present_diag)
        )[0]
        out.append(_sample(bank, tid, [x], ["yes" if x in positive else "no"], [e], {"x": x}))
    lead = vocab.QA_LEAD_NAMES[rng.integers(12)]
    leadful = sorted(f.form_leads)
    for tid in (14, 17):
        x = (
            pick(leadful, 1)[0]
            if leadful and rng.uniform() < 0.6
            else pick([a for a in adm[18] if a != "none"], 1)[0]
        )
        yes = lead in f.form_leads.get(x, [])
        out.append(
            _sample(bank, tid, [x], ["yes" if yes else "no"], [e], {"x": x, "lead": _lead(lead)}, qkey=(x,))
        )
    supers = [a for a in adm[3] if a != "none"]
    for x in pick(supers, 2):
        out.append(_sample(bank, 15, [x], ["yes" if x in f.superclasses else "no"], [e], {"x": x}))
    for x in f.rhythm[:1] + pick(rhythm_all, 1, f.rhythm):
        out.append(_sample(bank, 16, [x], ["yes" if x in f.rhythm else "no"], [e], {"x": x}))
    in_lead = [a for a, leads in f.form_leads.items() if lead in leads]
    out.append(_sample(bank, 18, [_lead(lead)], _canon(in_lead, 18), [e], {"lead": _lead(lead)}))
    for x in leadful:
        out.append(_sample(bank, 19, [x], _canon([_lead(z) for z in f.form_leads[x]], 19), [e], {"x": x}))
    # --- heart_axis ---
    for x in [f.axis] + pick(vocab.AXIS_ANSWERS, 1, [f.axis]):
        out.append(_sample(bank, 20, [x], ["yes" if x == f.axis else "no"], [e], {"x": x}))
    a, b = pools[21][rng.integers(len(pools[21]))]
    out.append(_choose(bank, 21, a, b, {f.axis}, e))
    out.append(_sample(bank, 22, [], [f.axis], [e], {}))
    # --- stage_of_infarction ---
    known = [s for s in f.stages if s in vocab.STAGE_ANSWERS]
    for x in known + pick(vocab.STAGE_ANSWERS, 1, known):
        out.append(_sample(bank, 23, [x], ["yes" if x in known else "no"], [e], {"x": x}))
    a, b = pools[24][rng.integers(len(pools[24]))]
    out.append(_choose(bank, 24, a, b, set(known), e))
    out.append(_sample(bank, 25, [], sorted(f.stages) or [vocab.NO_MI_STAGE], [e], {}))
    # --- noise ---
    lead = vocab.QA_LEAD_NAMES[rng.integers(12)]
    for x in vocab.NOISE_TYPES:
        out.append(
            _sample(
                bank,
                26,
                [x],
                ["yes" if lead in f.noise.get(x, []) else "no"],
                [e],
                {"x": x, "lead": _lead(lead)},
            )
        )
        out.append(_sample(bank, 27, [x], ["yes" if x in f.noise else "no"], [e], {"x": x}))
    noisy_leads = {z for leads in f.noise.values() for z in leads}
    out.append(
        _sample(
            bank,
            28,
            ["any kind of noises"],
            ["yes" if lead in noisy_leads else "no"],
            [e],
            {"lead": _lead(lead)},
        )
    )
    out.append(_sample(bank, 29, ["any kind of noises"], ["yes" if f.noise else "no"], [e], {}))
    a, b = pools[30][rng.integers(len(pools[30]))]
    out.append(_choose(bank, 30, a, b, set(f.noise), e))
    a, b = pools[31][rng.integers(len(pools[31]))]
    in_lead = {x for x, leads in f.noise.items() if lead in leads}
    out.append(_choose(bank, 31, a, b, in_lead, e, {"lead": _lead(lead)}))
    out.append(_sample(bank, 32, [], _canon(f.noise, 32), [e], {}))
    out.append(_sample(bank, 33, [_lead(lead)], _canon(in_lead, 33), [e], {"lead": _lead(lead)}))
    for x in sorted(f.noise):
        out.append(_sample(bank, 34, [x], _canon([_lead(z) for z in f.noise[x]], 34), [e], {"x": x}))
    # --- extra_systole ---
    for x in f.extra + pick(vocab.EXTRA_TYPES, 1, f.extra):
        out.append(_sample(bank, 35, [x], ["yes" if x in f.extra else "no"], [e], {"x": x}))
    out.append(_sample(bank, 36, ["any kind of extra systoles"], ["yes" if f.extra else "no"], [e], {}))
    a, b = pools[37][rng.integers(len(pools[37]))]
    out.append(_choose(bank, 37, a, b, set(f.extra), e))
    out.append(_sample(bank, 38, [], _canon(f.extra, 38), [e], {}))
    # --- numeric_feature ---
    for x, r in f.ranges.items():
        rr = r if rng.uniform() < 0.5 else pick(vocab.RANGE_ANSWERS, 1, [r])[0]
        out.append(_sample(bank, 39, [x, rr], ["yes" if rr == r else "no"], [e], {"x": x, "r": rr}))
        a, b = pools[40][rng.integers(len(pools[40]))]
        out.append(_choose(bank, 40, a, b, {r}, e, {"x": x}, qkey_extra=(x,)))
        out.append(_sample(bank, 41, [x], [r], [e], {"x": x}))
    abnormal = [x for x, r in f.ranges.items() if r != "within the normal range"]
    out.append(_sample(bank, 42, [], _canon(abnormal, 42), [e], {}))
    return out


def comparison_questions(f1: Facts, f2: Facts, consecutive: bool, bank: QuestionBank, rng) -> list[dict]:
    """Questions about a pair of records (consecutive recordings of one patient, or two unrelated ones)."""
    base = 43 if consecutive else 57
    ids = [f1.ecg_id, f2.ecg_id]
    s1, s2 = f1.symptoms(), f2.symptoms()
    sets = [s2 - s1, s1 - s2, s1 & s2]
    out = []
    pool = sorted(s1 | s2)
    for k in range(3):
        if pool:
            x = pool[rng.integers(len(pool))]
            out.append(
                _sample(bank, base + k, [], ["yes" if x in sets[k] else "no"], ids, {"x": x}, qkey=(x,))
            )
        out.append(_sample(bank, base + 4 + k, [], _canon(sets[k], base + 4 + k), ids, {}))
    out.append(_sample(bank, base + 3, [], ["yes" if s1 != s2 else "no"], ids, {}))
    feats = sorted(set(f1.ranges) & set(f2.ranges))
    ab1 = {x for x in feats if f1.ranges[x] != "within the normal range"}
    ab2 = {x for x in feats if f2.ranges[x] != "within the normal range"}
    nsets = [ab1 - ab2, ab2 - ab1, ab1 & ab2]
    for k in range(3):
        if feats:
            x = feats[rng.integers(len(feats))]
            out.append(
                _sample(bank, base + 7 + k, [], ["yes" if x in nsets[k] else "no"], ids, {"x": x}, qkey=(x,))
            )
        out.append(_sample(bank, base + 11 + k, [], _canon(nsets[k], base + 11 + k), ids, {}))
    changed = any(f1.ranges[x] != f2.ranges[x] for x in feats)
    out.append(_sample(bank, base + 10, [], ["yes" if changed else "no"], ids, {}))
    return out


def paraphrase(sample: dict, rng: np.random.Generator) -> str:
    """One of the template's other wordings for the same sample."""
    wordings = TEMPLATES[sample["template_id"]][2]
    return wordings[1 + rng.integers(len(wordings) - 1)].format(**sample["_fill"])

"""Classes, meta-train / meta-test splits and N-way K-shot episodes (method.md section 1).

Everything here works on plain ECG-QA sample dicts (the JSON fields: template_id, question_id,
sample_id, question_type, attribute_type, question, answer, ecg_id, attribute, plus `split`
(train/valid/test) when known), so it runs the same on `json.load`-ed files and on
`ecgray.data.shards.read_qa` rows, without Ray (a training worker gets its episodes by index, `EpisodeSampler.episode`).

Class keys are `{template_id}_{attrs}_{answer}` where `attrs` is the sorted attribute list joined with
`ATTR_SEP` ("+"; the official code joins with "_", which collides with the key separator):
- single-verify: answer `yes` / `no`; `not sure` is dropped.
- single-choose: one answer -> that answer; two -> `both`; more -> dropped. `none` registers the
  sample under one key per attribute, `{tid}_{attr}_none`. (The official code keys one-answer samples
  `{tid}_{answer}_{answer}`, without the attributes; ecgray keeps the attributes as method.md's class
  definition says.)
- single-query: the answers sorted and joined with ", " (ECG-QA answers are unordered sets).
- comparison types (two ECGs per sample, first and second): `{tid}_q{question_id}_{answer}`. ECG-QA gives
  them no attributes; what a single question carries in `attribute` (the finding asked about: "... newly
  show symptoms of {x} ...") a comparison question carries in its text, one question_id per template and
  subject, so the question id stands in for the attributes. (Keyed by template alone, a verify type would
  have 2 classes per template, 16 in all, and 20 % of them could never fill a 5-way meta-test episode.)
  `*-verify` answers as single-verify (yes / no, `not sure` dropped), `*-query` as single-query (the answer
  set sorted and joined; `none`, ECG-QA's empty set, is its own class). The paper has no class sizes for
  them (EpisodeConfig.min_class_size).

Protocols (`cfg.protocol`):
- `paper`: every way of an episode is one class key inside one question_id group (method.md section 1). All
  samples of a way share one question text and one answer, so inside an episode the question names the
  answer (method.md section 7).
- `grounded`: the unit is a question (question_id). Its answer classes are its samples grouped by class
  answer (the class rules above, except that a single-choose `none` is one class `{tid}_{attrs}_none` of its
  question); one is eligible with >= `min_answer_size` (default k_shot + n_query) samples. An episode takes
  n_way / answers_per_question questions, each with answers_per_question of its eligible answer classes,
  k_shot support + n_query query samples each: every question appears with several answers, balanced, so the
  text of a query cannot decide its answer.

Splits (per question type), reproducible with the seeds: sort the items (class keys in `paper`, question
ids in `grounded`; template ids in `template` mode), permute them with
`numpy.random.default_rng(split_seed).permutation(n)`, and send the first floor(n * meta_train_fraction)
of the permuted items to the meta-train side and the rest to meta-test; then carve meta-val out of the
meta-train side the same way (`meta_val_fraction`, `meta_val_seed`), so meta-test is the same whatever the
meta-val fraction. Meta-val is what in-training evaluation and every settings choice read.
- `class`: the paper's split of items.
- `patient`: the item split, then meta-train keeps only samples of ECG-QA's `train` split, meta-val those of
  `valid`, meta-test those of `test` (ECG-QA's splits are patient-disjoint, so the ECGs and patients of the
  sides are disjoint); question groups that fall below their minimum size and classes left without a group
  are dropped. A sample whose ECGs are not all of its own ECG-QA split (`ecg_split`, the split of each of
  its ECGs, when the sample carries it: `read_qa` attaches it from the prepared ECGs) would put a patient
  on two sides; it is dropped from every side (`straddling_samples` counts them; the sampler logs the
  count). ECG-QA and the synthetic world keep both ECGs of a comparison sample in its split, so this
  happens only with inconsistent data.
- `template`: the split is over template ids, so every class of a meta-test template is unseen.
A sample that sits in classes of several sides (a `paper` single-choose `none`: one key per attribute) stays
on the side of its first class key (sorted) only, so no sample is on two sides.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np

from ecgray.config import COMPARISON_TYPES, QUESTION_TYPES, EpisodeConfig

log = logging.getLogger(__name__)
ATTR_SEP = "+"
"""Joins the sorted attributes inside a class key (no ECG-QA attribute contains it)."""
SPLITS = ("meta-train", "meta-val", "meta-test")
PATIENT_SPLIT_OF = {"meta-train": "train", "meta-val": "valid", "meta-test": "test"}
"""ECG-QA split whose samples each side keeps in `patient` mode."""
MAX_DRAWS = 100
"""Fresh class draws tried before giving up on an episode (see EpisodeSampler.sample)."""

Sample = dict[str, Any]
Episode = dict[str, Any]
Classes = dict[str, dict[int, list[Sample]]]


class EpisodeError(ValueError):
    """The samples cannot give the requested classes or episodes; the message names the counts."""


def ecgs_per_sample(question_type: str) -> int:
    """1 for the single types, 2 for the comparison types (first ECG, second ECG)."""
    if question_type not in QUESTION_TYPES:
        raise EpisodeError(f"question_type {question_type!r}: expected one of {QUESTION_TYPES}")
    return 2 if question_type in COMPARISON_TYPES else 1


def item_ecg_ids(item: dict) -> list[int]:
    """An episode item's ECG ids in order: [ecg_id] for a single-ECG item (`ecg_id` an int), [first, second]
    for a comparison item (`ecg_id` a list of two ints)."""
    ecg_id = item["ecg_id"]
    return [int(i) for i in ecg_id] if isinstance(ecg_id, list | tuple) else [int(ecg_id)]


def _field(sample: Sample, name: str) -> Any:
    try:
        return sample[name]
    except KeyError:
        raise EpisodeError(
            f"sample {sample.get('sample_id', '?')}: missing field {name!r} (ECG-QA samples carry "
            "template_id, question_id, sample_id, question_type, question, answer, ecg_id, attribute)"
        ) from None


def _answers(sample: Sample) -> list[str]:
    answer = _field(sample, "answer")
    if isinstance(answer, str) or not isinstance(answer, Iterable):
        raise EpisodeError(
            f"sample {sample.get('sample_id')}: answer must be a list of strings, got {answer!r}"
        )
    answer = [str(a) for a in answer]
    if not answer:
        raise EpisodeError(f"sample {sample.get('sample_id')}: empty answer list")
    return answer


def _attributes(sample: Sample) -> list[str]:
    attribute = _field(sample, "attribute")
    attrs = sorted(str(a) for a in (attribute if attribute is not None else []))
    for a in attrs:
        if ATTR_SEP in a:
            raise EpisodeError(
                f"sample {sample.get('sample_id')}: attribute {a!r} contains the class-key separator "
                f"{ATTR_SEP!r}"
            )
    return attrs


def class_keys(
    sample: Sample,
    question_type: str,
    excluded_templates: Iterable[int] | None = None,
    protocol: str = "paper",
) -> list[str]:
    """The class keys a sample belongs to (method.md section 1); [] when the rules drop it.

    `excluded_templates` defaults to `EpisodeConfig().excluded_templates` (the paper's conflicting
    templates). Most samples get one key; under the paper protocol a single-choose `none` gets one per
    attribute, under `grounded` one, `{tid}_{attrs}_none` (an answer class of its question).
    """
    if question_type not in QUESTION_TYPES:
        raise EpisodeError(f"question_type {question_type!r}: expected one of {QUESTION_TYPES}")
    if _field(sample, "question_type") != question_type:
        raise EpisodeError(
            f"sample {sample.get('sample_id')}: question_type {sample['question_type']!r}, "
            f"asked for {question_type!r} classes"
        )
    if excluded_templates is None:
        excluded_templates = EpisodeConfig().excluded_templates
    tid = int(_field(sample, "template_id"))
    if tid in set(excluded_templates):
        return []
    answers = _answers(sample)
    attrs = _attributes(sample)
    joined = ATTR_SEP.join(attrs)
    if question_type in COMPARISON_TYPES:
        # no attributes in ECG-QA: what the question asks about lives in its text, one question_id each
        joined = f"q{int(_field(sample, 'question_id'))}"

    if question_type.endswith("-verify"):  # single-verify and the comparison verify types
        if len(answers) != 1 or answers[0] not in ("yes", "no", "not sure"):
            raise EpisodeError(
                f"sample {sample.get('sample_id')}: {question_type} answer must be one of yes / no / "
                f"not sure, got {answers}"
            )
        return [] if answers[0] == "not sure" else [f"{tid}_{joined}_{answers[0]}"]

    if question_type == "single-choose":
        if len(answers) > 2:
            return []
        if len(answers) == 2:
            return [f"{tid}_{joined}_both"]
        if answers[0] == "none":
            if not attrs:
                raise EpisodeError(
                    f"sample {sample.get('sample_id')}: single-choose answer 'none' needs attributes, "
                    "got none"
                )
            if protocol == "grounded":
                return [f"{tid}_{joined}_none"]
            return [f"{tid}_{attr}_none" for attr in attrs]
        return [f"{tid}_{joined}_{answers[0]}"]

    # single-query and the comparison query types: the answer set, order-free (`none`: the empty set)
    return [f"{tid}_{joined}_{', '.join(sorted(answers))}"]


def class_answer(sample: Sample, question_type: str) -> list[str]:
    """The answer a class teaches: single-choose pairs become ["both"], query answers (single and
    comparison) are sorted."""
    answers = _answers(sample)
    if question_type == "single-choose" and len(answers) == 2:
        return ["both"]
    if question_type.endswith("-query"):
        return sorted(answers)
    return answers


def sample_identity(sample: Sample) -> tuple:
    """What makes a sample unique: sample_id is unique only within one ECG-QA split (and one
    source / variant), so those fields count where present."""
    return (
        str(sample.get("source") or ""),
        str(sample.get("variant") or ""),
        str(sample.get("split") or ""),
        int(_field(sample, "sample_id")),
    )


def min_answer_size(cfg: EpisodeConfig) -> int:
    """grounded: the fewest samples an answer class of a question needs (default k_shot + n_query)."""
    return cfg.k_shot + cfg.n_query if cfg.min_answer_size is None else cfg.min_answer_size


def _check_protocol(cfg: EpisodeConfig) -> None:
    if cfg.protocol not in ("paper", "grounded"):
        raise EpisodeError(f"episodes.protocol {cfg.protocol!r}: expected paper or grounded")
    if cfg.protocol == "grounded":
        apq = cfg.answers_per_question
        if apq < 2 or cfg.n_way % apq:
            raise EpisodeError(
                f"episodes.protocol=grounded: n_way={cfg.n_way} must be a multiple of "
                f"episodes.answers_per_question={apq} (>= 2: every question of an episode comes with "
                "that many of its answers)"
            )


def build_classes(samples: Iterable[Sample], question_type: str, cfg: EpisodeConfig) -> Classes:
    """{class_key: {question_id: [samples]}} for one question type, after the size filters.

    paper: a class needs >= cfg.min_class_size[question_type] samples (counted before grouping, as the
    official code does); inside it, question_id groups with < cfg.min_group_size samples are dropped,
    and so are classes left without a group. grounded: both minimums are `min_answer_size(cfg)` (an answer
    class of one question is one class key in one question_id group). Keys, question ids and samples (by
    `sample_identity`) are sorted, so the result does not depend on the input order.
    """
    _check_protocol(cfg)
    if cfg.protocol == "paper" and question_type not in cfg.min_class_size:
        raise EpisodeError(
            f"episodes.min_class_size has no entry for {question_type!r} (has {sorted(cfg.min_class_size)}; "
            f"a config written before the comparison types keeps its older table): set one, e.g. --set "
            f"episodes.min_class_size.{question_type}=N"
        )
    members: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        if _field(sample, "question_type") != question_type:
            continue
        for key in class_keys(sample, question_type, cfg.excluded_templates, cfg.protocol):
            members[key].append(sample)

    if cfg.protocol == "grounded":
        min_size = min_group = min_answer_size(cfg)
    else:
        min_size, min_group = cfg.min_class_size[question_type], cfg.min_group_size
    classes: Classes = {}
    for key in sorted(members):
        if len(members[key]) < min_size:
            continue
        groups = _group_by_question(members[key], min_group)
        if groups:
            classes[key] = groups
    return classes


def questions_of(classes: Classes, answers_per_question: int = 1) -> dict[int, dict[str, list[Sample]]]:
    """{question_id: {class_key: samples}}: each question's answer classes; questions with fewer than
    `answers_per_question` of them are left out."""
    questions: dict[int, dict[str, list[Sample]]] = defaultdict(dict)
    for key, groups in classes.items():
        for qid, group in groups.items():
            questions[qid][key] = group
    return {
        q: dict(sorted(a.items())) for q, a in sorted(questions.items()) if len(a) >= answers_per_question
    }


def _group_by_question(samples: list[Sample], min_group_size: int) -> dict[int, list[Sample]]:
    groups: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        groups[int(_field(sample, "question_id"))].append(sample)
    return {
        qid: sorted(groups[qid], key=sample_identity)
        for qid in sorted(groups)
        if len(groups[qid]) >= min_group_size
    }


def seeded_split(items: Iterable, fraction: float, seed: int) -> tuple[list, list]:
    """Sort, permute with default_rng(seed), first floor(n * fraction) -> (first, rest), each sorted."""
    if not 0.0 <= fraction <= 1.0:
        raise EpisodeError(f"episodes.meta_train_fraction must lie in [0, 1], got {fraction}")
    items = sorted(set(items))
    order = np.random.default_rng(seed).permutation(len(items))
    # The epsilon keeps e.g. 15 * 0.8 = 12.000000000000002 or 11.999999999999998 from rounding badly.
    n_first = math.floor(len(items) * fraction + 1e-9)
    first = sorted(items[i] for i in order[:n_first])
    rest = sorted(items[i] for i in order[n_first:])
    return first, rest


def template_of(classes: Classes, key: str) -> int:
    """The template id of a class (every sample of a class shares it)."""
    groups = classes[key]
    return int(next(iter(groups.values()))[0]["template_id"])


def _three_way(items: Iterable, cfg: EpisodeConfig) -> dict[str, list]:
    """Items -> {side: items}: meta-test as the paper's split, meta-val carved from the meta-train side."""
    if not 0.0 <= cfg.meta_val_fraction < 1.0:
        raise EpisodeError(f"episodes.meta_val_fraction must lie in [0, 1), got {cfg.meta_val_fraction}")
    train_val, test = seeded_split(items, cfg.meta_train_fraction, cfg.split_seed)
    train, val = seeded_split(train_val, 1.0 - cfg.meta_val_fraction, cfg.meta_val_seed)
    return {"meta-train": train, "meta-val": val, "meta-test": test}


def split_classes(classes: Classes, cfg: EpisodeConfig) -> dict[str, Classes]:
    """{"meta-train", "meta-val", "meta-test": classes} by cfg.protocol and cfg.split_mode (module
    docstring). grounded: a side holds, per class key, only the question groups of its questions."""
    _check_protocol(cfg)
    mode = cfg.split_mode
    if mode not in ("class", "patient", "template"):
        raise EpisodeError(f"episodes.split_mode {mode!r}: expected class, patient or template")
    if cfg.protocol == "grounded":
        questions = questions_of(classes)
        if mode == "template":
            tid = {q: int(next(iter(a.values()))[0]["template_id"]) for q, a in questions.items()}
            sides = _three_way(set(tid.values()), cfg)
            qids = {side: {q for q in questions if tid[q] in set(t)} for side, t in sides.items()}
        else:
            qids = {side: set(q) for side, q in _three_way(questions, cfg).items()}
        out = {
            side: {
                k: {q: g for q, g in groups.items() if q in qids[side]}
                for k, groups in classes.items()
                if any(q in qids[side] for q in groups)
            }
            for side in SPLITS
        }
        min_group = min_answer_size(cfg)
    else:
        if mode == "template":
            sides = _three_way({template_of(classes, k) for k in classes}, cfg)
            keys = {
                s: [k for k in sorted(classes) if template_of(classes, k) in set(t)] for s, t in sides.items()
            }
        else:
            keys = _three_way(classes, cfg)
        out = {side: {k: classes[k] for k in keys[side]} for side in SPLITS}
        min_group = cfg.min_group_size
    out = _one_side_per_sample(out, min_group)
    if mode == "patient":
        for side, qa_split in PATIENT_SPLIT_OF.items():
            out[side] = _keep_qa_split(out[side], qa_split, min_group)
    return out


def _one_side_per_sample(sides: dict[str, Classes], min_group_size: int) -> dict[str, Classes]:
    """A sample in classes of several sides stays on the side of its first (sorted) class key only."""
    home: dict[tuple, str] = {}
    for side, classes in sides.items():
        for key, groups in classes.items():
            for group in groups.values():
                for sample in group:
                    ident = sample_identity(sample)
                    if ident not in home or key < home[ident][1]:
                        home[ident] = (side, key)
    out: dict[str, Classes] = {}
    for side, classes in sides.items():
        kept: Classes = {}
        for key, groups in classes.items():
            new_groups = {}
            for qid, group in groups.items():
                own = [s for s in group if home[sample_identity(s)][0] == side]
                if len(own) >= min_group_size:
                    new_groups[qid] = own
            if new_groups:
                kept[key] = new_groups
        out[side] = kept
    return out


def split_keys(samples: Iterable[Sample], cfg: EpisodeConfig) -> dict[str, dict[str, list[str]]]:
    """{question type: {side: sorted class keys}}: what a checkpoint stores, so evaluation can check that
    it splits the data the same way (grounded keys name the question: template, attributes, answer)."""
    samples = list(samples)
    return {
        qt: {
            side: sorted(classes)
            for side, classes in split_classes(build_classes(samples, qt, cfg), cfg).items()
        }
        for qt in cfg.types()
    }


def check_split_keys(expected: dict, actual: dict, where: str) -> None:
    """Raise naming the question type, side and keys when two `split_keys` results differ."""
    problems = []
    for qt in sorted(set(expected) | set(actual)):
        for side in SPLITS:
            want, got = set(expected.get(qt, {}).get(side, [])), set(actual.get(qt, {}).get(side, []))
            if want != got:
                extra, missing = sorted(got - want)[:5], sorted(want - got)[:5]
                problems.append(f"{qt} {side}: not in the checkpoint's split {extra}, missing {missing}")
    if problems:
        raise EpisodeError(
            f"{where}: the data splits differently from the checkpoint's stored split ("
            + "; ".join(problems[:6])
            + "). Evaluate on the data and episodes.* settings the checkpoint was trained with"
        )


def straddles(sample: Sample) -> bool:
    """Whether a sample's ECGs are not all of its own ECG-QA split (`ecg_split`: the split of each of its
    ECGs, when known); such a sample would put a patient on two sides of a patient split."""
    ecg_split = sample.get("ecg_split")
    if ecg_split is None:
        return False
    n = len(_field(sample, "ecg_id"))
    if len(ecg_split) != n:
        raise EpisodeError(
            f"sample {sample.get('sample_id')}: ecg_split {ecg_split} does not name the split of each of its "
            f"{n} ECGs"
        )
    return any(split != sample.get("split") for split in ecg_split)


def straddling_samples(samples: Iterable[Sample]) -> list[Sample]:
    """The samples a patient split drops because their ECGs are not all of their ECG-QA split
    (`straddles`): e.g. a comparison sample whose second ECG's patient is in another split."""
    return [s for s in samples if straddles(s)]


def _keep_qa_split(classes: Classes, qa_split: str, min_group_size: int) -> Classes:
    kept: Classes = {}
    for key, groups in classes.items():
        new_groups = {}
        for qid, group in groups.items():
            for sample in group:
                if sample.get("split") not in ("train", "valid", "test"):
                    raise EpisodeError(
                        f"sample {sample.get('sample_id')}: split_mode 'patient' needs the ECG-QA "
                        f"split (train/valid/test) of every sample, got split={sample.get('split')!r}"
                    )
            same = [s for s in group if s["split"] == qa_split and not straddles(s)]
            if len(same) >= min_group_size:
                new_groups[qid] = same
        if new_groups:
            kept[key] = new_groups
    return kept


class EpisodeSampler:
    """N-way K-shot episodes from the classes of one side (meta-train / meta-val / meta-test) of the split.

    With question_type `mixed`, every question type gets its own classes and split, and each episode
    is drawn from one type chosen uniformly at random. Episode i is drawn from
    `numpy.random.default_rng([seed, i])`, so `episodes(n)` is deterministic and its prefix does not
    depend on n (a worker can build any episode on its own).
    """

    def __init__(
        self,
        samples: Iterable[Sample],
        cfg: EpisodeConfig,
        split: str = "meta-train",
        seed: int = 0,
        expected_split: dict | None = None,
        where: str = "samples",
    ):
        """expected_split: a checkpoint's stored `split_keys`; the samples must split the same way for
        the question types both know, else EpisodeError naming `where` and the keys (checked before any
        side's size is). `self.split_keys` is `split_keys(samples, cfg)`, computed on the way."""
        if split not in SPLITS:
            raise EpisodeError(f"split {split!r}: expected one of {SPLITS}")
        for name in ("n_way", "k_shot", "n_query"):
            if getattr(cfg, name) < 1:
                raise EpisodeError(f"episodes.{name} must be >= 1, got {getattr(cfg, name)}")
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise EpisodeError(f"seed must be a non-negative integer, got {seed!r}")
        self.cfg, self.split, self.seed = cfg, split, int(seed)
        self.need = cfg.k_shot + cfg.n_query
        self.question_types = cfg.types()

        samples = list(samples)
        seen: set[tuple] = set()
        for sample in samples:
            ident = sample_identity(sample)
            if ident in seen:
                raise EpisodeError(
                    f"sample_id {ident[-1]} occurs twice (source={ident[0]!r} variant={ident[1]!r} "
                    f"split={ident[2]!r}); read one ECG-QA source and variant at a time"
                )
            seen.add(ident)
        self.straddling = 0
        """patient split: samples of these question types dropped from every side (`straddles`)."""
        if cfg.split_mode == "patient":
            types = set(self.question_types)
            self.straddling = len(straddling_samples(s for s in samples if s.get("question_type") in types))
            if self.straddling:
                log.warning(
                    "patient split: %d samples dropped from every side, their ECGs are not all of their "
                    "ECG-QA split (a patient would sit on two sides)",
                    self.straddling,
                )

        # paper: type -> [(class_key, [groups with >= need samples, each a list of (identity, item)])]
        # grounded: type -> [(question_id, [(class_key, [(identity, item)]) per eligible answer class])]
        sides = {qt: split_classes(build_classes(samples, qt, cfg), cfg) for qt in self.question_types}
        self.split_keys = {qt: {side: sorted(c) for side, c in sides[qt].items()} for qt in sides}
        if expected_split is not None:
            both = [qt for qt in self.question_types if qt in expected_split]
            check_split_keys(
                {qt: expected_split[qt] for qt in both}, {qt: self.split_keys[qt] for qt in both}, where
            )
        self.pools: dict[str, list] = {}
        for qt in self.question_types:
            classes = sides[qt][split]
            if cfg.protocol == "grounded":
                self.pools[qt] = self._question_pool(classes, qt)
                continue
            pool = []
            for key, groups in classes.items():
                eligible = [
                    [(sample_identity(s), _item(s, key, qt)) for s in group]
                    for group in groups.values()
                    if len(group) >= self.need
                ]
                if eligible:
                    pool.append((key, eligible))
            if len(pool) < cfg.n_way:
                largest = max((len(g) for gs in classes.values() for g in gs.values()), default=0)
                raise EpisodeError(
                    f"{split} {qt} ({cfg.split_mode} split): {len(pool)} eligible classes of "
                    f"{len(classes)}, fewer than n_way={cfg.n_way}. A class is eligible when one "
                    f"question_id group has >= k_shot + n_query = {cfg.k_shot} + {cfg.n_query} = "
                    f"{self.need} samples (largest group here: {largest})"
                )
            self.pools[qt] = pool

    def _question_pool(self, classes: Classes, qt: str) -> list:
        cfg, apq = self.cfg, self.cfg.answers_per_question
        need_questions = cfg.n_way // apq
        pool = []
        for qid, answers in questions_of(classes).items():
            eligible = [
                (key, [(sample_identity(s), _item(s, key, qt)) for s in group])
                for key, group in answers.items()
                if len(group) >= self.need
            ]
            if len(eligible) >= apq:
                pool.append((qid, eligible))
        if len(pool) < need_questions:
            raise EpisodeError(
                f"{self.split} {qt} (grounded, {cfg.split_mode} split): {len(pool)} eligible questions of "
                f"{len(questions_of(classes))}, fewer than n_way / answers_per_question = {cfg.n_way} / "
                f"{apq} = {need_questions}. A question is eligible when >= {apq} of its answers have >= "
                f"k_shot + n_query = {self.need} samples"
            )
        return pool

    def _draw_grounded(self, pool, rng: np.random.Generator) -> Episode:
        cfg = self.cfg
        classes, support, query = [], [], []
        for q in rng.choice(len(pool), size=cfg.n_way // cfg.answers_per_question, replace=False):
            _, answers = pool[int(q)]
            for a in rng.choice(len(answers), size=cfg.answers_per_question, replace=False):
                key, group = answers[int(a)]
                # a sample has one question and, under grounded keys, one answer class: no overlap
                picked = [group[int(i)][1] for i in rng.permutation(len(group))[: self.need]]
                items = [{**item, "answer": list(item["answer"])} for item in picked]
                classes.append(key)
                support.extend(items[: cfg.k_shot])
                query.extend(items[cfg.k_shot :])
        return {"classes": classes, "support": support, "query": query}

    def sample(self, rng: np.random.Generator) -> Episode:
        """One episode: n_way classes, one question group each, k_shot support + n_query query
        samples per class, no sample twice in the episode (grounded: n_way / answers_per_question
        questions with answers_per_question answer classes each; module docstring).

        A single-choose `none` sample sits in several classes; when an earlier way of the episode
        used up a group, the next eligible group of the class is tried, and when none is left the
        classes are drawn again (up to MAX_DRAWS times, all from `rng`, so still deterministic).
        """
        qt = self.question_types[int(rng.integers(len(self.question_types)))]
        pool = self.pools[qt]
        if self.cfg.protocol == "grounded":
            return self._draw_grounded(pool, rng)
        for _ in range(MAX_DRAWS):
            episode = self._try_draw(pool, rng)
            if episode is not None:
                return episode
        raise EpisodeError(
            f"{self.split} {qt}: {MAX_DRAWS} draws of {self.cfg.n_way} classes could not find "
            f"{self.need} unused samples per class (classes share samples)"
        )

    def _try_draw(self, pool, rng: np.random.Generator) -> Episode | None:
        cfg = self.cfg
        ways = rng.choice(len(pool), size=cfg.n_way, replace=False)
        used: set[tuple] = set()
        classes, support, query = [], [], []
        for way in ways:
            key, groups = pool[int(way)]
            picked = None
            for g in rng.permutation(len(groups)):
                group = groups[int(g)]
                picked = []
                for i in rng.permutation(len(group)):
                    ident, item = group[int(i)]
                    if ident not in used:
                        picked.append((ident, item))
                        if len(picked) == self.need:
                            break
                if len(picked) == self.need:
                    break
                picked = None
            if picked is None:
                return None
            used.update(ident for ident, _ in picked)
            items = [{**item, "answer": list(item["answer"])} for _, item in picked]
            classes.append(key)
            support.extend(items[: cfg.k_shot])
            query.extend(items[cfg.k_shot :])
        return {"classes": classes, "support": support, "query": query}

    def episode(self, index: int) -> Episode:
        """Episode number `index` of this sampler's seed."""
        return self.sample(np.random.default_rng([self.seed, int(index)]))

    def episodes(self, count: int, progress: bool = False) -> list[Episode]:
        """Episodes 0..count-1 (deterministic for the seed)."""
        if count < 0:
            raise EpisodeError(f"count must be >= 0, got {count}")
        indices: Iterable[int] = range(count)
        if progress:
            from ecgray.logs import progress as progress_bar

            indices = progress_bar(indices, desc=f"{self.split} episodes", unit="ep")
        return [self.episode(i) for i in indices]


def _item(sample: Sample, key: str, question_type: str) -> dict:
    ecg_ids = list(_field(sample, "ecg_id"))
    n = ecgs_per_sample(question_type)
    if len(ecg_ids) != n:
        raise EpisodeError(
            f"sample {sample.get('sample_id')}: {question_type} needs {n} ecg_id, got {len(ecg_ids)}: {ecg_ids}"
        )
    return {
        "sample_id": int(sample["sample_id"]),
        # single: the int; comparison: [first, second] in ECG-QA's order (`item_ecg_ids` reads both)
        "ecg_id": int(ecg_ids[0]) if n == 1 else [int(i) for i in ecg_ids],
        "question": str(_field(sample, "question")),
        "answer": class_answer(sample, question_type),
        "class": key,
        "template_id": int(sample["template_id"]),
        "question_type": question_type,
        # the candidates a choose question names ("... X or Y?"): part of the question, not of the answer
        "attribute": None if sample.get("attribute") is None else [str(a) for a in sample["attribute"]],
    }

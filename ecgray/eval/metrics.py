"""Meta-test metrics (method.md section 4), in plain python / numpy.

- **Exact match**: the predicted answer and the gold answer compared as *sets* of answers (ECG-QA answers
  are unordered): "v1, lead i" == ["lead i", "v1"]. Strings are split on ", ", stripped and lowercased.
- **Token accuracy** (the paper's "accuracy"): position-wise over the gold answer's tokens. Position j is
  right when the prediction has a token there and it equals the gold token; a prediction shorter than the
  gold counts its missing positions wrong, extra predicted tokens are ignored (the paper takes the
  predicted length from the gold answer). *With BOS*: the BOS token is prepended to the gold (and, unless
  the model predicted it itself as under `paper_compat`, to the prediction), so a one-token yes/no answer
  has a 50 % floor; *without BOS*: the answer tokens only. Token accuracy is micro-averaged over all
  answer tokens of an episode's query set.
- **Confidence intervals** are over episodes: each episode gives one number (its query set's exact-match
  rate, or its token accuracy); the interval is mean +- q * s / sqrt(n) with s the sample standard
  deviation (ddof=1) of the n per-episode values and q the two-sided quantile of Student's t with n-1
  degrees of freedom (`method="t"`) or of the normal distribution (`method="normal"`). With n = 1 the
  interval is undefined and reported as NaN half-width.

Per-episode records (one per episode, from `episode_record`) are aggregated per question type and per
inner step by `summarize`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

NORMAL_Q975 = 1.959963984540054
"""Two-sided 95 % quantile of the standard normal distribution."""
METRICS = ("exact_match", "token_acc_bos", "token_acc")
"""The per-step numbers every result reports."""


def answer_set(answer: str | Iterable[str]) -> frozenset[str]:
    """An answer as a set: a string is split on ","; parts are stripped and lowercased; empties dropped."""
    parts = answer.split(",") if isinstance(answer, str) else list(answer)
    return frozenset(p.strip().lower() for p in parts if p.strip())


def exact_match(pred: str | Iterable[str], gold: str | Iterable[str]) -> bool:
    """Set-level exact match of two answers (strings or lists of strings)."""
    return answer_set(pred) == answer_set(gold)


def token_matches(pred: Sequence[int], gold: Sequence[int]) -> tuple[int, int]:
    """(positions where pred[j] == gold[j], len(gold)) over the gold positions j."""
    correct = sum(1 for j, g in enumerate(gold) if j < len(pred) and int(pred[j]) == int(g))
    return correct, len(gold)


def token_accuracy(
    preds: Sequence[Sequence[int]], golds: Sequence[Sequence[int]], bos: int | None = None
) -> float:
    """Micro-averaged position-wise token accuracy over a set of answers. bos: prepend this token id to
    every gold and prediction first (the paper's BOS-included accuracy); None: answer tokens only."""
    if len(preds) != len(golds):
        raise ValueError(f"token_accuracy: {len(preds)} predictions but {len(golds)} gold answers")
    correct = total = 0
    for pred, gold in zip(preds, golds, strict=True):
        if bos is not None:
            pred, gold = [bos, *pred], [bos, *gold]
        c, t = token_matches(pred, gold)
        correct, total = correct + c, total + t
    if total == 0:
        raise ValueError("token_accuracy: the gold answers have no tokens")
    return correct / total


def t_quantile(level: float, dof: int) -> float:
    """Two-sided Student-t quantile for a `level` interval with `dof` degrees of freedom."""
    from scipy.special import stdtrit  # lighter to import than scipy.stats

    return float(stdtrit(dof, 0.5 + level / 2))


def mean_ci(values: Sequence[float], level: float = 0.95, method: str = "t") -> dict:
    """Mean of per-episode values with its confidence interval (module docstring).

    -> {"mean", "lo", "hi", "half_width", "std", "n"}; half_width is NaN for n < 2."""
    if method not in ("t", "normal"):
        raise ValueError(f"mean_ci: method {method!r}; expected 't' or 'normal'")
    if not 0 < level < 1:
        raise ValueError(f"mean_ci: level must lie in (0, 1), got {level}")
    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    if n == 0:
        raise ValueError("mean_ci: no values")
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "half_width": math.nan, "std": math.nan, "n": n}
    std = float(x.std(ddof=1))
    if method == "t":
        q = t_quantile(level, n - 1)
    elif level == 0.95:
        q = NORMAL_Q975
    else:
        from scipy.special import ndtri

        q = float(ndtri(0.5 + level / 2))
    half = q * std / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "half_width": half, "std": std, "n": n}


def episode_record(
    index: int,
    question_type: str,
    classes: list[str],
    steps: list[int],
    correct: list[list[bool]],
    token_acc_bos: list[float],
    token_acc: list[float],
    query_classes: list[str],
    predictions: list[str] | None = None,
) -> dict:
    """One episode's numbers, JSON-ready. correct[s][i]: query item i exactly right after steps[s];
    token_acc*[s]: that step's micro token accuracy; query_classes[i]: the class of query item i;
    predictions: the decoded answers at the last step. per_class holds [right, total] per class at the
    last step."""
    if not (len(correct) == len(token_acc_bos) == len(token_acc) == len(steps)):
        raise ValueError(
            f"episode {index}: {len(steps)} steps but {len(correct)} / {len(token_acc_bos)} / "
            f"{len(token_acc)} per-step results"
        )
    per_class: dict[str, list[int]] = {}
    for cls, ok in zip(query_classes, correct[-1], strict=True):
        entry = per_class.setdefault(cls, [0, 0])
        entry[0] += int(ok)
        entry[1] += 1
    return {
        "index": int(index),
        "question_type": question_type,
        "classes": list(classes),
        "steps": list(steps),
        "exact_match": [float(np.mean(c)) for c in correct],
        "token_acc_bos": [float(a) for a in token_acc_bos],
        "token_acc": [float(a) for a in token_acc],
        "per_class": per_class,
        "predictions": list(predictions) if predictions is not None else None,
    }


def summarize(records: list[dict], level: float = 0.95, method: str = "t") -> dict:
    """Aggregate episode records per question type (and over all, key "all") and per inner step.

    -> {qt: {"episodes": n, "steps": [...], "exact_match": [ci per step], "token_acc_bos": [...],
             "token_acc": [...], "per_class": {class: {"correct", "total", "accuracy"}}}}"""
    if not records:
        raise ValueError("summarize: no episode records")
    steps = records[0]["steps"]
    groups: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        if rec["steps"] != steps:
            raise ValueError(f"summarize: episode {rec['index']} has steps {rec['steps']}, others {steps}")
        groups[rec["question_type"]].append(rec)
    if len(groups) > 1:
        groups["all"] = list(records)
    out = {}
    for qt, recs in groups.items():
        entry: dict = {"episodes": len(recs), "steps": list(steps)}
        for name in METRICS:
            per_episode = np.asarray([r[name] for r in recs], dtype=np.float64)  # (episodes, steps)
            entry[name] = [mean_ci(per_episode[:, s], level, method) for s in range(len(steps))]
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in recs:
            for cls, (right, total) in r["per_class"].items():
                counts[cls][0] += right
                counts[cls][1] += total
        entry["per_class"] = {
            cls: {"correct": c, "total": t, "accuracy": c / t} for cls, (c, t) in sorted(counts.items())
        }
        out[qt] = entry
    return out

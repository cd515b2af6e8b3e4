"""Meta-test metrics (method.md section 4) and paired statistics, in plain python / numpy / scipy.

- **Exact match**: predicted and gold answers compared as *sets* of answers (ECG-QA answers are unordered).
  An answer given as a list of strings is an identity: its elements are the answers, stripped and
  lowercased, never split (an answer may itself hold commas: "bigeminal pattern (unknown origin,
  supraventricular, or ventricular)"). Constrained decoding and the shortcut controls predict such lists.
  A string is free text (greedy decoding, the paper's quirk): it matches an answer list when it reads as
  those answers joined with commas in any order (`reads_as`), so "v1, lead i" == ["lead i", "v1"] and the
  bigeminal string matches the one-answer list holding it; two strings match when their comma-split sets
  are equal.
- **Token accuracy** (the paper's "accuracy"): position-wise over the gold answer's tokens. Position j is
  right when the prediction has a token there and it equals the gold token; a prediction shorter than the
  gold counts its missing positions wrong, extra predicted tokens are ignored (the paper takes the
  predicted length from the gold answer). *With BOS*: the BOS token is prepended to the gold (and, unless
  the model predicted it itself as under `paper_compat`, to the prediction), so a one-token yes/no answer
  has a 50 % floor; *without BOS*: the answer tokens only. Token accuracy is micro-averaged over all
  answer tokens of an episode's query set.
- **Confidence intervals** are over episodes: each episode gives one number (its query set's exact-match
  rate, or its token accuracy). `method="bootstrap"` (eval.ci_method's default): the percentile interval of
  the mean over `n_resamples` resamples of the episodes with replacement (`numpy.random.default_rng(seed)`),
  so it always lies inside [min, max] of the values, hence inside [0, 1] for accuracies; half_width is
  (hi - lo) / 2. `method="t"` / `"normal"`: mean +- q * s / sqrt(n), s the sample standard deviation
  (ddof=1), q the two-sided quantile of Student's t with n-1 degrees of freedom or of the normal
  distribution. With n = 1 every interval is undefined and reported as NaN.
- **Paired comparisons** (`paired_comparison`, `compare_results`): two methods on the same episodes; the
  mean of the per-episode differences, its paired-bootstrap percentile interval (episodes resampled, the
  pair kept together) and the two-sided Wilcoxon signed-rank p-value (scipy.stats.wilcoxon,
  zero_method="zsplit": episodes where both methods score the same count as evidence of no difference
  instead of being dropped, see `WILCOXON_ZERO_METHOD`). `learning_evidence` reads them per question type.
- **Chance level** of a question type: the mean over its query items of 1 / (number of answer options the
  item was scored among), i.e. what a uniform guess among the comparison's candidates gets right.
- **ECG-blind loss floor** (`blind_loss_floor`): the least teacher-forced loss any predictor that sees
  only the prompt can reach on a set of items; a loss near it says the model has not read the ECG.

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
CI_METHODS = ("bootstrap", "t", "normal")
WILCOXON_ZERO_METHOD = "zsplit"
"""How the signed-rank test treats episodes with a zero difference. Ties between two methods are common
(both right on every query of an easy episode); "wilcox" and "pratt" drop them from the statistic, so a
method that wins 10 episodes of 1,000 and ties the rest would look significant. "zsplit" ranks them and
splits their ranks between the two signs: ties pull the statistic towards "no difference"."""
TIE_DECIMALS = 12
"""Per-episode differences are rounded to this many decimals for the signed-rank test, so that float noise
does not split ties."""
BOOTSTRAP_CHUNK = 2_000_000
"""Resampled episode indices held in memory at once (resamples x episodes)."""
COMPARE_AGAINST = (
    "text_lookup", "ecg_free", "blind_llm", "shuffled_ecg", "encoder_prototype", "finetune_scratch",
)  # fmt: skip
"""The methods the meta-learned model is compared with by default (`compare_results`)."""
LEARNING_EVIDENCE_AGAINST = ("text_lookup", "ecg_free", "blind_llm", "shuffled_ecg")
"""The controls the model must beat for learning evidence (`learning_evidence`): what the question text gives
away, what the prefix learns without an ECG, what the LLM knows alone, and what the model gets from an ECG
that is not the query's own."""


def _normal(answer: str) -> str:
    return answer.strip().lower()


def answer_set(answer: str | Iterable[str]) -> frozenset[str]:
    """An answer as a set of normalised answers (stripped, lowercased, empties dropped): a list's elements
    as they are (never split); a string, free text, split on ","."""
    parts = answer.split(",") if isinstance(answer, str) else list(answer)
    return frozenset(_normal(p) for p in parts if _normal(p))


def reads_as(text: str, answers: Iterable[str]) -> bool:
    """Whether free text names exactly these answers: split at its commas, the text can be cut into runs
    of consecutive parts each equal to one answer (itself split at its commas), every answer used at least
    once, in any order (repeats allowed, as in a set)."""
    parts = tuple(p for p in (_normal(x) for x in text.split(",")) if p)
    pieces = {a: tuple(p for p in (_normal(x) for x in a.split(",")) if p) for a in answer_set(list(answers))}
    pieces = {a: p for a, p in pieces.items() if p}
    if not pieces:
        return not parts
    seen: set[tuple[int, frozenset[str]]] = set()

    def cut(start: int, used: frozenset[str]) -> bool:
        if start == len(parts):
            return len(used) == len(pieces)
        if (start, used) in seen:
            return False
        seen.add((start, used))
        return any(
            parts[start : start + len(p)] == p and cut(start + len(p), used | {a}) for a, p in pieces.items()
        )

    return cut(0, frozenset())


def exact_match(pred: str | Iterable[str], gold: str | Iterable[str]) -> bool:
    """Set-level exact match of two answers: lists by identity, strings as free text (module docstring)."""
    if isinstance(pred, str) and isinstance(gold, str):
        return answer_set(pred) == answer_set(gold)
    if isinstance(pred, str):
        return reads_as(pred, gold)
    if isinstance(gold, str):
        return reads_as(gold, pred)
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


def bootstrap_means(values, n_resamples: int = 10000, seed: int = 0) -> np.ndarray:
    """Means of `n_resamples` resamples (with replacement) of the rows of values (n,) or (n, S) ->
    (n_resamples,) or (n_resamples, S). The resampled row indices come from default_rng(seed) alone (not
    from the values), so two arrays with the same n get the same resamples: a paired bootstrap when their
    rows are the same episodes. Every mean is clipped into [min, max] of its column (rounding aside it
    lies there)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim not in (1, 2) or x.shape[0] == 0:
        raise ValueError(f"bootstrap_means: expected (n,) or (n, S) values with n >= 1, got shape {x.shape}")
    if n_resamples < 1:
        raise ValueError(f"bootstrap_means: n_resamples must be >= 1, got {n_resamples}")
    n = x.shape[0]
    columns = x.reshape(n, -1)  # (n, S)
    rng = np.random.default_rng(seed)
    chunk = max(1, BOOTSTRAP_CHUNK // n)
    out = []
    for start in range(0, n_resamples, chunk):
        r = min(chunk, n_resamples - start)
        index = rng.integers(0, n, size=(r, n))  # (r, n) resampled episodes
        # counts[i, j]: how often episode j is in resample i; the means are then one matrix product
        counts = np.bincount((index + n * np.arange(r)[:, None]).ravel(), minlength=r * n).reshape(r, n)
        out.append(counts @ columns / n)  # (r, S)
    means = np.clip(np.concatenate(out), columns.min(0), columns.max(0))
    return means[:, 0] if x.ndim == 1 else means


def percentile_interval(means: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """The (1 - level) / 2 and (1 + level) / 2 quantiles of bootstrap means, over their first axis."""
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return lo, hi


def _check_ci_args(level: float, method: str) -> None:
    if method not in CI_METHODS:
        raise ValueError(f"mean_ci: method {method!r}; expected one of {CI_METHODS}")
    if not 0 < level < 1:
        raise ValueError(f"mean_ci: level must lie in (0, 1), got {level}")


def mean_ci(
    values: Sequence[float],
    level: float = 0.95,
    method: str = "bootstrap",
    n_resamples: int = 10000,
    seed: int = 0,
) -> dict:
    """Mean of per-episode values with its confidence interval (module docstring). n_resamples, seed:
    the bootstrap's (unused by "t" / "normal").

    -> {"mean", "lo", "hi", "half_width", "std", "n"}; lo, hi, half_width and std are NaN for n < 2."""
    return step_cis(np.asarray(values, dtype=np.float64)[:, None], level, method, n_resamples, seed)[0]


def step_cis(
    per_episode: np.ndarray,
    level: float = 0.95,
    method: str = "bootstrap",
    n_resamples: int = 10000,
    seed: int = 0,
) -> list[dict]:
    """`mean_ci` of every column of per_episode (episodes, S) at once (the bootstrap draws one set of
    resamples for all columns) -> S dicts."""
    _check_ci_args(level, method)
    x = np.asarray(per_episode, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"step_cis: expected (episodes, steps) values, got shape {x.shape}")
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("mean_ci: no values")
    means = x.mean(0)
    if n < 2:
        nan = math.nan
        return [
            {"mean": float(m), "lo": nan, "hi": nan, "half_width": nan, "std": nan, "n": n} for m in means
        ]
    std = x.std(0, ddof=1)
    if method == "bootstrap":
        lo, hi = percentile_interval(bootstrap_means(x, n_resamples, seed), level)
        half = (hi - lo) / 2
    else:
        if method == "t":
            q = t_quantile(level, n - 1)
        elif level == 0.95:
            q = NORMAL_Q975
        else:
            from scipy.special import ndtri

            q = float(ndtri(0.5 + level / 2))
        half = q * std / math.sqrt(n)
        lo, hi = means - half, means + half
    return [
        {"mean": float(m), "lo": float(a), "hi": float(b), "half_width": float(h), "std": float(s), "n": n}
        for m, a, b, h, s in zip(means, lo, hi, half, std, strict=True)
    ]


def episode_record(
    index: int,
    question_type: str,
    classes: list[str],
    steps: list[int],
    correct: list[list[bool]],
    token_acc_bos: list[float],
    token_acc: list[float],
    query_classes: list[str],
    predictions: list[str | list[str]] | None = None,
    n_options: list[int] | None = None,
    support_loss: list[float] | None = None,
    support_loss_floor: float | None = None,
) -> dict:
    """One episode's numbers, JSON-ready. correct[s][i]: query item i exactly right after steps[s];
    token_acc*[s]: that step's micro token accuracy; query_classes[i]: the class of query item i;
    predictions: the answers at the last step (answer lists, or free text from greedy decoding). per_class
    holds [right, total] per class at the last step. n_options[i]: how many answer options query item i was
    scored among (None: free text, no option set). support_loss[s]: the inner loop's support loss at the
    weights after s updates (s = 0..inner_steps-1; None: a method that does not adapt), beside
    support_loss_floor, the ECG-blind floor of that support set (`blind_loss_floor`)."""
    if not (len(correct) == len(token_acc_bos) == len(token_acc) == len(steps)):
        raise ValueError(
            f"episode {index}: {len(steps)} steps but {len(correct)} / {len(token_acc_bos)} / "
            f"{len(token_acc)} per-step results"
        )
    if n_options is not None and (len(n_options) != len(query_classes) or min(n_options, default=1) < 1):
        raise ValueError(
            f"episode {index}: option counts {n_options} for {len(query_classes)} query items; expected one "
            "count >= 1 per item"
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
        "n_options": None if n_options is None else [int(n) for n in n_options],
        "support_loss": None if support_loss is None else [float(x) for x in support_loss],
        "support_loss_floor": None if support_loss_floor is None else float(support_loss_floor),
    }


def summarize(
    records: list[dict],
    level: float = 0.95,
    method: str = "bootstrap",
    n_resamples: int = 10000,
    seed: int = 0,
) -> dict:
    """Aggregate episode records per question type (and over all, key "all") and per inner step; the
    intervals are `mean_ci`'s (level, method, n_resamples, seed).

    -> {qt: {"episodes": n, "steps": [...], "exact_match": [ci per step], "token_acc_bos": [...],
             "token_acc": [...], "per_class": {class: {"correct", "total", "accuracy"}},
             "chance": mean over query items of 1 / n_options (None without option sets),
             "support_loss": [mean over episodes per inner step] | None, "support_loss_floor": mean | None}}"""
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
            entry[name] = step_cis(per_episode, level, method, n_resamples, seed)
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in recs:
            for cls, (right, total) in r["per_class"].items():
                counts[cls][0] += right
                counts[cls][1] += total
        entry["per_class"] = {
            cls: {"correct": c, "total": t, "accuracy": c / t} for cls, (c, t) in sorted(counts.items())
        }
        entry["chance"] = chance_level(recs)
        losses = [r.get("support_loss") for r in recs]
        known = all(x is not None for x in losses) and len({len(x) for x in losses}) == 1
        entry["support_loss"] = np.mean(losses, axis=0).tolist() if known and losses[0] else None
        floors = [r.get("support_loss_floor") for r in recs]
        entry["support_loss_floor"] = float(np.mean(floors)) if all(f is not None for f in floors) else None
        out[qt] = entry
    return out


def chance_level(records: list[dict]) -> float | None:
    """The mean over the records' query items of 1 / n_options (what a uniform guess among each item's
    options gets right); None when a record has no option counts (free-text answers)."""
    counts = [r.get("n_options") for r in records]
    if not counts or any(c is None for c in counts):
        return None
    return float(np.mean([1.0 / n for c in counts for n in c]))


# ------------------------------------------------------------------------------- paired statistics


def paired_comparison(
    model_values: Sequence[float],
    baseline_values: Sequence[float],
    level: float = 0.95,
    n_resamples: int = 10000,
    seed: int = 0,
) -> dict:
    """Two methods on the same episodes (element i of both = episode i): the mean of the per-episode
    differences model - baseline, its paired-bootstrap percentile interval (episodes resampled, each pair
    kept together) and the two-sided Wilcoxon signed-rank p-value of the differences rounded to
    `TIE_DECIMALS` (zero_method `WILCOXON_ZERO_METHOD`; scipy's method "auto": exact or permutation for
    small samples, normal approximation beyond).
    All-zero differences give p_value 1.0; fewer than 2 episodes give NaN interval and p-value.

    -> {"mean_difference", "ci_low", "ci_high", "p_value", "episodes"}"""
    m = np.asarray(model_values, dtype=np.float64)
    b = np.asarray(baseline_values, dtype=np.float64)
    if m.ndim != 1 or b.ndim != 1 or m.shape != b.shape:
        raise ValueError(
            f"paired_comparison: {m.size} model values but {b.size} baseline values; a paired comparison "
            "needs one value per episode from both, on the same episodes"
        )
    if m.size == 0:
        raise ValueError("paired_comparison: no episodes")
    if not 0 < level < 1:
        raise ValueError(f"paired_comparison: level must lie in (0, 1), got {level}")
    d = m - b  # (episodes,)
    out = {"mean_difference": float(d.mean()), "episodes": int(d.size)}
    if d.size < 2:
        return {**out, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan}
    lo, hi = percentile_interval(bootstrap_means(d, n_resamples, seed), level)
    if not d.any():  # identical on every episode: the signed-rank statistic has no spread
        p_value = 1.0
    else:
        from scipy.stats import wilcoxon

        # rounded: equal differences (0.2 as 0.6 - 0.4 and as 1.0 - 0.8) must tie in the ranks
        tied = np.round(d, TIE_DECIMALS)
        p_value = float(wilcoxon(tied, zero_method=WILCOXON_ZERO_METHOD, alternative="two-sided").pvalue)
    return {**out, "ci_low": float(lo), "ci_high": float(hi), "p_value": p_value}


def last_step_exact_match(result: dict) -> dict[int, tuple[str, float]]:
    """episode index -> (question type, exact match at the last inner step) of a `run_episodes` result."""
    out = {}
    for rec in result["episodes"]:
        if rec["index"] in out:
            raise ValueError(f"{result.get('method', '?')}: episode index {rec['index']} occurs twice")
        out[rec["index"]] = (rec["question_type"], float(rec["exact_match"][-1]))
    return out


def compare_results(
    results: dict[str, dict],
    model: str = "meta_test",
    against: Iterable[str] = COMPARE_AGAINST,
    level: float = 0.95,
    n_resamples: int = 10000,
    seed: int = 0,
    protocol: str | None = None,
) -> list[dict]:
    """`paired_comparison` of `model` against every method of `against` present in results (the others
    are skipped), on the last-step exact match per episode, episodes matched by index (the two results must
    hold the same episode indices with the same question types), per question type (and "all" when there
    are several).

    -> [{"protocol", "question_type", "method", "baseline", "mean_difference", "ci_low", "ci_high",
         "p_value", "episodes"}]"""
    if model not in results:
        raise ValueError(f"compare_results: no {model!r} result among {sorted(results)}")
    ours = last_step_exact_match(results[model])
    types = sorted({qt for qt, _ in ours.values()})
    groups = types + (["all"] if len(types) > 1 else [])
    rows = []
    for baseline in against:
        if baseline not in results or baseline == model:
            continue
        theirs = last_step_exact_match(results[baseline])
        if set(theirs) != set(ours):
            only_model, only_base = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
            raise ValueError(
                f"compare_results: {model} and {baseline} were run on different episodes ({len(ours)} vs "
                f"{len(theirs)}; only in {model}: {only_model[:5]}, only in {baseline}: {only_base[:5]})"
            )
        differ = [i for i in sorted(ours) if ours[i][0] != theirs[i][0]]
        if differ:
            i = differ[0]
            raise ValueError(
                f"compare_results: episode {i} is {ours[i][0]} for {model} but {theirs[i][0]} for {baseline}"
            )
        for qt in groups:
            index = [i for i in sorted(ours) if qt == "all" or ours[i][0] == qt]
            stats = paired_comparison(
                [ours[i][1] for i in index], [theirs[i][1] for i in index], level, n_resamples, seed
            )
            rows.append(
                {"protocol": protocol, "question_type": qt, "method": model, "baseline": baseline, **stats}
            )
    return rows


def learning_evidence(
    comparisons: list[dict],
    required: Iterable[str] = LEARNING_EVIDENCE_AGAINST,
    alpha: float = 0.05,
) -> dict[str, dict]:
    """Per question type of `compare_results` rows (one protocol, one model): whether the model beats
    every required baseline, i.e. paired p_value < alpha and a positive mean difference against each. A
    required baseline without a row counts as not beaten (and is listed under "missing").

    -> {question_type: {"evidence": bool, "against": {baseline: bool}, "missing": [baseline]}}"""
    required = list(required)
    if not required:
        raise ValueError("learning_evidence: no required baselines (evidence needs at least one)")
    protocols = {r["protocol"] for r in comparisons}
    methods = {r["method"] for r in comparisons}
    if len(protocols) > 1 or len(methods) > 1:
        raise ValueError(
            f"learning_evidence: rows of protocols {sorted(map(str, protocols))} and methods "
            f"{sorted(methods)}; pass one protocol's comparisons of one model"
        )
    by_type: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in comparisons:
        if row["baseline"] in by_type[row["question_type"]]:
            raise ValueError(f"learning_evidence: two rows for {row['question_type']} vs {row['baseline']}")
        by_type[row["question_type"]][row["baseline"]] = row
    out = {}
    for qt, rows in by_type.items():
        against = {
            name: bool(name in rows and rows[name]["p_value"] < alpha and rows[name]["mean_difference"] > 0)
            for name in required
        }  # a NaN p-value compares False
        out[qt] = {
            "evidence": all(against.values()),
            "against": against,
            "missing": [name for name in required if name not in rows],
        }
    return out


# --------------------------------------------------------------------------- the ECG-blind loss floor


def blind_nll_floor(
    prompts: Sequence,
    targets: Sequence[Sequence[int]],
    weights: Sequence[float] | None = None,
    teacher_forced: bool = True,
) -> float:
    """The least mean loss over target tokens (sum of every target token's NLL / number of target tokens,
    row r counted weights[r] times) that a predictor seeing only prompts[r] (any hashable) can reach.

    teacher_forced (ecgray's loss): target token j is predicted after the prompt and target tokens 0..j-1,
    so the predictor's contexts are the nodes of each prompt's prefix tree of its targets. At a node the
    loss is sum_t c_t (-ln q_t) over the next tokens t seen there (c_t their weighted counts), least at
    q_t = c_t / sum c (Gibbs' inequality), and the nodes' distributions are free of each other, so the floor
    is exact: sum over nodes of the empirical next-token entropy times the node's count, over the token
    count. teacher_forced False (`model.paper_compat`: token j is read at a fixed position over the question,
    without the earlier target tokens): the contexts are (prompt, j) instead."""
    weights = [1.0] * len(targets) if weights is None else list(weights)
    if not (len(prompts) == len(targets) == len(weights)):
        raise ValueError(
            f"blind_nll_floor: {len(prompts)} prompts, {len(targets)} targets, {len(weights)} weights; "
            "expected one of each per row"
        )
    if any(w < 0 for w in weights):
        raise ValueError(f"blind_nll_floor: weights must be >= 0, got {weights}")
    counts: dict[tuple, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    n_tokens = 0.0
    for prompt, target, w in zip(prompts, targets, weights, strict=True):
        for j, token in enumerate(target):
            context = tuple(target[:j]) if teacher_forced else j
            counts[(prompt, context)][int(token)] += w
        n_tokens += w * len(target)
    if n_tokens == 0:
        raise ValueError("blind_nll_floor: the rows have no target tokens")
    nll = 0.0
    for next_tokens in counts.values():
        c = np.asarray(list(next_tokens.values()), dtype=np.float64)
        c = c[c > 0]
        nll -= float((c * np.log(c / c.sum())).sum())
    return nll / n_tokens


def blind_loss_floor(items: Sequence[dict], model, weights: Sequence[float] | None = None) -> float:
    """The ECG-blind floor of the model's teacher-forced loss on QA items (`blind_nll_floor`): the least
    value of `ECGLanguageModel.task_losses` (mean over all target tokens, answer tokens + EOS; under
    `model.paper_compat` the official targets, BOS included) that any predictor seeing only each item's
    prompt (the question as the model tokenises it, cut to model.max_question_tokens, and its ECG count)
    can reach on exactly these items. A model whose loss on a set sits at this floor has learnt nothing the
    question text does not give. E.g. a verify question asked twice, once `yes` once `no`, with one-token
    answers: ln 2 over 2 target tokens per item, ln 2 / 2.

    items: dicts with "question", "answer" (answer list) and "ecg_id" (an int, or [first, second] for a
    comparison item); model: an `ECGLanguageModel` (its `prompt_rows` tokenisation and `cfg.paper_compat`);
    weights: each item counted this many times (None: once)."""
    if not items:
        raise ValueError("blind_loss_floor: no items")
    missing = [k for k in ("question", "answer", "ecg_id") if any(k not in i for i in items)]
    if missing:
        raise ValueError(f"blind_loss_floor: items without {missing}; expected QA items of an episode")
    # items with the same question, answer and ECG count are the same row for a blind model: tokenise each
    # distinct one once, counted as often as it occurs (alignment has ~10^5 items of ~10^3 distinct ones)
    count: dict[tuple, float] = {}
    distinct: dict[tuple, dict] = {}
    for item, w in zip(items, [1.0] * len(items) if weights is None else weights, strict=True):
        n = len(item["ecg_id"]) if isinstance(item["ecg_id"], list | tuple) else 1
        answer = item["answer"]
        key = (item["question"], tuple(answer) if isinstance(answer, list | tuple) else answer, n)
        count[key] = count.get(key, 0.0) + w
        distinct.setdefault(key, item)
    keys_ = list(distinct)
    questions = [k[0] for k in keys_]
    n_ecg = [k[2] for k in keys_]
    prompt = model.prompt_rows(questions, None, n_ecg=n_ecg)  # the prompt alone: what a blind model reads
    keys = [(tuple(b), tuple(a), n) for b, a, n in zip(prompt.before, prompt.after, n_ecg, strict=True)]
    targets = model.prompt_rows(questions, [distinct[k]["answer"] for k in keys_], n_ecg=n_ecg).targets
    return blind_nll_floor(
        keys, targets, [count[k] for k in keys_], teacher_forced=not model.cfg.paper_compat
    )

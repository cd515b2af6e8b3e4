"""Statistics over episodes: bootstrap intervals, paired comparisons (bootstrap interval + Wilcoxon
signed-rank), method-vs-baseline tables and the learning-evidence verdict, on inputs with known answers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from ecgray.eval import metrics

# ------------------------------------------------------------------------------ bootstrap intervals


def test_bootstrap_interval_of_two_values_by_hand():
    # resample means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5 % / 97.5 %
    # percentiles are 0 and 1
    ci = metrics.mean_ci([0.0, 1.0], method="bootstrap", n_resamples=20000, seed=0)
    assert (ci["mean"], ci["lo"], ci["hi"], ci["half_width"], ci["n"]) == (0.5, 0.0, 1.0, 0.5, 2)
    assert ci["std"] == pytest.approx(math.sqrt(0.5))
    means = metrics.bootstrap_means([0.0, 1.0], 20000, seed=0)
    assert sorted(set(means.tolist())) == [0.0, 0.5, 1.0]
    assert np.mean(means == 0.5) == pytest.approx(0.5, abs=0.02)


def test_bootstrap_interval_stays_in_the_range_and_is_reproducible():
    constant = metrics.mean_ci([0.2] * 30)
    assert (constant["lo"], constant["hi"], constant["half_width"]) == (0.2, 0.2, 0.0)
    skewed = np.array([1.0] * 9 + [0.6])  # near 1: the t interval passes 1
    t = metrics.mean_ci(skewed, method="t")
    b = metrics.mean_ci(skewed, method="bootstrap")
    assert t["hi"] == pytest.approx(0.96 + 2.2621571628 * math.sqrt(0.016) / math.sqrt(10)) and t["hi"] > 1.0
    assert b["mean"] == pytest.approx(0.96) and 0.6 <= b["lo"] <= b["mean"] <= b["hi"] == 1.0
    # resample means are 1 - 0.04 k (k = draws of the 0.6): the 2.5 % percentile is k = 3
    assert b["lo"] == pytest.approx(0.88)
    assert metrics.mean_ci(skewed, seed=0) == b  # seeded: reproducible
    a, c = metrics.bootstrap_means(skewed, 1000, seed=0), metrics.bootstrap_means(skewed, 1000, seed=1)
    assert np.array_equal(a, metrics.bootstrap_means(skewed, 1000, seed=0)) and not np.array_equal(a, c)


def test_bootstrap_interval_agrees_with_t_for_many_episodes():
    values = np.random.default_rng(0).uniform(size=400)
    t = metrics.mean_ci(values, method="t")
    b = metrics.mean_ci(values, method="bootstrap")
    assert b["mean"] == t["mean"] and b["std"] == t["std"]
    assert b["half_width"] == pytest.approx(t["half_width"], rel=0.1)
    assert b["lo"] == pytest.approx(t["lo"], abs=0.005) and b["hi"] == pytest.approx(t["hi"], abs=0.005)
    # columns share one set of resamples; each column's interval is its own mean_ci
    matrix = np.stack([values, values[::-1] * 0.5], axis=1)  # (episodes, 2)
    cis = metrics.step_cis(matrix)
    assert cis[0]["lo"] == pytest.approx(b["lo"]) and cis[0]["hi"] == pytest.approx(b["hi"])
    assert cis[1]["hi"] == pytest.approx(metrics.mean_ci(matrix[:, 1])["hi"])
    with pytest.raises(ValueError, match="n_resamples"):
        metrics.mean_ci(values, n_resamples=0)


def test_summarize_passes_the_interval_method_through():
    rec = metrics.episode_record
    records = [
        rec(i, "single-verify", ["a"], [0], [[ok]], [1.0 if ok else 0.5], [float(ok)], ["a"])
        for i, ok in enumerate([True, False, True, True])
    ]
    by_t = metrics.summarize(records, method="t")["single-verify"]["exact_match"][0]
    assert by_t == metrics.mean_ci([1.0, 0.0, 1.0, 1.0], method="t")
    boot = metrics.summarize(records, 0.9, "bootstrap", 300, 7)["single-verify"]["exact_match"][0]
    assert boot == metrics.mean_ci([1.0, 0.0, 1.0, 1.0], 0.9, "bootstrap", 300, 7)
    assert set(boot) == {"mean", "lo", "hi", "half_width", "std", "n"}
    assert boot["half_width"] == pytest.approx((boot["hi"] - boot["lo"]) / 2) and boot["hi"] == 1.0


# ------------------------------------------------------------------------------- paired comparisons


def test_paired_comparison_of_a_constant_gain():
    rng = np.random.default_rng(0)
    baseline = rng.uniform(0, 0.8, size=30)
    out = metrics.paired_comparison(baseline + 0.2, baseline)
    assert set(out) == {"mean_difference", "ci_low", "ci_high", "p_value", "episodes"}
    assert out["episodes"] == 30
    assert out["mean_difference"] == pytest.approx(0.2)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((0.2, 0.2))
    assert out["p_value"] < 0.05
    # float noise (0.2 as 0.7 - 0.5 and as 0.3 - 0.1) is rounded away: 30 tied ranks
    assert out["p_value"] == pytest.approx(stats.wilcoxon(np.full(30, 0.2), zero_method="zsplit").pvalue)
    # by hand: 30 tied ranks of 15.5, R+ = 465, mean 30 * 31 / 4 = 232.5, variance with the tie correction
    # (30 * 31 * 61 - (30^3 - 30) / 2) / 24 = 1801.875 -> z = 232.5 / sqrt(1801.875), two-sided normal p
    z = 232.5 / math.sqrt(1801.875)
    assert out["p_value"] == pytest.approx(2 * (1 - stats.norm.cdf(z))) and out["p_value"] < 1e-7


def test_paired_comparison_of_identical_methods():
    values = [0.4, 1.0, 0.6, 0.8, 0.2]
    out = metrics.paired_comparison(values, values)
    assert out == {"mean_difference": 0.0, "episodes": 5, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0}


def test_paired_comparison_small_case_by_hand():
    # differences 0.5, -0.1, 0.3, 0.2, 0.4, -0.25: ranks of |d| 6, 1, 4, 2, 5, 3 -> R- = 1 + 3 = 4. Exact
    # null (no ties, no zeros): each of the 2^6 sign patterns equally likely; P(R- <= 4) = 7 / 64
    # (subsets of {1..6} summing to <= 4: {}, {1}, {2}, {3}, {1,2}, {4}, {1,3}) -> two-sided p = 14 / 64
    base = np.array([0.2, 0.5, 0.1, 0.6, 0.3, 0.75])
    d = np.array([0.5, -0.1, 0.3, 0.2, 0.4, -0.25])
    out = metrics.paired_comparison(base + d, base)
    assert out["mean_difference"] == pytest.approx(d.mean())
    assert out["p_value"] == pytest.approx(14 / 64)
    ranks = stats.rankdata(np.abs(d))
    r_minus = [
        sum(r for r, s in zip(ranks, signs, strict=True) if s)
        for signs in itertools.product([0, 1], repeat=6)
    ]
    assert 2 * np.mean(np.asarray(r_minus) <= 4) == pytest.approx(14 / 64)
    assert out["p_value"] == pytest.approx(stats.wilcoxon(d, zero_method="zsplit").pvalue)
    # the paired-bootstrap interval: percentiles of resampled mean differences (the same indices)
    means = metrics.bootstrap_means(d, 10000, seed=0)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert d.min() <= out["ci_low"] < out["mean_difference"] < out["ci_high"] <= d.max()
    # with ties at zero (zsplit: the zeros keep their ranks, split between the signs) as scipy has it
    tied = np.array([0.0, 0.0, 0.2, -0.2, 0.4, 0.6, 0.0, 0.2])
    got = metrics.paired_comparison(tied, np.zeros(8))["p_value"]
    assert got == pytest.approx(stats.wilcoxon(tied, zero_method="zsplit").pvalue)


def test_tied_episodes_count_towards_no_difference():
    # 10 wins of 0.2 in 1,000 episodes, ties elsewhere: dropping the ties ("wilcox", "pratt") would call it
    # significant; zsplit does not
    d = np.array([0.2] * 10 + [0.0] * 990)
    out = metrics.paired_comparison(d, np.zeros(1000))
    assert out["mean_difference"] == pytest.approx(0.002) and out["p_value"] > 0.5
    assert stats.wilcoxon(d, zero_method="wilcox").pvalue < 0.01


def test_paired_comparison_of_random_symmetric_differences():
    rng = np.random.default_rng(0)
    base = rng.uniform(size=200)
    noise = rng.normal(0, 0.1, size=200)
    out = metrics.paired_comparison(base + noise, base)
    assert out["p_value"] > 0.05 and out["ci_low"] < 0 < out["ci_high"]
    mirrored = np.concatenate([noise, -noise])  # exactly symmetric: R+ = R-
    out = metrics.paired_comparison(mirrored, np.zeros(400))
    assert out["mean_difference"] == pytest.approx(0.0, abs=1e-12) and out["p_value"] == pytest.approx(1.0)


def test_paired_comparison_needs_the_same_episodes():
    with pytest.raises(ValueError, match="3 model values but 2 baseline values"):
        metrics.paired_comparison([1.0, 0.0, 1.0], [1.0, 0.0])
    one = metrics.paired_comparison([1.0], [0.0])
    assert one["mean_difference"] == 1.0 and math.isnan(one["ci_low"]) and math.isnan(one["p_value"])


# --------------------------------------------------------------------------- results and evidence


def result(method: str, rows: list[tuple[int, str, float]]) -> dict:
    """A run_episodes-shaped result: (episode index, question type, last-step exact match) per episode."""
    records = [
        metrics.episode_record(i, qt, ["c"], [0, 1], [[False] * 5, [j < round(em * 5) for j in range(5)]],
                               [0.5, 0.5], [0.0, 0.0], ["c"] * 5)
        for i, qt, em in rows
    ]  # fmt: skip
    return {
        "method": method,
        "steps": [0, 1],
        "summary": metrics.summarize(records, method="t"),
        "episodes": records,
    }


def two_types(values: list[float]) -> list[tuple[int, str, float]]:
    """Episodes 0..n-1, the first half single-verify, the rest single-choose."""
    half = len(values) // 2
    return [(i, "single-verify" if i < half else "single-choose", v) for i, v in enumerate(values)]


def test_compare_results_pairs_the_episodes_per_question_type():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 4, size=40) / 5  # 0 .. 0.6
    results = {
        "meta_test": result("meta_test", two_types(list(base + 0.4))),
        "text_lookup": result("text_lookup", two_types(list(base))),
        "blind_llm": result("blind_llm", list(reversed(two_types(list(base + 0.4))))),  # same episodes
    }
    rows = metrics.compare_results(results, against=["text_lookup", "blind_llm", "ecg_free"], protocol="grounded",
                                   n_resamples=500)  # fmt: skip
    assert [(r["baseline"], r["question_type"]) for r in rows] == [
        ("text_lookup", "single-choose"), ("text_lookup", "single-verify"), ("text_lookup", "all"),
        ("blind_llm", "single-choose"), ("blind_llm", "single-verify"), ("blind_llm", "all"),
    ]  # fmt: skip
    # ecg_free was not run: skipped
    by = {(r["baseline"], r["question_type"]): r for r in rows}
    verify = by[("text_lookup", "single-verify")]
    assert verify["protocol"] == "grounded" and verify["method"] == "meta_test" and verify["episodes"] == 20
    assert verify["mean_difference"] == pytest.approx(0.4) and verify["p_value"] < 0.05
    assert (verify["ci_low"], verify["ci_high"]) == pytest.approx((0.4, 0.4))
    assert by[("text_lookup", "all")]["episodes"] == 40
    same = by[("blind_llm", "all")]
    assert same["mean_difference"] == 0.0 and same["p_value"] == 1.0
    expected = metrics.paired_comparison(list(base[:20] + 0.4), list(base[:20]), n_resamples=500)
    assert {k: verify[k] for k in expected} == pytest.approx(expected)


def test_compare_results_refuses_different_episodes():
    results = {"meta_test": result("meta_test", two_types([1.0, 0.8, 0.6, 0.4]))}
    results["text_lookup"] = result(
        "text_lookup", [(i + 1, qt, v) for i, qt, v in two_types([1.0, 0.8, 0.6, 0.4])]
    )
    with pytest.raises(
        ValueError, match=r"different episodes .*only in meta_test: \[0\], only in text_lookup: \[4\]"
    ):
        metrics.compare_results(results, against=["text_lookup"])
    results["text_lookup"] = result(
        "text_lookup", [(i, "single-query", v) for i, _, v in two_types([1.0] * 4)]
    )
    with pytest.raises(ValueError, match="episode 0 is single-verify for meta_test but single-query"):
        metrics.compare_results(results, against=["text_lookup"])
    with pytest.raises(ValueError, match="no 'meta_test' result"):
        metrics.compare_results({"text_lookup": results["text_lookup"]})


def row(qt: str, baseline: str, diff: float, p: float) -> dict:
    return {"protocol": "grounded", "question_type": qt, "method": "meta_test", "baseline": baseline,
            "mean_difference": diff, "ci_low": diff, "ci_high": diff, "p_value": p, "episodes": 30}  # fmt: skip


def test_learning_evidence_needs_a_significant_gain_over_every_required_baseline():
    rows = [
        row("single-verify", "text_lookup", 0.2, 0.001), row("single-verify", "ecg_free", 0.1, 0.01),
        row("single-verify", "blind_llm", 0.3, 0.0001), row("single-verify", "finetune_scratch", -0.1, 0.2),
        row("single-verify", "shuffled_ecg", 0.1, 0.02),
        row("single-choose", "text_lookup", 0.2, 0.001), row("single-choose", "ecg_free", 0.05, 0.2),
        row("single-choose", "blind_llm", 0.3, 0.001), row("single-choose", "shuffled_ecg", 0.1, 0.01),
        row("single-query", "text_lookup", -0.2, 0.001), row("single-query", "ecg_free", 0.1, 0.01),
        row("single-query", "shuffled_ecg", 0.1, 0.01),
    ]  # fmt: skip
    out = metrics.learning_evidence(rows)
    assert out["single-verify"] == {
        "evidence": True, "missing": [],
        "against": {"text_lookup": True, "ecg_free": True, "blind_llm": True, "shuffled_ecg": True},
    }  # fmt: skip
    # finetune_scratch is not required
    assert out["single-choose"]["evidence"] is False and out["single-choose"]["against"]["ecg_free"] is False
    # significant but worse than text lookup; blind_llm never run
    assert out["single-query"] == {
        "evidence": False, "missing": ["blind_llm"],
        "against": {"text_lookup": False, "ecg_free": True, "blind_llm": False, "shuffled_ecg": True},
    }  # fmt: skip
    # the shuffled-ECG control is required too: without its row (not run) there is no evidence
    no_shuffle = [r for r in rows if r["baseline"] != "shuffled_ecg"]
    verdict = metrics.learning_evidence(no_shuffle)["single-verify"]
    assert not verdict["evidence"] and verdict["missing"] == ["shuffled_ecg"]
    assert metrics.learning_evidence(rows, required=["text_lookup", "ecg_free", "blind_llm"])[
        "single-verify"
    ]["evidence"]
    worse = [{**r, "mean_difference": -0.1} if r["baseline"] == "shuffled_ecg" else r for r in rows]
    assert not metrics.learning_evidence(worse)["single-verify"]["evidence"]
    assert metrics.learning_evidence(rows, required=["ecg_free"], alpha=0.02)["single-verify"]["evidence"]
    assert not metrics.learning_evidence(rows, required=["ecg_free"], alpha=0.005)["single-verify"][
        "evidence"
    ]
    nan = [row("single-verify", "text_lookup", 1.0, math.nan)]  # one episode: no p-value, no evidence
    assert not metrics.learning_evidence(nan, required=["text_lookup"])["single-verify"]["evidence"]
    with pytest.raises(ValueError, match="one protocol"):
        metrics.learning_evidence(rows + [{**rows[0], "protocol": "paper"}])
    with pytest.raises(ValueError, match="two rows for single-verify vs text_lookup"):
        metrics.learning_evidence(rows + [rows[0]])


# ------------------------------------------------------------------------------ ECG-blind loss floor


def test_blind_nll_floor_by_hand():
    ln2 = math.log(2)
    # two prompts, each yes / no once; one answer token + EOS (2): ln 2 at each first token, EOS certain
    yes, no, eos = 5, 6, 2
    targets = [[yes, eos], [no, eos], [yes, eos], [no, eos]]
    assert metrics.blind_nll_floor(["a", "a", "b", "b"], targets) == pytest.approx(4 * ln2 / 8)
    # one prompt per answer: the prompt decides, the floor is 0
    assert metrics.blind_nll_floor(["a", "b"], [[yes, eos], [no, eos]]) == 0.0
    # a shared first token: only the node where the answers part costs (2 ln 2 over 6 tokens)
    assert metrics.blind_nll_floor(["a", "a"], [[7, 8, eos], [7, 9, eos]]) == pytest.approx(2 * ln2 / 6)
    # answers of different lengths: per token, not per item (ln 2 at the root over 3 + 2 tokens)
    assert metrics.blind_nll_floor(["a", "a"], [[7, 8, eos], [9, eos]]) == pytest.approx(2 * ln2 / 5)
    # weights count a row several times: 3 yes, 1 no
    h = -(3 * math.log(3 / 4) + math.log(1 / 4))
    assert metrics.blind_nll_floor(["a", "a"], [[yes, eos], [no, eos]], [3, 1]) == pytest.approx(h / 8)
    # teacher forcing: the second token is predicted after the first, so [7] and [7, 9] cost nothing
    assert metrics.blind_nll_floor(["a", "a"], [[7], [7, 9]]) == 0.0
    # the paper's quirk reads token j at a fixed position: contexts (prompt, j), not the earlier tokens
    quirk = metrics.blind_nll_floor(
        ["a"] * 4, [[1, 7, 8], [1, 9, 8], [1, 7, 8], [1, 9, 3]], teacher_forced=False
    )
    assert quirk == pytest.approx((4 * ln2 - 3 * math.log(3 / 4) - math.log(1 / 4)) / 12)
    assert metrics.blind_nll_floor(["a"] * 4, [[1, 7, 8], [1, 9, 8], [1, 7, 8], [1, 9, 3]]) == pytest.approx(
        (4 * ln2 + 2 * ln2) / 12
    )
    with pytest.raises(ValueError, match="2 prompts, 1 targets, 1 weights"):
        metrics.blind_nll_floor(["a", "b"], [[1]])
    with pytest.raises(ValueError, match="no target tokens"):
        metrics.blind_nll_floor(["a"], [[]])
    with pytest.raises(ValueError, match="weights must be >= 0"):
        metrics.blind_nll_floor(["a"], [[1]], [-1])


def test_chance_level_is_the_mean_over_query_items_of_one_over_their_options():
    rec = metrics.episode_record
    records = [
        rec(0, "single-choose", ["a"], [0], [[True, False]], [1.0], [1.0], ["a", "a"], n_options=[2, 4]),
        rec(1, "single-choose", ["a"], [0], [[True, True, True]], [1.0], [1.0], ["a"] * 3, n_options=[2, 2, 2]),
    ]  # fmt: skip
    # (1/2 + 1/4 + 3 * 1/2) / 5 items, not the mean of the episodes' means
    assert metrics.summarize(records)["single-choose"]["chance"] == pytest.approx(2.25 / 5)
    free = rec(2, "single-choose", ["a"], [0], [[True]], [1.0], [1.0], ["a"])  # free text: no options
    assert metrics.summarize([*records, free])["single-choose"]["chance"] is None
    with pytest.raises(ValueError, match="option counts"):
        rec(3, "single-choose", ["a"], [0], [[True]], [1.0], [1.0], ["a"], n_options=[0])

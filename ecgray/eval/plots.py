"""PNG figures of meta-test results (matplotlib, Agg backend: no display needed).

- `plot_accuracy_vs_step`: one panel per question type; the meta-test's exact match vs inner step with its
  confidence band (eval.ci_method's interval); methods with one step (the shortcut controls text_lookup,
  support_majority, encoder_prototype; blind_llm, in_context) as horizontal lines, adapted ones (ecg_free,
  supervised, finetune_scratch) and lead subsets as curves with markers.
- `plot_per_class`: exact match per class at the last inner step (horizontal bars).
"""

from __future__ import annotations

import math
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve(entry: dict, metric: str) -> tuple[list[float], list[float], list[float]]:
    cis = entry[metric]
    nan = math.nan
    return (
        [c["mean"] for c in cis],
        [c["lo"] if c["lo"] is not None else nan for c in cis],
        [c["hi"] if c["hi"] is not None else nan for c in cis],
    )


def plot_accuracy_vs_step(
    results: dict[str, dict], path: str | Path, metric: str = "exact_match", main: str = "meta_test"
) -> Path:
    """results: method name -> a `run_episodes` result (must hold `main`). Writes a PNG to path."""
    plt = _pyplot()
    if main not in results:
        raise ValueError(f"plot_accuracy_vs_step: no {main!r} result among {sorted(results)}")
    types = list(results[main]["summary"])
    fig, axes = plt.subplots(1, len(types), figsize=(5.5 * len(types), 4.2), squeeze=False)
    for ax, qt in zip(axes[0], types, strict=True):
        entry = results[main]["summary"][qt]
        steps = entry["steps"]
        mean, lo, hi = _curve(entry, metric)
        ax.plot(steps, mean, color="C0", marker="o", label=f"{main} (n={entry['episodes']})")
        ax.fill_between(steps, lo, hi, color="C0", alpha=0.2, label="95 % CI" if len(steps) else None)
        for color, (name, result) in enumerate(((k, v) for k, v in results.items() if k != main), start=1):
            other = result["summary"].get(qt)
            if other is None:
                continue
            o_mean, _, _ = _curve(other, metric)
            if len(other["steps"]) == 1:
                ax.axhline(o_mean[0], color=f"C{color}", linestyle="--", label=name)
            else:
                ax.plot(
                    other["steps"],
                    o_mean,
                    color=f"C{color}",
                    marker="s",
                    markersize=3,
                    linestyle=":",
                    label=name,
                )
        ax.set_title(qt)
        ax.set_xlabel("inner step")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_per_class(result: dict, path: str | Path) -> Path:
    """Per-class exact match at the last inner step of one result (all question types together)."""
    plt = _pyplot()
    rows = []
    for qt, entry in result["summary"].items():
        if qt == "all":
            continue
        for cls, c in entry["per_class"].items():
            rows.append((cls, c["accuracy"], c["total"]))
    if not rows:
        raise ValueError("plot_per_class: the result has no per-class counts")
    rows.sort(key=lambda r: r[1])
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.28 * len(rows)))
    ax.barh([r[0] for r in rows], [r[1] for r in rows], color="C0")
    for y, (_, acc, total) in enumerate(rows):
        ax.text(min(acc + 0.01, 0.9), y, f"{acc:.2f} (n={total})", va="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"exact match after step {result['steps'][-1]}")
    ax.set_title(f"{result['method']}: per-class accuracy")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

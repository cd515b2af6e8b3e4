"""Evaluation cost of the demo, before and after: seconds per meta-test episode per stage and method, on
the demo's checkpoint and episodes, and whether both give the same per-episode, per-step exact matches.

    .venv/bin/python bench/eval_cost.py                       # runs/demo, before = git HEAD, after = this tree
    .venv/bin/python bench/eval_cost.py --run runs/demo --before 2c4bb41 --episodes 4 --stages grounded/single-verify
    .venv/bin/python bench/eval_cost.py --before 2c4bb41 --curve-stride 5   # after answers at steps 0 and 5 only
    .venv/bin/python bench/eval_cost.py --before 2f152f5 --before-curve-stride 1 --dtype float32 --episodes 4
    .venv/bin/python bench/eval_cost.py --before sequential --before-curve-stride 1 --dtype float32 --episodes 4

Config keys the before revision does not know are dropped on its side (from the run's config and the
checkpoint's), and only when they hold this tree's default (else the bench stops, naming the key): such a
revision behaves as the default. A checkpoint the revision cannot load (a newer mapper) stops it too.

"Before" is today's path of a git revision (`--before`, default HEAD): its `ecgray` package is exported
with `git archive` into a temporary directory and run from there; "after" is the package of this working
tree. `--before sequential` is this tree's package with every saving of the lockstep evaluation off, the
path the evaluation issue measured (2c4bb41, which cannot load a grounded mapper): each adapting method
alone, one episode at a time, its own inner loop (no `adapts_like`) on every support row (no rows shared
by identical prompts), blind_llm one episode at a time, the model built in every stage; with
`--before-curve-stride 1` it also answers after every inner step. Each runs in its own subprocess, one
after the other, and runs the demo's evaluation stages (`ecgray.demo`'s meta-test block: every protocol x
question type, `ecgray.eval.cli.evaluate` with the run's config) on the same episodes: before builds the
model and reads the QA rows in every stage as it does, after once for all (as the demo now does; timed as
`after_once_per_run_s`). Per method: the adapting methods run as one lockstep batch after, so they are
timed together there (`seconds_by_method` of results.json).

Identity: every method's per-episode exact match at every step after reports (0, every
eval.curve_stride-th, the last) and its last-step predictions must be those of before, bitwise, in every
dtype (the cells are fractions of right answers). In bf16 the same arithmetic batched otherwise rounds
otherwise, so a decision whose two best option scores lie within a few bf16 roundings of each other can
flip: the bench records the option score margins of before's decisions (by wrapping `score_options`) and
reports how many lie under `--margin-ulps` units of bf16 rounding (`near_ties_before`) beside the cells that
differ, as context; it does not count such flips as identical (matching each flip to its own margin would
need the queries aligned across the two batchings, which the bench does not do). The last line is `eval speedup: <x>x, identical: <yes|no>`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ one side (child)


def run_side(args) -> dict:
    """In a child process whose sys.path starts at the side's package: every stage, timed."""
    import dataclasses

    import torch
    import yaml

    import ecgray
    from ecgray.config import from_dict
    from ecgray.demo import eval_types, protocols
    from ecgray.eval import baselines as B
    from ecgray.eval import cli
    from ecgray.eval import meta_test as mt
    from ecgray.models import ecg_lm

    run = Path(args.run).resolve()
    raw = yaml.safe_load((run / "config.yaml").read_text())
    checkpoint, prepared = run / "checkpoint", run / "data" / "prepared"
    dropped = known_keys_only(
        raw
    )  # keys a revision before them does not know; the parent checks their values
    saved = yaml.safe_load((checkpoint / "config.yaml").read_text())
    if known_keys_only(saved):  # the checkpoint's config too: the same mapper, in a temporary copy
        import shutil

        copy = Path(tempfile.mkdtemp(prefix="eval-cost-checkpoint-")) / "checkpoint"
        shutil.copytree(checkpoint, copy)
        (copy / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
        checkpoint = copy
    cfg = from_dict(raw)
    if args.dtype:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=args.dtype))
    stride = {"after": args.curve_stride, "before": args.before_curve_stride}[args.side]
    if stride:
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, curve_stride=stride))
    if args.episodes:
        by_type = {k: (args.episodes if v > 0 else 0) for k, v in cfg.eval.episodes_by_type.items()}
        cfg = dataclasses.replace(
            cfg, eval=dataclasses.replace(cfg.eval, episodes=args.episodes, episodes_by_type=by_type)
        )
    # per-method wall time of the path that has no `seconds_by_method`: wrap what evaluate calls
    timings: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0

        return wrapper

    sequential = args.side == "before" and args.before == SEQUENTIAL
    if sequential:
        mt.run_adapting = one_at_a_time(mt.run_adapting, timings)
        B.blind_llm = timed("blind_llm", episode_by_episode(B.blind_llm, mt, "blind_llm"))
    if not hasattr(cli, "load_model"):
        mt.meta_test = timed("meta_test", mt.meta_test)
        for name in B.BASELINES:
            setattr(B, name, timed(name, getattr(B, name)))
    # option score margins (best - second best) of every decoded query, in call order (bf16 check)
    margins: list[float] = []
    score_options = ecg_lm.ECGLanguageModel.score_options

    def recording(self, prefix, questions, options, *a, **kw):
        scores = score_options(self, prefix, questions, options, *a, **kw)
        for s in scores:
            top = torch.topk(s.float(), min(2, len(s))).values.tolist()
            margins.append(top[0] - top[1] if len(top) > 1 else float("inf"))
        return scores

    ecg_lm.ECGLanguageModel.score_options = recording

    model, qa, build_s = None, None, 0.0
    if hasattr(cli, "load_model") and not sequential:
        # the after path builds the model (and reads the QA rows, where it can) once for every stage
        t0 = time.perf_counter()
        model = cli.load_model(cfg, checkpoint)
        if hasattr(cli, "EvalQA"):
            qa = cli.EvalQA.read(cfg, prepared, eval_types(cfg))
        build_s = time.perf_counter() - t0
    stages = {}
    wanted = set(args.stages.split(",")) if args.stages else None
    for protocol in protocols(cfg):
        for qt in eval_types(cfg):
            stage = f"{protocol}/{qt}"
            if wanted is not None and stage not in wanted:
                continue
            qcfg = dataclasses.replace(
                cfg, episodes=dataclasses.replace(cfg.episodes, question_type=qt, protocol=protocol)
            )
            timings.clear()
            kw = {} if model is None else {"model": model}
            if qa is not None:
                kw["qa"] = qa
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                payload = cli.evaluate(qcfg, checkpoint, prepared, out, progress=False, **kw)
                seconds = time.perf_counter() - t0
            stages[stage] = {
                "seconds": seconds,
                "episodes": payload["episodes"],
                "by_method": by_method(payload, timings, sequential),
                "records": {
                    name: [
                        {k: r[k] for k in ("index", "steps", "exact_match", "predictions")}
                        for r in result["episodes"]
                    ]
                    for name, result in payload["results"].items()
                },
            }
            print(f"[{args.side}] {stage}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return {
        "package": str(Path(ecgray.__file__).parent),
        "dtype": str(next(model.llm.parameters()).dtype) if model is not None else None,
        "build_seconds": build_s,
        "threads": torch.get_num_threads(),
        "stages": stages,
        "margins": margins,
        "dropped_keys": dropped,
    }


def by_method(payload: dict, timings: dict[str, float], sequential: bool) -> dict[str, float]:
    """Seconds per method of one stage: evaluate's own figures (the adapting methods together, under one
    joined name), the wrapped methods' where evaluate has none (an old revision) or where the sequential
    path runs them one by one."""
    own = payload.get("seconds_by_method") or {}
    if sequential:
        return {k: v for k, v in own.items() if "+" not in k} | timings
    return own or dict(timings)


SEQUENTIAL = "sequential"
"""--before value: this tree's package without the lockstep evaluation's savings (module docstring)."""


def one_at_a_time(run_adapting, timings: dict[str, float]):
    """`run_adapting` as the evaluation ran before lockstep: every method alone (its own inner loop, no
    `adapts_like`; every support and query row, no distinct-prompt rows), one episode per pass; each
    method's wall time added to timings[name]."""
    import dataclasses

    def sequential(model, methods, episodes, cfg, **kw):
        one = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, episodes_per_pass=1))
        out = {}
        for method in methods:
            alone = dataclasses.replace(method, reads_ecg=True, adapts_like=None)
            t0 = time.perf_counter()
            out[method.name] = run_adapting(model, [alone], episodes, one, **kw)[method.name]
            timings[method.name] = timings.get(method.name, 0.0) + time.perf_counter() - t0
        return out

    return sequential


def episode_by_episode(method, mt, name: str):
    """A non-adapting method run on one episode at a time (blind_llm before its prompts were decoded for
    all episodes at once), its records and summary as one run gives them."""

    def per_episode(model, episodes, store, cfg, **kw):
        records = []
        for index, episode in enumerate(episodes):
            record = method(model, [episode], store, cfg, **kw)["episodes"][0]
            records.append(record | {"index": index})
        return mt._result(name, records, cfg, mt.options_used(model, cfg))

    return per_episode


def known_keys_only(raw: dict) -> dict:
    """Drop, in place, the config keys this side's `ecgray.config.Config` does not know (a revision older than
    them) -> {"section.key": value} dropped."""
    import dataclasses

    from ecgray.config import Config

    dropped = {}
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for name in list(raw):
        if name not in sections:
            dropped[name] = raw.pop(name)
            continue
        value = raw[name]
        default = Config()
        section = getattr(default, name)
        if isinstance(value, dict) and dataclasses.is_dataclass(section):
            known = {f.name for f in dataclasses.fields(section)}
            for key in [k for k in value if k not in known]:
                dropped[f"{name}.{key}"] = value.pop(key)
    return dropped


def check_dropped(dropped: dict, side: str) -> None:
    """A key the side's revision does not know must hold this tree's default (the revision behaves so)."""
    from ecgray.config import Config

    default = Config()
    for key, value in dropped.items():
        section, _, name = key.partition(".")
        expected = getattr(getattr(default, section), name) if name else getattr(default, section)
        if value != expected:
            raise SystemExit(
                f"{key}={value!r} in the run's config, which the '{side}' revision does not know (this tree's "
                f"default: {expected!r}): it would evaluate otherwise"
            )


# ------------------------------------------------------------------------------------ compare (parent)


def compare(before: dict, after: dict, margin_bound: float) -> dict:
    """Cells (episode, reported step) whose exact match differs and episodes whose predictions differ, over
    every stage and method; identical = neither; near_ties_before: context for bf16 (module docstring)."""
    import math

    small = sum(1 for m in before["margins"] if m < margin_bound)
    out = {"cells": 0, "differing_cells": 0, "differing_predictions": 0, "near_ties_before": small}
    for stage, b in before["stages"].items():
        a = after["stages"][stage]
        for method, recs in a["records"].items():
            old = {r["index"]: r for r in b["records"][method]}
            for r in recs:
                o = old[r["index"]]
                for step, em in zip(r["steps"], r["exact_match"], strict=True):
                    out["cells"] += 1
                    if not math.isclose(em, o["exact_match"][o["steps"].index(step)], abs_tol=0.0):
                        out["differing_cells"] += 1
                out["differing_predictions"] += int(r["predictions"] != o["predictions"])
    out["identical"] = out["differing_cells"] == 0 and out["differing_predictions"] == 0
    return out


def export_revision(rev: str, into: Path) -> Path:
    """`git archive rev ecgray` unpacked into `into` (read-only use of the repository)."""
    archive = subprocess.run(["git", "archive", rev, "ecgray"], cwd=REPO, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--run", default="runs/demo", help="a demo run directory (config.yaml, checkpoint/, data/)"
    )
    p.add_argument(
        "--before",
        default="HEAD",
        help=f"git revision whose evaluation is 'before', or '{SEQUENTIAL}' (module docstring)",
    )
    p.add_argument("--episodes", type=int, default=0, help="episodes per stage (0: the run's own)")
    p.add_argument("--stages", default="", help="comma-separated protocol/question-type (default: all)")
    p.add_argument("--dtype", default="", help="model.dtype for both sides (default: the run's)")
    p.add_argument("--curve-stride", type=int, default=0,
                   help="after only: eval.curve_stride (answer after steps 0, every k-th and the last; before "
                        "answers after every step, and identity is checked at after's steps)")  # fmt: skip
    p.add_argument("--before-curve-stride", type=int, default=0,
                   help="before only: eval.curve_stride (e.g. 1: answer after every step, as the evaluation "
                        "the issue measured did; identity is checked at after's steps)")  # fmt: skip
    p.add_argument("--margin-ulps", type=float, default=64.0,
                   help="bf16: near_ties_before counts before's margins under this many bf16 ulps")  # fmt: skip
    p.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side in this process
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        Path(args.json).write_text(json.dumps(run_side(args)))
        return 0
    env = dict(os.environ, ECGRAY_CACHE=os.environ.get("ECGRAY_CACHE", str(REPO / ".cache" / "ecgray")))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        before_code = REPO if args.before == SEQUENTIAL else export_revision(args.before, Path(tmp))
        code = {"before": before_code, "after": REPO}
        for side in ("before", "after"):
            out = Path(tmp) / f"{side}.json"
            cmd = [sys.executable, __file__, *sys.argv[1:], "--side", side, "--json", str(out)]
            side_env = dict(env, PYTHONPATH=f"{code[side]}{os.pathsep}{env.get('PYTHONPATH', '')}")
            subprocess.run(cmd, env=side_env, cwd=REPO, check=True)
            results[side] = json.loads(out.read_text())
    before, after = results["before"], results["after"]
    for side in ("before", "after"):
        check_dropped(results[side]["dropped_keys"], side)
    if before["package"] == after["package"] and args.before != SEQUENTIAL:
        raise SystemExit(f"both sides imported {before['package']}: PYTHONPATH did not take")
    dtype = (after["dtype"] or "").removeprefix("torch.")
    # bf16 rounding of an option score of magnitude ~|score|: margin-ulps units of 2^-8 relative
    bound = args.margin_ulps * 2.0**-8 if dtype == "bfloat16" else 0.0
    check = compare(before, after, bound)
    table = []
    total_before = total_after = 0.0
    episodes_total = 0
    for stage, b in before["stages"].items():
        a = after["stages"][stage]
        n = b["episodes"]
        episodes_total += n
        total_before += b["seconds"]
        total_after += a["seconds"]
        table.append(
            {
                "stage": stage,
                "episodes": n,
                "before_s_per_episode": round(b["seconds"] / n, 2),
                "after_s_per_episode": round(a["seconds"] / n, 2),
                "speedup": round(b["seconds"] / a["seconds"], 2),
                "before_by_method_s_per_episode": {k: round(v / n, 2) for k, v in b["by_method"].items()},
                "after_by_method_s_per_episode": {k: round(v / n, 2) for k, v in a["by_method"].items()},
            }
        )
    total_after += after["build_seconds"]  # once for every stage (before: inside each stage)
    speedup = total_before / total_after
    report = {
        "conditions": {
            "run": args.run,
            "before": args.before,
            "dtype": dtype,
            "after_curve_stride": args.curve_stride or "the run's",
            "before_curve_stride": args.before_curve_stride or "the run's",
            "threads": after["threads"],
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
        },
        "stages": table,
        # after's work done once for all stages: the model built, the QA rows read (before: in every stage)
        "after_once_per_run_s": round(after["build_seconds"], 2),
        "total_s_per_episode": {
            "before": round(total_before / episodes_total, 2),
            "after": round(total_after / episodes_total, 2),
        },
        "identity": check,
    }
    print(json.dumps(report, indent=2))
    print(f"eval speedup: {speedup:.2f}x, identical: {'yes' if check['identical'] else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

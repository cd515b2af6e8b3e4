"""The demo's headline over several meta-training seeds: mean and spread across seeds, paired tests per seed.

    python bench/seeds.py --run runs/demo --seeds 1 2

Reuses a finished demo run (its resolved config.yaml, prepared shards and encoder); for each extra seed it
meta-trains on Ray Train exactly as the demo does (`meta_train`, `seed` changed: theta's init, the
meta-train episode stream, dropout) and evaluates the headline protocol's question types with every control
on the same meta-test episodes as the demo (`eval.seed` unchanged). A run with an alignment stage
(align.steps > 0) is aligned again per seed (`align.seed`) and meta-trained from that; with --keep-alignment
every seed is meta-trained from the demo's own alignment (align/), so the spread is the meta-training's
alone. Seed 0's numbers are the demo's own (`runs/demo/eval/<protocol>/<type>/results.json`). Prints, per
question type and method, exact match at the last inner step per seed with its mean and standard deviation
across seeds, then each seed's paired comparisons (model minus baseline, 95 % interval, Wilcoxon p); writes
RUN/seeds/summary.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="a finished `ecgray demo` run directory")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[1, 2], help="meta-training seeds besides the run's"
    )
    parser.add_argument(
        "--keep-alignment",
        action="store_true",
        help="meta-train every seed from the demo's own alignment (align/) instead of aligning again per "
        "seed: the spread is then the meta-training's alone",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        help="eval-only overrides for the extra seeds, e.g. a shorter eval.baselines",
    )
    args = parser.parse_args()

    import ray

    from ecgray.config import load_config
    from ecgray.demo import eval_types, protocols
    from ecgray.eval.cli import evaluate
    from ecgray.logs import console, say
    from ecgray.train.align import align
    from ecgray.train.meta_train import meta_train

    run = Path(args.run).resolve()
    base = load_config(run / "config.yaml")
    bad = [o for o in args.set if not o.startswith("eval.")]
    if bad:
        raise SystemExit(f"--set {bad}: only eval.* keys (the meta-training must stay the demo's)")
    protocol = protocols(base)[0]
    prepared = Path(base.data.prepared_dir)
    evals: dict[int, dict[str, dict]] = {base.seed: {}}
    for qt in eval_types(base):
        path = run / "eval" / protocol / qt / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not a finished demo run (run `ecgray demo --out {run}` first)")
        evals[base.seed][qt] = json.loads(path.read_text())
    with console(str(run / "seeds"), "bench_seeds"):  # Ray's and the frameworks' lines go to its log
        ray.init(include_dashboard=False, configure_logging=False)
        for seed in args.seeds:
            out = run / "seeds" / f"seed{seed}"
            cfg = replace(
                base,
                seed=seed,
                train=replace(base.train, storage_path=str(out / "ray_train"), name=f"seed{seed}"),
            )
            if base.align.steps > 0 and args.keep_alignment:  # every seed starts from the demo's alignment
                if not (run / "align" / "mapper.safetensors").is_file():
                    raise FileNotFoundError(f"{run / 'align'}: the demo's alignment checkpoint is missing")
                cfg = replace(cfg, align=replace(cfg.align, checkpoint=str(run / "align")))
            elif base.align.steps > 0:
                # the alignment is trained again with this seed, then meta-training from it
                aligned = out / "align"
                align_cfg = replace(cfg.align, seed=seed, name=f"seed{seed}_align", checkpoint=None)
                if not (aligned / "mapper.safetensors").is_file():
                    say(f"seed {seed}: alignment")
                    result = align(replace(cfg, align=align_cfg))
                    if result.checkpoint is None:
                        raise RuntimeError(
                            f"seed {seed}: alignment ended without a checkpoint ({result.error})"
                        )
                    with result.checkpoint.as_directory() as d:
                        shutil.copytree(d, aligned, dirs_exist_ok=True)
                cfg = replace(cfg, align=replace(align_cfg, checkpoint=str(aligned)))
            checkpoint = out / "checkpoint"
            if not (checkpoint / "mapper.safetensors").is_file():
                say(f"seed {seed}: meta-training")
                result = meta_train(cfg)
                if result.checkpoint is None:
                    raise RuntimeError(
                        f"seed {seed}: meta-training ended without a checkpoint ({result.error})"
                    )
                with result.checkpoint.as_directory() as d:
                    shutil.copytree(d, checkpoint, dirs_exist_ok=True)
            evals[seed] = {}
            for qt in eval_types(base):
                eval_dir = out / "eval" / protocol / qt
                if (eval_dir / "results.json").is_file():
                    evals[seed][qt] = json.loads((eval_dir / "results.json").read_text())
                    continue
                qcfg = load_config(None, args.set, base=cfg)
                qcfg = replace(qcfg, episodes=replace(qcfg.episodes, question_type=qt, protocol=protocol))
                say(f"seed {seed}: evaluating {qt}")
                payload = evaluate(qcfg, checkpoint, prepared, eval_dir, progress=False)
                payload.pop("curves")
                evals[seed][qt] = payload
        ray.shutdown()

    seeds = sorted(evals)
    summary: dict = {
        "protocol": protocol, "seeds": seeds, "keep_alignment": args.keep_alignment, "methods": {},
        "comparisons": {},
    }  # fmt: skip
    aligned = "the demo's alignment for every seed" if args.keep_alignment else "aligned again per seed"
    print(f"{protocol} protocol, exact match at the last inner step, meta-training seeds {seeds} ({aligned})")
    print(
        f"{'question type':<15} {'method':<18} "
        + " ".join(f"{'seed ' + str(s):>8}" for s in seeds)
        + "   mean +- sd"
    )
    for qt in eval_types(base):
        methods = [
            m for m in evals[seeds[0]][qt]["results"] if all(m in evals[s][qt]["results"] for s in seeds)
        ]
        for method in methods:
            values = [
                evals[s][qt]["results"][method]["summary"][qt]["exact_match"][-1]["mean"] for s in seeds
            ]
            sd = statistics.stdev(values) if len(values) > 1 else float("nan")
            summary["methods"].setdefault(qt, {})[method] = {
                "per_seed": values,
                "mean": statistics.mean(values),
                "sd": sd,
            }
            cells = " ".join(f"{v:>8.3f}" for v in values)
            print(f"{qt:<15} {method:<18} {cells}   {statistics.mean(values):.3f} +- {sd:.3f}")
    print("\npaired, model minus baseline: difference [95 % CI] p, per seed")
    for qt in eval_types(base):
        for s in seeds:
            for c in evals[s][qt]["comparisons"]:
                if c["question_type"] != qt:
                    continue
                summary["comparisons"].setdefault(qt, {}).setdefault(c["baseline"], []).append(
                    {"seed": s, **c}
                )
                print(
                    f"{qt:<15} seed {s}  - {c['baseline']:<18} {c['mean_difference']:+.3f} "
                    f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] p={c['p_value']:.2g}"
                )
    (run / "seeds").mkdir(exist_ok=True)
    (run / "seeds" / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {run / 'seeds' / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

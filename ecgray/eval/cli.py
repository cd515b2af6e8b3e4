"""`ecgray eval --checkpoint DIR --data PREPARED_DIR --out DIR [--config FILE] [--set key=value ...]`

Loads the checkpoint (mapper weights + the config that produced them; encoder and LLM are rebuilt from that
config), applies --config / --set on top of it, draws `eval.episodes` meta-test episodes (or
`eval.episodes_by_type[question type]`; seed `eval.seed`) from the prepared dir, runs the meta-test, the
baselines in `eval.baselines` and the lead subsets in `eval.lead_subsets` on the same episodes, and writes
into --out:
  results.json            every result (per question type x inner step: exact match, token accuracy with /
                          without BOS, CIs; per class; per episode), the resolved config and versions
  config.yaml, versions.json
  accuracy_vs_step.png    exact match vs inner step per question type, baselines included
  per_class.png           the meta-test's per-class accuracy at the last step
and prints a summary table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ecgray.cli import add_config_arguments

    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint dir (mapper.safetensors + config.yaml)"
    )
    parser.add_argument("--data", required=True, help="prepared dir (ecgs/, qa/) written by `ecgray prepare`")
    parser.add_argument("--out", required=True, help="output dir for results.json and the PNGs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_arguments(parser)


def _jsonable(value):
    """NaN / inf -> None so results.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def summary_table(results: dict[str, dict]) -> str:
    """method x question type: exact match at step 0 and at the last step (+- CI half-width), token acc."""
    lines = [
        f"{'method':<22} {'question type':<15} {'n':>5} {'EM step 0':>10} {'EM last':>16} "
        f"{'tok+BOS last':>13} {'tok last':>9}"
    ]
    for name, result in results.items():
        for qt, e in result["summary"].items():
            first, last = e["exact_match"][0], e["exact_match"][-1]
            half = last["half_width"]
            half_s = "n/a" if half is None or not math.isfinite(half) else f"{half:.3f}"
            lines.append(
                f"{name:<22} {qt:<15} {e['episodes']:>5} {first['mean']:>10.3f} "
                f"{last['mean']:>8.3f} +-{half_s:>5} (s{e['steps'][-1]}) "
                f"{e['token_acc_bos'][-1]['mean']:>5.3f} {e['token_acc'][-1]['mean']:>9.3f}"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ecgray.config import ConfigError, load_config
    from ecgray.models.checkpoint import load_checkpoint

    try:
        _, checkpoint_cfg = load_checkpoint(args.checkpoint)
        cfg = load_config(args.config, args.overrides, base=checkpoint_cfg)
        payload = evaluate(cfg, args.checkpoint, args.data, args.out, progress=not args.no_progress)
    except (ConfigError, FileNotFoundError, ValueError) as err:  # EpisodeError is a ValueError
        print(f"ecgray eval: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print(summary_table(payload["curves"]))
    print(f"wrote {out / 'results.json'}, {out / 'accuracy_vs_step.png'}, {out / 'per_class.png'}")
    return 0


def evaluate(cfg, checkpoint: str | Path, data: str | Path, out: str | Path, progress: bool = True) -> dict:
    """Meta-test the checkpoint's mapper on `cfg.eval.episodes_for(question type)` meta-test episodes drawn
    from the prepared dir `data`, plus the baselines and lead subsets of `cfg.eval`, all on the same episodes; write
    results.json, the resolved config and the PNGs into `out`. Returns the results payload (+ "curves").
    Bad data raises ValueError / FileNotFoundError naming it."""
    import torch

    from ecgray.config import ConfigError, save_config, to_dict, versions
    from ecgray.data.episodes import EpisodeSampler
    from ecgray.data.shards import ECGStore, read_qa
    from ecgray.eval import baselines as B
    from ecgray.eval.meta_test import load_template_answers, meta_test
    from ecgray.eval.plots import plot_accuracy_vs_step, plot_per_class
    from ecgray.models.checkpoint import load_checkpoint
    from ecgray.models.ecg_lm import build_model

    state, _ = load_checkpoint(checkpoint)
    cfg.data.prepared_dir = str(data)
    out = Path(out)
    started = time.time()

    store = ECGStore.open(data)
    if store.fs != cfg.encoder.fs:
        raise ValueError(
            f"{data}/ecgs are sampled at {store.fs} Hz but the encoder expects encoder.fs={cfg.encoder.fs} Hz"
        )
    samples = read_qa(
        data, source=cfg.data.source, variant=cfg.data.variant, question_types=cfg.episodes.types()
    )
    sampler = EpisodeSampler(samples, cfg.episodes, "meta-test", seed=cfg.eval.seed)
    episodes = sampler.episodes(cfg.eval.episodes_for(cfg.episodes.question_type), progress=progress)
    missing = sorted(
        {i["ecg_id"] for ep in episodes for i in ep["support"] + ep["query"]} - set(store.ecg_ids.tolist())
    )
    if missing:
        raise ValueError(f"{data}: qa rows refer to {len(missing)} ECGs not in ecgs/ (e.g. {missing[:5]})")

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg, device, mapper_state=state)
    meta_params = model.mapper_params()
    needs_options = model.cfg.decoding == "constrained" and cfg.eval.options != "support"
    template_answers = load_template_answers(cfg) if needs_options else None
    # every method sees the same ECGs: each is encoded once per lead subset
    common = {"template_answers": template_answers, "progress": progress, "feature_cache": {}}

    results: dict[str, dict] = {"meta_test": meta_test(model, meta_params, episodes, store, cfg, **common)}
    skipped: dict[str, str] = {}
    for name in cfg.eval.baselines:
        if name in ("blind_llm", "in_context") and model.cfg.paper_compat:
            skipped[name] = "not defined under model.paper_compat=True"
            print(f"ecgray eval: skipping {name}: {skipped[name]}", file=sys.stderr)
            continue
        if name == "blind_llm":
            results[name] = B.blind_llm(model, episodes, store, cfg, **common)
        elif name == "ecg_free":
            results[name] = B.ecg_free(model, meta_params, episodes, store, cfg, **common)
        elif name == "finetune_scratch":
            results[name] = B.finetune_scratch(model, episodes, store, cfg, **common)
        elif name == "in_context":
            results[name] = B.in_context(model, meta_params, episodes, store, cfg, **common)
        elif name == "supervised":
            items = B.meta_train_items(samples, cfg)
            params, losses = B.train_supervised(model, items, store, cfg, progress=progress)
            results[name] = B.supervised(model, params, episodes, store, cfg, **common)
            results[name]["train_losses"] = losses
            results[name]["train_samples"] = len(items)
        else:  # the config's Literal already rejects unknown names
            raise ConfigError(f"eval.baselines: unknown baseline {name!r}; expected one of {B.BASELINES}")
    leads = {
        name: meta_test(
            model, meta_params, episodes, store, cfg, leads=subset, method=f"leads {name}", **common
        )
        for name, subset in cfg.eval.lead_subsets.items()
    }

    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    payload = {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "device": str(device),
        "llm_dtype": str(next(model.llm.parameters()).dtype).removeprefix("torch."),
        "episodes": len(episodes),
        "seconds": round(time.time() - started, 2),
        "results": results,
        "lead_subsets": leads,
        "skipped": skipped,
        "config": to_dict(cfg),
        "versions": versions(),
    }
    (out / "results.json").write_text(json.dumps(_jsonable(payload), indent=1))
    curves = dict(results)
    curves.update({f"leads {k}": v for k, v in leads.items()})
    plot_accuracy_vs_step(curves, out / "accuracy_vs_step.png")
    plot_per_class(results["meta_test"], out / "per_class.png")
    payload["curves"] = curves
    return payload

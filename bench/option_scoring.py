"""Constrained decoding cost: scoring every admissible answer of a query set, the way `score_options` does
it (each prompt once, its KV cache shared by the sample's options run as one token trie) against one row per
option on the shared prompt cache (what ecgray did before the trie) and teacher forcing every option on its
full prompt (the definition). Prints JSON with the timings, the speedups and the largest score differences.

    .venv/bin/python bench/option_scoring.py --data runs/demo/data/prepared --config configs/demo.yaml

Options: a meta-test single-query episode of the prepared data with `eval.options` (default "question":
the template's admissible answers + the support set's answers), as the demo's evaluation scores them.
The mapper is freshly initialised: the cost does not depend on its weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace

import torch

from ecgray.config import load_config
from ecgray.data.episodes import EpisodeSampler
from ecgray.data.shards import ECGStore, read_qa
from ecgray.eval.meta_test import encode_ecgs, load_template_answers, options_mode, query_options
from ecgray.models.ecg_lm import _pad, build_model


def full_rows(model, prefix, questions, options, chunk: int = 128) -> list[torch.Tensor]:
    """Teacher forcing each option on its whole prompt (the reference)."""
    flat = [(i, o) for i, opts in enumerate(options) for o in opts]
    scores = []
    with torch.no_grad():
        for start in range(0, len(flat), chunk):
            part = flat[start : start + chunk]
            rows = model.prompt_rows([questions[i] for i, _ in part], [o for _, o in part])
            scores.append(-model.token_nll(prefix[[i for i, _ in part]], model.collate(rows)).sum(1))
    return list(torch.cat(scores).split([len(o) for o in options]))


def option_rows(model, prefix, questions, options, chunk: int = 128) -> list[torch.Tensor]:
    """Each prompt once, its KV cache shared by its options, one row per option (no trie)."""
    flat = [(i, model.answer_ids(o)) for i, opts in enumerate(options) for o in opts]
    with torch.no_grad():
        batch = model.collate(model.prompt_rows(questions, None))
        hidden, offset, cache = model._forward(prefix, batch, keep_cache=True)
        p = prefix.shape[1]
        last = offset + p + batch.after_mask.sum(1) - 1
        first_logp = torch.log_softmax(model.logits(hidden[torch.arange(len(questions)), last]), -1)
        prompt_mask = torch.cat(
            [batch.before_mask, batch.before_mask.new_ones(len(questions), p), batch.after_mask], 1
        )
        prompt_len = prompt_mask.sum(1)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        order = sorted(range(len(flat)), key=lambda j: len(flat[j][1]))
        flat_scores = torch.empty(len(flat))
        for start in range(0, len(flat), chunk):
            rows = order[start : start + chunk]
            part = [flat[j] for j in rows]
            owner = torch.tensor([i for i, _ in part])
            ids, mask = _pad([o for _, o in part], model.pad_id, left=False)
            out = model.decoder(
                inputs_embeds=model.embed(ids),
                attention_mask=torch.cat([prompt_mask[owner], mask], 1),
                position_ids=prompt_len[owner, None] + torch.arange(ids.shape[1])[None],
                use_cache=True,
                **{model._cache_kw: model._new_cache([(k[owner], v[owner]) for k, v in kv])},
            )
            targets = torch.cat([ids[:, 1:], ids.new_full((len(part), 1), model.pad_id)], 1)
            targets[torch.arange(len(part)), mask.sum(1) - 1] = model.eos_id
            keep = mask.bool()
            logp = torch.log_softmax(model.logits(out.last_hidden_state[keep]), -1)
            tok = logp.gather(1, targets[keep][:, None])[:, 0]
            per_row = torch.zeros(len(part)).index_add_(0, torch.nonzero(keep)[:, 0], tok)
            flat_scores[torch.tensor(rows)] = per_row + first_logp[owner, ids[:, 0]]
    return list(flat_scores.split([len(o) for o in options]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--data", default="runs/demo/data/prepared", help="a prepared dir (ecgray prepare)")
    parser.add_argument("--question-type", default="single-query")
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto", help="model.dtype of the frozen LLM (auto: fp32 on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(
        args.config,
        [f"data.prepared_dir={args.data}", "encoder.checkpoint=null", f"model.dtype={args.dtype}"],
    )
    cfg = replace(cfg, episodes=replace(cfg.episodes, question_type=args.question_type))
    store = ECGStore.open(args.data)
    samples = read_qa(args.data, cfg.data.source, cfg.data.variant, [args.question_type])
    episodes = EpisodeSampler(samples, cfg.episodes, "meta-test", seed=cfg.eval.seed).episodes(args.episodes)
    model = build_model(cfg, "cpu").eval()
    answers = load_template_answers(replace(cfg, data=replace(cfg.data, ecgqa_dir=None)))
    timings = {"option_trie": 0.0, "option_rows": 0.0, "full_rows": 0.0}
    n_options, max_diff = 0, {"option_rows": 0.0, "full_rows": 0.0}
    for episode in episodes:
        query = episode["query"]
        pooled, tokens = encode_ecgs(model, store, [int(i["ecg_id"]) for i in query], None, None)
        with torch.no_grad():
            prefix = model.fuse(pooled, tokens)
        questions = [i["question"] for i in query]
        options = query_options(episode, answers, options_mode(cfg))
        n_options += sum(len(o) for o in options)
        results = {}
        for name, fn in (
            ("option_trie", model.score_options),
            ("option_rows", lambda *a: option_rows(model, *a)),
            ("full_rows", lambda *a: full_rows(model, *a)),
        ):
            t0 = time.perf_counter()
            with torch.no_grad():
                results[name] = fn(prefix, questions, options)
            timings[name] += time.perf_counter() - t0
        for other in max_diff:
            for a, b in zip(results["option_trie"], results[other], strict=True):
                if len(a):
                    max_diff[other] = max(max_diff[other], float((a - b).abs().max()))
    print(json.dumps({
        "bench": "option_scoring", "llm": cfg.model.llm, "dtype": args.dtype, "question_type": args.question_type,
        "episodes": len(episodes), "queries_per_episode": len(episodes[0]["query"]),
        "options_per_episode": n_options / len(episodes),
        "seconds_per_query_set": {k: round(v / len(episodes), 2) for k, v in timings.items()},
        "speedup_vs": {k: round(timings[k] / timings["option_trie"], 2) for k in max_diff},
        "max_abs_score_diff_vs": max_diff, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()

"""Baselines on the same meta-test episodes; each returns results shaped like `meta_test`'s.

- `blind_llm`: the frozen LLM on the question alone: no ECG, no prefix, nothing trained (step 0 only).
- `ecg_free`: the meta-learned mapper fed an all-zero ECG vector (and zero tokens), adapted on the support
  set like the model: what the prefix learns from the questions / answers alone.
- `supervised`: the same model trained by plain minibatch cross-entropy on meta-train samples
  (non-episodic; `train_supervised`), then evaluated like the meta-learned one (step 0 = no adaptation,
  then the same inner steps on each support set).
- `finetune_scratch`: a freshly initialised mapper (seeded, the same init for every episode) fine-tuned on
  each support set with the meta-test's inner loop: no meta-learning.
- `in_context`: no gradients; the support examples go into the prompt as text, each with its own ECG
  prefix (meta-learned mapper), then the query: `[BOS] (prefix_i "Question: q_i" "Answer: a_i" "\\n")*
  prefix "Question: q" "Answer: "`. The context is run once per episode and reused as a KV cache.
`blind_llm` and `in_context` cannot follow `model.paper_compat` (no prefix to read the answer over / the
answer is fed in the context) and refuse it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ecgray.config import Config
from ecgray.eval.meta_test import (
    Features,
    Params,
    StepScore,
    answer_query,
    copy_params,
    device_of,
    ecg_features,
    encode_ecgs,
    load_template_answers,
    meta_test,
    needs_tokens,
    run_episodes,
    score_predictions,
)
from ecgray.models.ecg_lm import ECGLanguageModel, PromptBatch

BASELINES = ("blind_llm", "ecg_free", "supervised", "finetune_scratch", "in_context")
CONTEXT_SEPARATOR = "\n"


def _view(model: ECGLanguageModel, **changes) -> ECGLanguageModel:
    """The same modules (nothing copied or reloaded) under a changed ModelConfig."""
    view = ECGLanguageModel(
        model.encoder, model.mapper, model.llm, model.tokenizer, dataclasses.replace(model.cfg, **changes)
    )
    view.training = model.training  # a new Module says training=True; the shared mapper's mode is the truth
    return view


def _options(model: ECGLanguageModel, cfg: Config, template_answers):
    if template_answers is None and model.cfg.decoding == "constrained" and cfg.eval.options != "support":
        return load_template_answers(cfg)
    return template_answers


def _refuse_paper_compat(model: ECGLanguageModel, name: str) -> None:
    if model.cfg.paper_compat:
        raise ValueError(f"baseline {name}: not defined under model.paper_compat=True (set it False)")


def fresh_mapper_params(model: ECGLanguageModel, seed: int) -> Params:
    """A freshly initialised mapper's parameters (seeded), on the model's device."""
    from ecgray.models.fusion import build_mapper

    if model.encoder is None:
        raise ValueError("fresh_mapper_params: the model has no encoder to take D_enc from")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mapper = build_mapper(model.cfg, model.encoder.d_enc, model.d_llm)
    device = device_of(model)
    return {k: v.detach().to(device) for k, v in mapper.named_parameters()}


# ------------------------------------------------------------------------------------------ blind_llm


def blind_llm(
    model, episodes, ecg_store, cfg: Config, *, template_answers=None, progress=False, feature_cache=None
) -> dict:
    """The LLM answers from the question alone (no prefix at all; feature_cache unused: nothing encoded)."""
    _refuse_paper_compat(model, "blind_llm")
    view = _view(model, n_prefix=0)

    def features(episode):  # nothing is encoded: only the query count matters
        n_s, n_q = len(episode["support"]), len(episode["query"])
        return (torch.zeros(n_s, 0), None), (torch.zeros(n_q, 0), None)

    def answerer(m, params, support_features, query_features, episode, options):
        q = episode["query"]
        prefix = torch.zeros(len(q), 0, m.d_llm, device=device_of(m))  # (B, 0, D_llm): no prefix
        return answer_query(m, prefix, [i["question"] for i in q], [i["answer"] for i in q], options)

    return run_episodes(
        view, None, episodes, features, cfg, template_answers=_options(model, cfg, template_answers),
        answerer=answerer, method="blind_llm", progress=progress,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- ecg_free


def ecg_free(
    model,
    meta_params,
    episodes,
    ecg_store,
    cfg: Config,
    *,
    template_answers=None,
    progress=False,
    feature_cache=None,
):
    """The meta-learned mapper on an all-zero ECG vector (and zero tokens), adapted like the model.
    (feature_cache is accepted for a uniform call and unused: no ECG is encoded.)"""
    device = device_of(model)
    d_enc = model.encoder.d_enc
    n_tokens = model.encoder.n_tokens(ecg_store.n_samples)

    def zeros(n: int) -> Features:
        tokens = torch.zeros(n, n_tokens, d_enc, device=device) if needs_tokens(model) else None
        return torch.zeros(n, d_enc, device=device), tokens

    def features(episode):
        return zeros(len(episode["support"])), zeros(len(episode["query"]))

    return run_episodes(
        model, lambda index: copy_params(meta_params), episodes, features, cfg,
        template_answers=_options(model, cfg, template_answers), method="ecg_free", progress=progress,
    )  # fmt: skip


# ----------------------------------------------------------------------------------- finetune_scratch


def finetune_scratch(
    model, episodes, ecg_store, cfg: Config, *, template_answers=None, progress=False, feature_cache=None
):
    """A fresh mapper (seed eval.seed, the same init for every episode) fine-tuned on each support set."""
    init = fresh_mapper_params(model, cfg.eval.seed)
    return run_episodes(
        model, lambda index: copy_params(init), episodes, ecg_features(model, ecg_store, None, feature_cache), cfg,
        template_answers=_options(model, cfg, template_answers), method="finetune_scratch", progress=progress,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------- supervised


def meta_train_items(samples: list[dict], cfg: Config) -> list[dict]:
    """Every sample of the meta-train classes (episodes.* split rules), once, with its class answer."""
    from ecgray.data.episodes import build_classes, class_answer, sample_identity, split_classes

    items, seen = [], set()
    for qt in cfg.episodes.types():
        classes = split_classes(build_classes(samples, qt, cfg.episodes), cfg.episodes)["meta-train"]
        for key in sorted(classes):
            for qid in sorted(classes[key]):
                for s in classes[key][qid]:
                    ident = sample_identity(s)
                    if ident in seen:  # a single-choose `none` sample sits in several classes
                        continue
                    seen.add(ident)
                    items.append(
                        {"ecg_id": int(s["ecg_id"][0]), "question": s["question"],
                         "answer": class_answer(s, qt), "class": key}
                    )  # fmt: skip
    if not items:
        raise ValueError("supervised baseline: no meta-train samples (check episodes.* and the qa rows)")
    return items


def train_supervised(
    model: ECGLanguageModel,
    items: list[dict],
    ecg_store,
    cfg: Config,
    steps: int | None = None,
    progress: bool = False,
) -> tuple[Params, list[float]]:
    """Plain minibatch cross-entropy of a fresh mapper on `items` (`meta_train_items`): `steps` (default
    eval.supervised_steps) AdamW steps of eval.supervised_batch_size samples drawn without replacement
    inside a pass, mapper dropout on. Seeded by eval.seed. -> (trained params, loss per step)."""
    from ecgray.meta import apply_meta_gradient

    steps = cfg.eval.supervised_steps if steps is None else steps
    batch_size = min(cfg.eval.supervised_batch_size, len(items))
    if steps < 1 or batch_size < 1:
        raise ValueError(f"train_supervised: steps={steps}, batch size={batch_size}; both must be >= 1")
    params = {k: v.clone().requires_grad_() for k, v in fresh_mapper_params(model, cfg.eval.seed).items()}
    optimizer = torch.optim.AdamW(
        params.values(), lr=cfg.eval.supervised_lr, weight_decay=cfg.meta.weight_decay
    )
    rng = np.random.default_rng([cfg.eval.seed, 1])
    order = rng.permutation(len(items))
    cursor, losses = 0, []
    iterator = range(steps)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="supervised", unit="step")
    was = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[]):  # dropout draws, seeded
            torch.manual_seed(cfg.eval.seed)
            for _ in iterator:
                if cursor + batch_size > len(order):
                    order, cursor = rng.permutation(len(items)), 0
                batch = [items[int(i)] for i in order[cursor : cursor + batch_size]]
                cursor += batch_size
                pooled, tokens = encode_ecgs(model, ecg_store, [b["ecg_id"] for b in batch], None)
                task = model.task_data(
                    pooled, tokens, [b["question"] for b in batch], [b["answer"] for b in batch]
                )
                loss = model.task_losses([params], [task])[0]
                grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
                apply_meta_gradient(optimizer, params, grads, cfg.meta.grad_clip)
                losses.append(float(loss.detach()))
    finally:
        model.train(was)
    return {k: v.detach() for k, v in params.items()}, losses


def supervised(
    model,
    supervised_params,
    episodes,
    ecg_store,
    cfg: Config,
    *,
    template_answers=None,
    progress=False,
    feature_cache=None,
) -> dict:
    """The supervised mapper (`train_supervised`) evaluated like the meta-learned one."""
    return meta_test(
        model, supervised_params, episodes, ecg_store, cfg, template_answers=template_answers,
        progress=progress, method="supervised", feature_cache=feature_cache,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------- in_context


@dataclasses.dataclass
class _Context:
    cache: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), batch 1
    length: int


def _context_cache(view: ECGLanguageModel, embeds: torch.Tensor) -> _Context:
    """Run the frozen LLM once over the context embeddings (1, L, D) and keep its KV cache."""
    length = embeds.shape[1]
    if view.sliding_window is not None and length >= view.sliding_window - 1:
        raise ValueError(
            f"in_context: a context of {length} tokens does not fit the LLM's sliding window "
            f"({view.sliding_window}); lower eval.in_context_k"
        )
    cache = view._new_cache(None)
    mask = torch.ones(1, length, dtype=torch.long, device=embeds.device)
    view.decoder(
        inputs_embeds=embeds.to(view.embed.weight.dtype),
        attention_mask=mask,
        position_ids=torch.arange(length, device=embeds.device)[None],
        use_cache=True,
        **{view._cache_kw: cache},
    )
    return _Context([(layer.keys, layer.values) for layer in cache.layers], length)


def _with_context(batch: PromptBatch, context: _Context) -> PromptBatch:
    """Replace the rows' `before` ([BOS]) by the shared context: its cache, expanded to the B rows."""
    b = batch.size
    device = batch.after_ids.device
    batch.before_ids = torch.zeros(b, context.length, dtype=torch.long, device=device)  # unused: cached
    batch.before_mask = torch.ones(b, context.length, dtype=torch.long, device=device)
    batch.cache = [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in context.cache]
    return batch


def _context_embeds(view: ECGLanguageModel, prefix: torch.Tensor, items: list[dict]) -> torch.Tensor:
    """[BOS] then, per support item, its prefix and "Question: q" "Answer: a" "\\n" -> (1, L, D_llm)."""
    sep = list(view.tokenizer(CONTEXT_SEPARATOR, add_special_tokens=False)["input_ids"])
    rows = view.prompt_rows([i["question"] for i in items], [i["answer"] for i in items], eos=False)
    device = prefix.device
    parts = [view.embed(torch.tensor([view.bos], dtype=torch.long, device=device))[0]] if view.bos else []
    for j in range(len(items)):
        parts.append(prefix[j].to(view.embed.weight.dtype))  # (n_prefix, D_llm)
        ids = torch.tensor(rows.after[j] + sep, dtype=torch.long, device=device)
        parts.append(view.embed(ids))  # (R_j, D_llm)
    return torch.cat(parts, dim=0)[None]  # (1, L, D_llm)


def _context_items(episode: dict, k: int | None) -> list[dict]:
    """The support items for the prompt: the first k of each class, interleaved class by class."""
    by_class: dict[str, list[dict]] = {}
    for item in episode["support"]:
        by_class.setdefault(item["class"], []).append(item)
    shots = max(len(v) for v in by_class.values()) if k is None else k
    return [v[j] for j in range(shots) for v in by_class.values() if j < len(v)]


def _context_answer(
    view: ECGLanguageModel, prefix, questions, golds, options, context: _Context
) -> StepScore:
    """Option scoring / greedy decoding of the query rows after the shared context."""
    if view.cfg.decoding == "constrained":
        flat = [(i, o) for i, opts in enumerate(options) for o in opts]
        scores = []
        for start in range(0, len(flat), 256):
            part = flat[start : start + 256]
            batch = view.collate(
                view.prompt_rows([questions[i] for i, _ in part], [o for _, o in part]), False
            )
            nll = view.token_nll(prefix[[i for i, _ in part]], _with_context(batch, context))
            scores.append(-nll.sum(1))
        per_query = torch.cat(scores).split([len(o) for o in options])
        predictions = [opts[int(s.argmax())] for opts, s in zip(options, per_query, strict=True)]
    else:
        generated: list[list[int]] = [[] for _ in questions]
        done = [False] * len(questions)
        for _ in range(view.cfg.max_answer_tokens):
            # a placeholder EOS at the end makes the next token's position a target (as in ECGLanguageModel)
            rows = view.prompt_rows(questions, [g + [view.eos_id] for g in generated], eos=False)
            batch = _with_context(view.collate(rows, use_cache=False), context)
            logits = view.target_logits(prefix, batch)
            last = torch.cumsum(batch.target_mask.sum(1), 0) - 1
            for i, tok in enumerate(logits[last].argmax(-1).tolist()):
                if not done[i]:
                    done[i] = tok == view.eos_id
                    if not done[i]:
                        generated[i].append(tok)
            if all(done):
                break
        predictions = [view.tokenizer.decode(g, skip_special_tokens=True).strip() for g in generated]
    return score_predictions(view, predictions, golds)


def in_context(
    model,
    meta_params,
    episodes,
    ecg_store,
    cfg: Config,
    *,
    template_answers=None,
    progress=False,
    feature_cache=None,
):
    """Support examples (with their ECG prefixes from the meta-learned mapper) in the prompt; no gradients."""
    _refuse_paper_compat(model, "in_context")
    view = _view(model, prompt_layout="prefix_first")  # the context is a sequence of prefix_first rows
    k = cfg.eval.in_context_k
    if k is not None and k < 1:
        raise ValueError(f"eval.in_context_k must be >= 1 or None, got {k}")
    encode = ecg_features(model, ecg_store, None, feature_cache)

    def features(episode):
        # the prompt's support items in prompt order, then the query
        items = _context_items(episode, k)
        return encode({"support": items, "query": episode["query"]})

    def answerer(m, params, support_features, query_features, episode, options):
        items = _context_items(episode, k)
        support_prefix = m.fuse(*support_features, params)  # (S, n_prefix, D_llm), prompt order
        context = _context_cache(m, _context_embeds(m, support_prefix, items))
        prefix = m.fuse(*query_features, params)  # (Q, n_prefix, D_llm)
        q = episode["query"]
        return _context_answer(
            m, prefix, [i["question"] for i in q], [i["answer"] for i in q], options, context
        )

    return run_episodes(
        view, lambda index: meta_params, episodes, features, cfg,
        template_answers=_options(model, cfg, template_answers), answerer=answerer, adapt_steps=0,
        method="in_context", progress=progress,
    )  # fmt: skip


__all__ = [
    "BASELINES",
    "blind_llm",
    "ecg_free",
    "finetune_scratch",
    "fresh_mapper_params",
    "in_context",
    "meta_train_items",
    "supervised",
    "train_supervised",
]

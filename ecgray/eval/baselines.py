"""Controls and baselines on the same meta-test episodes; each runs through `run_episodes` and returns
results shaped like `meta_test`'s (summary per question type and step, per-episode records).

Shortcut controls (method.md section 7; no LLM, nothing trained, step 0 only; their predictions are
answer lists, scored like the model's by `score_predictions`). Each chooses among exactly the options the
comparison gives every method for the query (`meta_test.episode_options`, eval.options); with free-text
decoding (no option sets) among the answers the support set shows.
- `text_lookup`: per query, the option most frequent among the support items whose question text equals
  the query's (exact string); ties go to the option more frequent in the whole support set: what the
  question text alone gives away.
- `support_majority`: the option most frequent in the support set.
- `encoder_prototype`: nearest class mean of the frozen encoder's pooled features inside the episode: a
  class's prototype is the mean pooled vector of its support items; a query takes the answer of the
  prototype nearest in Euclidean distance, among the classes whose answer is one of its options, and of
  those the ones whose support items ask the query's question (exact text) when there are such. In the
  paper's protocol every question is one class, so this equals text_lookup; in the grounded one the
  classes of a question differ only by answer and the encoder has to tell them apart: what the encoder
  alone knows. A comparison item's feature is
  the concatenation [pooled(first ECG) ; pooled(second ECG)]: its answer depends on both ECGs, not on
  their change alone ("still present" needs what the two share, which their difference loses), and the
  squared distance of concatenations is the sum of the two ECGs' distances, so neither dominates.
Majorities count answers by identity (`canonical_answer`); a tie goes to the answer whose text
(`answer_text`) sorts first, so every control is deterministic.
Options a control cannot score: an option no support item gives (eval.options=template, question, ...)
counts 0 for text_lookup / support_majority, so it is picked only when no option is given by any support
item (all tie at 0: the first by text); it has no prototype, so encoder_prototype never picks it, and a
query none of whose options is a support class's answer is refused (ValueError naming it).

Model baselines:
- `blind_llm`: the frozen LLM on the question alone: no ECG, no prefix (nor the two-ECG markers), nothing
  trained (step 0 only).
- `ecg_free`: the meta-learned mapper fed an all-zero ECG vector (and zero tokens; both ECGs of a
  comparison item, markers kept), adapted on the support set like the model: what the prefix learns from
  the questions / answers alone.
- `shuffled_ecg`: the meta-learned mapper adapted on the real support set, answering each query with
  another query item's ECG (the episode's query features permuted by `query_permutation`, answers kept):
  what the model gets from an ECG that is not the query's own (its real ECGs' statistics, a prompt-shaped
  prefix) rather than from the query's ECG.
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
from collections import Counter, defaultdict

import numpy as np
import torch

from ecgray.config import Config
from ecgray.eval.meta_test import (
    Adapting,
    Answer,
    Features,
    Params,
    StepScore,
    canonical_answer,
    copy_params,
    decode,
    device_of,
    ecg_features,
    episode_options,
    eval_mode,
    load_template_answers,
    meta_learned,
    meta_test,
    needs_template_answers,
    needs_tokens,
    options_mode,
    options_used,
    prompt_key,
    run_adapting,
    run_episodes,
    score_predictions,
)
from ecgray.models.ecg_lm import ECGLanguageModel, PromptBatch, answer_text

CONTROLS = ("text_lookup", "support_majority", "encoder_prototype")
"""The shortcut controls: plain functions of the episode (and the frozen encoder), no LLM."""
BASELINES = (
    *CONTROLS, "blind_llm", "ecg_free", "shuffled_ecg", "supervised", "finetune_scratch", "in_context",
)  # fmt: skip
CONTEXT_SEPARATOR = "\n"


def _view(model: ECGLanguageModel, **changes) -> ECGLanguageModel:
    """The same modules (nothing copied or reloaded) under a changed ModelConfig."""
    view = ECGLanguageModel(
        model.encoder, model.mapper, model.llm, model.tokenizer, dataclasses.replace(model.cfg, **changes)
    )
    view.training = model.training  # a new Module says training=True; the shared mapper's mode is the truth
    return view


def _options(model: ECGLanguageModel, cfg: Config, template_answers):
    """The template table the comparison's option mode needs (loaded when not given), else as given."""
    if template_answers is None and options_used(model, cfg) and needs_template_answers(options_mode(cfg)):
        return load_template_answers(cfg)
    return template_answers


def _refuse_paper_compat(model: ECGLanguageModel, name: str) -> None:
    if model.cfg.paper_compat:
        raise ValueError(f"baseline {name}: not defined under model.paper_compat=True (set it False)")


def fresh_mapper_params(model: ECGLanguageModel, seed: int) -> Params:
    """A freshly initialised mapper's parameters (seeded), on the model's device. Its fixed tensors (a
    grounded mapper's feature statistics) are the model's, which the functional call reads anyway."""
    from ecgray.models.fusion import build_mapper, mapper_buffers

    if model.encoder is None:
        raise ValueError("fresh_mapper_params: the model has no encoder to take D_enc from")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mapper = build_mapper(model.cfg, model.encoder.d_enc, model.d_llm, mapper_buffers(model.mapper))
    device = device_of(model)
    return {k: v.detach().to(device) for k, v in mapper.named_parameters()}


# ---------------------------------------------------------------------------------- shortcut controls


def _answer_counts(items: list[dict]) -> Counter:
    return Counter(tuple(canonical_answer(i["answer"])) for i in items)


def _most_frequent(candidates, *counts: Counter) -> Answer:
    """The candidate (an answer identity) with the highest count in counts[0], ties by counts[1], ...,
    then the one whose text sorts first."""
    candidates = [tuple(canonical_answer(list(a))) for a in candidates]
    if not candidates:
        raise ValueError("no candidate answers to choose from")
    return list(min(candidates, key=lambda a: (*(-c[a] for c in counts), answer_text(list(a)), len(a))))


def majority_answer(items: list[dict], options: list[Answer] | None = None) -> Answer:
    """The most frequent answer (by identity) of the items among `options` (None: among the items' own
    answers); a tie (options no item gives count 0) goes to the answer whose text sorts first."""
    if not items:
        raise ValueError("majority_answer: no items")
    counts = _answer_counts(items)
    return _most_frequent(counts if options is None else options, counts)


def text_lookup_answers(episode: dict, options: list[list[Answer]] | None = None) -> list[Answer]:
    """Per query item, the option (options[i]; None or []: the support set's answers) most frequent among
    the support items with exactly its question text; ties by the count in the whole support set, then by
    text."""
    by_question: dict[str, list[dict]] = defaultdict(list)
    for item in episode["support"]:
        by_question[item["question"]].append(item)
    overall = _answer_counts(episode["support"])
    out = []
    for i, q in enumerate(episode["query"]):
        candidates = options[i] if options else overall
        out.append(_most_frequent(candidates, _answer_counts(by_question[q["question"]]), overall))
    return out


def prototype_answers(
    support_pooled: torch.Tensor,
    support_items: list[dict],
    query_pooled: torch.Tensor,
    query_items: list[dict],
    options: list[list[Answer]] | None = None,
) -> list[Answer]:
    """Nearest class mean: support_pooled (S, D_enc) -> one prototype per support class (`class` field,
    sorted), the mean of its items' vectors; each query (query_pooled (Q, D_enc)) takes the majority answer
    of the class whose prototype is nearest in Euclidean distance, among the classes whose answer is one of
    options[i] (None or []: every class), and of those the ones with a support item of the query's question
    text when there are any (ties: the first class in sort order). A query none of whose options is a
    class's answer has no prototype to take: ValueError. Two ECGs per item, (S, 2, D_enc) / (Q, 2, D_enc):
    the concatenation of the two (module docstring)."""
    if support_pooled.shape[0] != len(support_items) or query_pooled.shape[0] != len(query_items):
        raise ValueError(
            f"prototype_answers: {support_pooled.shape[0]} support vectors for {len(support_items)} items, "
            f"{query_pooled.shape[0]} query vectors for {len(query_items)} items"
        )
    if options and len(options) != len(query_items):
        raise ValueError(f"prototype_answers: {len(options)} option lists for {len(query_items)} query items")
    members: dict[str, list[int]] = defaultdict(list)
    for j, item in enumerate(support_items):
        members[item["class"]].append(j)
    classes = sorted(members)
    # (S, 2, D_enc) -> (S, 2 D_enc): [first ; second]; a single-ECG (S, D_enc) stays as it is
    support = support_pooled.detach().to("cpu", torch.float64).flatten(1)
    prototypes = torch.stack([support[members[c]].mean(0) for c in classes])  # (C, D)
    query = query_pooled.detach().to("cpu", torch.float64).flatten(1)
    distance = ((query[:, None, :] - prototypes[None, :, :]) ** 2).sum(-1)  # (Q, C) squared Euclidean
    answers = [majority_answer([support_items[j] for j in members[c]]) for c in classes]
    questions = [{support_items[j]["question"] for j in members[c]} for c in classes]
    out = []
    for i, item in enumerate(query_items):
        allowed = [k for k in range(len(classes)) if not options or answers[k] in options[i]]
        if not allowed:
            raise ValueError(
                f"encoder_prototype: query sample {item.get('sample_id')}: none of its options "
                f"{options[i]} is the answer of a support class, so no prototype can choose among them"
            )
        candidates = [k for k in allowed if item["question"] in questions[k]] or allowed
        nearest = min(candidates, key=lambda k: (float(distance[i, k]), k))
        out.append(list(answers[nearest]))
    return out


def _no_features(episode: dict) -> tuple[Features, Features]:
    """Nothing is encoded: zero-width vectors, one per support / query item."""
    n_s, n_q = len(episode["support"]), len(episode["query"])
    return (torch.zeros(n_s, 0), None), (torch.zeros(n_q, 0), None)


def _run_control(
    model, episodes, features, cfg: Config, answers, method: str, progress: bool, template_answers
) -> dict:
    """A control through the shared loop: `answers(episode, support_features, query_features, options)`
    gives the query set's answer lists among the comparison's options ([] under free-text decoding),
    scored like the model's (step 0 only)."""

    def answerer(m, params, support_features, query_features, episode, options):
        golds = [i["answer"] for i in episode["query"]]
        return score_predictions(m, answers(episode, support_features, query_features, options), golds)

    return run_episodes(
        model, None, episodes, features, cfg, template_answers=_options(model, cfg, template_answers),
        answerer=answerer, method=method, progress=progress,
    )  # fmt: skip


def text_lookup(
    model, episodes, ecg_store, cfg: Config, *, template_answers=None, progress=False, feature_cache=None
) -> dict:
    """The support answers of the query's question text among its options (module docstring); model: its
    tokenizer (token accuracy) and decoding (whether there are option sets). ecg_store, feature_cache:
    accepted for a uniform call, unused."""
    return _run_control(
        model, episodes, _no_features, cfg, lambda e, s, q, options: text_lookup_answers(e, options),
        "text_lookup", progress, template_answers,
    )  # fmt: skip


def support_majority(
    model, episodes, ecg_store, cfg: Config, *, template_answers=None, progress=False, feature_cache=None
) -> dict:
    """The support set's majority answer among each query's options (module docstring); model: its
    tokenizer and decoding. ecg_store, feature_cache: accepted for a uniform call, unused."""

    def answers(episode, support_features, query_features, options):
        return [
            majority_answer(episode["support"], o or None) for o in options or [[]] * len(episode["query"])
        ]

    return _run_control(
        model, episodes, _no_features, cfg, answers, "support_majority", progress, template_answers
    )


def encoder_prototype(
    model, episodes, ecg_store, cfg: Config, *, template_answers=None, progress=False, feature_cache=None
) -> dict:
    """Nearest class mean of the frozen encoder's pooled features among each query's options (module
    docstring, `prototype_answers`); feature_cache: shared with the other methods so each ECG is encoded
    once."""

    def answers(episode, support_features, query_features, options):
        return prototype_answers(
            support_features[0], episode["support"], query_features[0], episode["query"], options
        )

    features = ecg_features(model, ecg_store, None, feature_cache)
    return _run_control(
        model, episodes, features, cfg, answers, "encoder_prototype", progress, template_answers
    )


# ------------------------------------------------------------------------------------------ blind_llm


def blind_llm(
    model, episodes, ecg_store, cfg: Config, *, template_answers=None, progress=False, feature_cache=None
) -> dict:
    """The LLM answers from the question alone (no prefix at all; feature_cache unused: nothing encoded).
    Its answer depends on the prompt (question and option set) and nothing else, so every distinct prompt
    of all the episodes is decoded once, `BLIND_ROWS_PER_PASS` prompts per frozen-LLM pass, before the
    episodes are scored (one pass per episode would read the LLM's weights once per episode for a few
    rows)."""
    _refuse_paper_compat(model, "blind_llm")
    view = _view(model, n_prefix=0)
    template_answers = _options(model, cfg, template_answers)
    prompts: dict[tuple, tuple[str, list[Answer]]] = {}  # distinct (question, options) -> its prompt
    for episode in episodes:
        options = _query_options(view, cfg, episode, template_answers)
        for item, opts in zip(episode["query"], options, strict=True):
            prompts.setdefault(prompt_key(item, opts), (item["question"], opts))
    keys = list(prompts)
    answers: dict[tuple, str | Answer] = {}
    with eval_mode(view), torch.no_grad():
        for start in range(0, len(keys), BLIND_ROWS_PER_PASS):
            chunk = keys[start : start + BLIND_ROWS_PER_PASS]
            prefix = torch.zeros(len(chunk), 0, view.d_llm, device=device_of(view))  # (B, 0, D_llm)
            options = [prompts[k][1] for k in chunk] if view.cfg.decoding == "constrained" else []
            picked = decode(view, prefix, [prompts[k][0] for k in chunk], options)
            answers.update(zip(chunk, picked, strict=True))

    def features(episode):  # nothing is encoded: only the query count matters
        n_s, n_q = len(episode["support"]), len(episode["query"])
        return (torch.zeros(n_s, 0), None), (torch.zeros(n_q, 0), None)

    def answerer(m, params, support_features, query_features, episode, options):
        q = episode["query"]
        picked = [answers[prompt_key(i, o)] for i, o in zip(q, options or [[]] * len(q), strict=True)]
        return score_predictions(m, picked, [i["answer"] for i in q])

    return run_episodes(
        view, None, episodes, features, cfg, template_answers=template_answers, answerer=answerer,
        method="blind_llm", progress=progress,
    )  # fmt: skip


BLIND_ROWS_PER_PASS = 64
"""blind_llm's distinct prompts per frozen-LLM pass (bounds the batch of a long evaluation)."""


def _query_options(model, cfg: Config, episode: dict, template_answers) -> list[list[Answer]]:
    """The episode's options per query item as every method gets them ([] per item when free text)."""
    return episode_options(model, cfg, episode, template_answers) or [[]] * len(episode["query"])


# ------------------------------------------------------------------------------------------- ecg_free


def ecg_free_method(model: ECGLanguageModel, meta_params: Params, ecg_store) -> Adapting:
    """ecg_free as an `Adapting` method: the meta-learned mapper on an all-zero ECG vector (and zero
    tokens; both ECGs of a comparison item), adapted like the model. It reads no ECG, so it runs one row
    per distinct prompt (`Adapting.reads_ecg`)."""
    from ecgray.data.episodes import item_ecg_ids

    device = device_of(model)
    d_enc = model.encoder.d_enc
    n_tokens = model.encoder.n_tokens(ecg_store.n_samples)

    def zeros(n: int, n_ecg: int) -> Features:
        per = () if n_ecg == 1 else (n_ecg,)  # comparison items: both ECGs zero
        tokens = torch.zeros(n, *per, n_tokens, d_enc, device=device) if needs_tokens(model) else None
        return torch.zeros(n, *per, d_enc, device=device), tokens

    def features(episode):
        n_ecg = len(item_ecg_ids(episode["support"][0]))
        return zeros(len(episode["support"]), n_ecg), zeros(len(episode["query"]), n_ecg)

    return Adapting("ecg_free", lambda index: copy_params(meta_params), features, reads_ecg=False)


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
    return run_adapting(
        model, [ecg_free_method(model, meta_params, ecg_store)], episodes, cfg,
        template_answers=_options(model, cfg, template_answers), progress=progress,
    )["ecg_free"]  # fmt: skip


# --------------------------------------------------------------------------------------- shuffled_ecg


def ecg_derangement(keys: list, rng: np.random.Generator) -> list[int]:
    """A random permutation p of the items (keys[i]: item i's ECG identity) under which item i takes item
    p[i]'s ECG, so that keys[p[i]] != keys[i] for every i whenever no ECG is held by more than half of the
    items (a derangement of the ECGs). Built as: the items grouped by ECG (groups and items inside them in
    random order), laid out group after group, and each takes the item m places further round the circle,
    m the largest group's size; a group spans at most m <= n/2 places, so nobody lands in its own group.
    With one ECG held by more than half, some of its items keep an item of the same ECG; with a single
    distinct ECG, p is the identity (every permutation gives the same features)."""
    groups: dict = {}
    for i in rng.permutation(len(keys)):
        groups.setdefault(keys[int(i)], []).append(int(i))
    blocks = list(groups.values())
    order = [i for b in rng.permutation(len(blocks)) for i in blocks[int(b)]]
    n, shift = len(order), max((len(b) for b in blocks), default=0)
    p = [0] * n
    for position, i in enumerate(order):
        p[i] = order[(position + shift) % n]
    return p


def query_permutation(episode: dict, seed: int) -> list[int]:
    """shuffled_ecg's permutation of an episode's query items (`ecg_derangement` on their ECG ids; both ECGs
    of a comparison item move together), seeded by (seed, the query sample ids): deterministic per episode."""
    from ecgray.data.episodes import item_ecg_ids

    query = episode["query"]
    rng = np.random.default_rng([int(seed), *(int(i["sample_id"]) for i in query)])
    return ecg_derangement([tuple(item_ecg_ids(i)) for i in query], rng)


def shuffled_ecg_method(
    model: ECGLanguageModel,
    meta_params: Params,
    ecg_store,
    cfg: Config,
    feature_cache=None,
    adapts_like: str | None = "meta_test",
) -> Adapting:
    """shuffled_ecg as an `Adapting` method: the meta-learned mapper adapted on the real support set, each
    query answered with the features of another query item's ECG (`query_permutation`, seed eval.seed).
    Its inner loop is the meta-learned model's (`adapts_like`): run beside it, it answers with that
    model's fast weights."""
    encode = ecg_features(model, ecg_store, None, feature_cache)

    def features(episode):
        support, (pooled, tokens) = encode(episode)
        p = query_permutation(episode, cfg.eval.seed)
        return support, (pooled[p], None if tokens is None else tokens[p])

    return Adapting("shuffled_ecg", lambda index: copy_params(meta_params), features, adapts_like=adapts_like)


def shuffled_ecg(
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
    """The meta-learned mapper adapted on the support set, answering with the query ECGs permuted."""
    return run_adapting(
        model, [shuffled_ecg_method(model, meta_params, ecg_store, cfg, feature_cache)], episodes, cfg,
        template_answers=_options(model, cfg, template_answers), progress=progress,
    )["shuffled_ecg"]  # fmt: skip


# ----------------------------------------------------------------------------------- finetune_scratch


def finetune_scratch_method(model: ECGLanguageModel, ecg_store, cfg: Config, feature_cache=None) -> Adapting:
    """finetune_scratch as an `Adapting` method: a fresh mapper (seed eval.seed, the same init for every
    episode) adapted on each support set with the meta-test's inner loop."""
    init = fresh_mapper_params(model, cfg.eval.seed)
    features = ecg_features(model, ecg_store, None, feature_cache)
    return Adapting("finetune_scratch", lambda index: copy_params(init), features)


def finetune_scratch(
    model, episodes, ecg_store, cfg: Config, *, template_answers=None, progress=False, feature_cache=None
):
    """A fresh mapper (seed eval.seed, the same init for every episode) fine-tuned on each support set."""
    return run_adapting(
        model, [finetune_scratch_method(model, ecg_store, cfg, feature_cache)], episodes, cfg,
        template_answers=_options(model, cfg, template_answers), progress=progress,
    )["finetune_scratch"]  # fmt: skip


# ----------------------------------------------------------------------------------------- supervised


def meta_train_items(samples: list[dict], cfg: Config) -> list[dict]:
    """Every sample of the meta-train classes (episodes.* split rules), once, with its class answer: the
    alignment's QA items (`ecgray.train.align.qa_items`)."""
    from ecgray.train.align import qa_items

    return qa_items(samples, cfg)


def train_supervised(
    model: ECGLanguageModel,
    items: list[dict],
    ecg_store,
    cfg: Config,
    steps: int | None = None,
    progress: bool = False,
) -> tuple[Params, list[float]]:
    """Plain minibatch cross-entropy of a fresh mapper (seed eval.seed) on `items` (`meta_train_items`): the
    alignment's training in one process (`ecgray.train.align.train_mapper`), `steps` (default
    eval.supervised_steps) AdamW steps of eval.supervised_batch_size samples at eval.supervised_lr, weight
    decay / clipping from meta.*, mapper dropout on, seeded by eval.seed. -> (trained params, loss per step)."""
    from ecgray.train.align import train_mapper
    from ecgray.train.loop import FeatureCache

    e = cfg.eval
    return train_mapper(
        model, fresh_mapper_params(model, e.seed), items, FeatureCache(model, ecg_store),
        steps=e.supervised_steps if steps is None else steps, batch_size=e.supervised_batch_size,
        lr=e.supervised_lr, weight_decay=cfg.meta.weight_decay, grad_clip=cfg.meta.grad_clip, seed=e.seed,
        progress_bar=progress, desc="supervised",
    )  # fmt: skip


def supervised_method(
    model: ECGLanguageModel, supervised_params: Params, ecg_store, feature_cache=None
) -> Adapting:
    """The supervised mapper (`train_supervised`) as an `Adapting` method, evaluated like the meta-learned one."""
    return meta_learned(model, supervised_params, ecg_store, None, feature_cache, name="supervised")


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
    rows = view.prompt_rows(
        [i["question"] for i in items], [i["answer"] for i in items], eos=False, n_ecg=view.n_ecg_of(prefix)
    )
    device = prefix.device
    parts = [view.embed(torch.tensor([view.bos], dtype=torch.long, device=device))[0]] if view.bos else []
    for j in range(len(items)):
        parts.append(prefix[j].to(view.embed.weight.dtype))  # (prefix width, D_llm)
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
    n_ecg = view.n_ecg_of(prefix)
    if view.cfg.decoding == "constrained":
        flat = [(i, o) for i, opts in enumerate(options) for o in opts]
        scores = []
        for start in range(0, len(flat), 256):
            part = flat[start : start + 256]
            batch = view.collate(
                view.prompt_rows([questions[i] for i, _ in part], [o for _, o in part], n_ecg=n_ecg), False
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
            rows = view.prompt_rows(questions, [g + [view.eos_id] for g in generated], eos=False, n_ecg=n_ecg)
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
        template_answers=_options(model, cfg, template_answers), answerer=answerer,
        method="in_context", progress=progress,
    )  # fmt: skip


__all__ = [
    "BASELINES",
    "CONTROLS",
    "blind_llm",
    "ecg_free",
    "ecg_free_method",
    "ecg_derangement",
    "encoder_prototype",
    "finetune_scratch",
    "finetune_scratch_method",
    "fresh_mapper_params",
    "in_context",
    "majority_answer",
    "meta_train_items",
    "prototype_answers",
    "query_permutation",
    "shuffled_ecg",
    "shuffled_ecg_method",
    "supervised",
    "supervised_method",
    "support_majority",
    "text_lookup",
    "text_lookup_answers",
    "train_supervised",
]

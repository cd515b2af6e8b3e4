"""Meta-test (method.md section 3): adapt a copy of the meta-learned mapper on each episode's support set
and answer its query set after every inner step.

For every episode:
  1. the frozen encoder embeds the episode's ECGs once (optionally with only a subset of the leads: the
     others are zero-filled and masked before the encoder, see `mask_leads`);
  2. step 0 answers the query set with the meta-learned weights themselves; then `ecgray.meta.adapt` runs
     `meta.inner_steps` plain SGD steps at `meta.inner_lr` on the support loss, starting from a detached
     copy (first order: no meta-gradient is needed at test time), and the query set is answered after the
     reported steps (`reported_steps`: 0, every `eval.curve_stride`-th and the last; stride 1: every step);
  3. answers are option-constrained (`model.decoding=constrained`: the options of `eval.options`, see
     `query_options` and `options_mode`, scored by log p(option + EOS | prompt); the chosen option is an
     answer list, scored by identity) or greedy (free text); under `model.paper_compat` the official
     prediction is used (argmax at every gold position, BOS included).
One comparison, one candidate set: `episode_options` gives every method (the model, the LLM baselines and
the shortcut controls alike) the same option list per query item, each record keeps how many options each
item had (`n_options`), and the summaries report the chance level they imply (metrics.chance_level).
The model is in eval mode throughout (mapper dropout off); its weights are never modified, and it is built
once for all episodes. Results are deterministic for given episodes and weights.

Every method that adapts (`Adapting`: the meta-learned mapper, and among the baselines ecg_free,
shuffled_ecg, finetune_scratch, supervised) runs through `run_adapting`, which puts all of them and
`eval.episodes_per_pass` episodes in lockstep: one task per (episode, method), one frozen-LLM pass per inner
step for all their support sets and one decoding pass per reported step for all their query sets. Why one
batch rather than one method after the other: the work per task is the same, but the CPU's matrix kernels
run far better on one tall batch than on several short ones, and a question shared by the methods' rows
is run once for all of them (the question KV cache). A method fed no ECG (ecg_free) cannot tell its rows
apart beyond their prompts, so it runs one row per distinct prompt (a grounded single-verify support set
of 20 items holds 4). A method whose inner loop is another's (`Adapting.adapts_like`: shuffled_ecg starts
from the meta-learned weights and adapts on the same real support set) answers with that method's fast
weights instead of adapting a copy of its own. Rows never interact in the LLM and each task keeps its own
fast weights, so every record is what one method on one episode at a time gives (pinned by
tests/test_eval.py). Each record also
keeps the inner loop's support loss per step beside the support set's ECG-blind floor
(metrics.blind_loss_floor): the loss an adapting method takes its gradients of, and the least a model that
ignores the ECG could reach on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ecgray.config import LEAD_NAMES, Config
from ecgray.eval import metrics
from ecgray.meta import adapt
from ecgray.models.ecg_lm import PADDING_ANSWER, PADDING_QUESTION, ECGLanguageModel, TaskData, answer_text
from ecgray.models.fusion import centre_on_support

log = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]
Features = tuple[torch.Tensor, torch.Tensor | None]
"""pooled (B, D_enc), tokens (B, N, D_enc) | None; two ECGs per item: (B, 2, D_enc), (B, 2, N, D_enc) | None."""

EMBEDDED_TEMPLATE_ANSWERS = (
    Path(__file__).resolve().parents[1] / "synth" / "assets" / "ecgqa_ptbxl_answers_for_each_template.csv"
)
"""ECG-QA v1.0.2's PTB-XL answers_for_each_template.csv, shipped with the package (the synthetic world's)."""


# ----------------------------------------------------------------------------------------- the model


def needs_tokens(model: ECGLanguageModel) -> bool:
    """Whether the mapper reads the encoder's tokens (QFormer) or only the pooled vector."""
    return model.cfg.mapper == "qformer"


def device_of(model: ECGLanguageModel) -> torch.device:
    return model.embed.weight.device


@contextlib.contextmanager
def eval_mode(model: ECGLanguageModel):
    """Mapper dropout off for the block; the previous mode is restored afterwards."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def copy_params(params: Params) -> Params:
    """Detached copies (what `adapt` starts from); the originals are never written."""
    return {k: v.detach().clone() for k, v in params.items()}


# ------------------------------------------------------------------------------------------- leads


def lead_subset_mask(leads: list[str]) -> np.ndarray:
    """Lead names -> bool (12,) in canonical order; an unknown or repeated name is an error."""
    unknown = [name for name in leads if name not in LEAD_NAMES]
    if unknown or not leads or len(set(leads)) != len(leads):
        raise ValueError(
            f"lead subset {leads}: expected distinct names among {LEAD_NAMES}"
            + (f" (unknown: {unknown})" if unknown else "")
        )
    return np.isin(np.asarray(LEAD_NAMES), leads)


def mask_leads(
    signals: np.ndarray, lead_mask: np.ndarray, leads: list[str] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Keep only `leads` (None: all): the other leads are zero-filled and marked absent. A lead missing
    from the recording stays absent. signals (B, 12, T), lead_mask (B, 12) -> copies of both."""
    if leads is None:
        return signals.copy(), lead_mask.copy()
    keep = lead_subset_mask(leads)  # (12,)
    mask = lead_mask & keep[None, :]  # (B, 12)
    return signals * mask[:, :, None].astype(signals.dtype), mask


def encode_ecgs(
    model: ECGLanguageModel,
    store,
    ecg_ids: list[int],
    leads: list[str] | None,
    cache: dict | None = None,
) -> Features:
    """The frozen encoder on the stored ECGs (lead subset applied) -> (pooled, tokens | None); with all
    leads and features attached to the store (`store.features`, ecgray.features), those are read
    instead of running the encoder.
    cache: a dict reused across calls (and methods) holding pooled vectors by (leads, ecg_id), so each ECG
    is encoded once per lead subset; not used when the mapper reads the tokens (too large to keep)."""
    if cache is not None and not needs_tokens(model):
        key = tuple(leads) if leads is not None else None
        todo = sorted({int(i) for i in ecg_ids if (key, int(i)) not in cache})
        if todo:
            pooled, _ = encode_ecgs(model, store, todo, leads)
            cache.update({(key, i): row for i, row in zip(todo, pooled, strict=True)})
        return torch.stack([cache[(key, int(i))] for i in ecg_ids]), None
    features = getattr(store, "features", None)  # precomputed frozen features (`ecgray features`)
    if leads is None and features is not None:
        tokens, pooled = features.features([int(i) for i in ecg_ids])
        device = device_of(model)
        return pooled.to(device), (tokens.to(device) if needs_tokens(model) else None)
    signals, mask = mask_leads(store.signals(ecg_ids), store.lead_mask(ecg_ids), leads)
    if not mask.any(axis=1).all():
        bad = [int(i) for i, m in zip(ecg_ids, mask, strict=True) if not m.any()][:5]
        raise ValueError(f"ECGs {bad}: none of the leads {leads} is present in the recording")
    device = device_of(model)
    tokens, pooled = model.encode(torch.from_numpy(signals).to(device), torch.from_numpy(mask).to(device))
    return pooled, (tokens if needs_tokens(model) else None)


def encode_items(
    model: ECGLanguageModel, store, items: list[dict], leads: list[str] | None, cache: dict | None = None
) -> Features:
    """`encode_ecgs` on every ECG of the episode items, in item order: (B, D_enc) for single-ECG items,
    (B, 2, D_enc) for comparison items (first, second ECG; tokens likewise). One kind per call."""
    from ecgray.data.episodes import item_ecg_ids

    ids = [item_ecg_ids(i) for i in items]
    counts = sorted({len(x) for x in ids})
    if len(counts) > 1:
        raise ValueError(f"encode_items: items of {counts} ECGs together; one question type per set")
    pooled, tokens = encode_ecgs(model, store, [i for x in ids for i in x], leads, cache)
    if counts == [2]:
        pooled = pooled.unflatten(0, (-1, 2))  # (B, 2, D_enc)
        tokens = None if tokens is None else tokens.unflatten(0, (-1, 2))  # (B, 2, N, D_enc)
    return pooled, tokens


# ----------------------------------------------------------------------------------------- options


def load_template_answers(cfg: Config) -> dict[int, list[str]]:
    """template_id -> admissible answers: `data.ecgqa_dir`'s answers_for_each_template.csv for
    `data.source`, or, with no ecgqa_dir, the PTB-XL table shipped with the package."""
    from ecgray.data.ecgqa import read_template_answers

    if cfg.data.ecgqa_dir is not None:
        return read_template_answers(cfg.data.ecgqa_dir, cfg.data.source)
    if cfg.data.source != "ptbxl":
        raise ValueError(
            f"data.source={cfg.data.source!r} needs data.ecgqa_dir (its answers_for_each_template.csv); "
            "only the PTB-XL table ships with ecgray"
        )
    log.info("admissible answers: the embedded PTB-XL table %s", EMBEDDED_TEMPLATE_ANSWERS)
    import ast
    import csv

    with open(EMBEDDED_TEMPLATE_ANSWERS, newline="") as f:
        return {int(r["template_id"]): ast.literal_eval(r["classes"]) for r in csv.DictReader(f)}


Answer = list[str]
"""An answer by identity: its answers, stripped, lowercased and sorted (never split on commas)."""
CHOOSE_EXTRA_OPTIONS = ("both", "none")
"""What single-choose class rules make besides the named candidates: two answers -> `both`, `none` stays."""


def canonical_answer(answer: str | list[str]) -> Answer:
    """An answer as its identity: a list's answers stripped, lowercased, deduplicated and sorted; a string
    is one answer (an admissible answer of a template, commas and all)."""
    parts = [answer] if isinstance(answer, str) else list(answer)
    return sorted({a.strip().lower() for a in parts if a.strip()})


OPTION_MODES = ("question_support", "question", "template+support", "template", "support")
"""The option sets `query_options` builds (eval.options; `auto` resolves to one of them, `options_mode`)."""


def options_mode(cfg: Config) -> str:
    """eval.options with `auto` resolved: `question_support` under episodes.protocol=grounded (every method
    chooses among the answers the support set shows for the query's question), `question` under paper."""
    mode = cfg.eval.options
    if mode == "auto":
        return "question_support" if cfg.episodes.protocol == "grounded" else "question"
    if mode not in OPTION_MODES:
        raise ValueError(f"eval.options={mode!r}: expected auto or one of {OPTION_MODES}")
    return mode


def needs_template_answers(mode: str) -> bool:
    """Whether the option mode reads the templates' admissible answers (answers_for_each_template.csv)."""
    return mode not in ("support", "question_support")


def query_options(
    episode: dict, template_answers: dict[int, list[str]] | None, mode: str = "question"
) -> list[list[Answer]]:
    """The answers constrained decoding chooses from, per query item: answer lists (`canonical_answer`),
    so the chosen option keeps its identity (an answer may contain commas), sorted by their text:
    - `question_support`: the distinct answers of the support items asking the query's own question (the
      same question text, exactly); a query whose question no support item asks is an error (the grounded
      protocol always shows it; use another mode for episodes that do not). Under the grounded protocol
      these are the answer classes the episode draws for the question, so chance is 1 / answers_per_question;
    - `template`: the admissible single answers of the item's template;
    - `template+support`: those plus every answer of the episode's support items of the same template
      (so `both` and multi-answer query sets the support set teaches are reachable);
    - `support`: the support answers of the same template only;
    - `question`: for single-choose items, the candidates the question itself names (its `attribute` list)
      plus `both` and `none`; for the other question types the same as `template+support`.
    Why `both` / `none` always: the class rules (ecgray.data.episodes.class_answer) turn every two-answer
    choose sample into `both` and keep `none`, whatever the template's admissible list says (no template
    lists `both`), so the option set holds every answer those rules can give a choose question. The
    query's own answer is never added: if it is not among the options it cannot be matched."""
    if mode == "auto":
        raise ValueError("eval.options=auto: resolve it with options_mode(cfg) (it depends on the protocol)")
    if mode not in OPTION_MODES:
        raise ValueError(f"eval.options={mode!r}: expected one of {OPTION_MODES}")
    support: dict[int, set[tuple[str, ...]]] = {}  # template -> answers; question_support: question text
    for item in episode["support"]:
        key = item["question"] if mode == "question_support" else int(item["template_id"])
        support.setdefault(key, set()).add(tuple(canonical_answer(item["answer"])))
    out = []
    for item in episode["query"]:
        tid = int(item["template_id"])
        choose = mode == "question" and item["question_type"] == "single-choose"
        options: set[tuple[str, ...]] = set()
        if mode == "question_support":
            if item["question"] not in support:
                raise ValueError(
                    f"query sample {item['sample_id']}: no support item asks its question "
                    f"{item['question']!r}, so eval.options=question_support has no options for it "
                    "(use question or template+support)"
                )
            options.update(support[item["question"]])
        elif choose:
            if not item.get("attribute"):
                raise ValueError(
                    f"query sample {item['sample_id']}: a single-choose item without its attribute list "
                    "(the candidates the question names); use eval.options=template+support"
                )
            options.update(tuple(canonical_answer(a)) for a in [*item["attribute"], *CHOOSE_EXTRA_OPTIONS])
        else:
            if mode != "support":
                if template_answers is None or tid not in template_answers:
                    raise ValueError(
                        f"query sample {item['sample_id']}: template {tid} has no admissible answers "
                        "(answers_for_each_template.csv)"
                    )
                options.update(tuple(canonical_answer(a)) for a in template_answers[tid])
            if mode != "template":
                options.update(support.get(tid, ()))
        options.discard(())
        if not options:
            raise ValueError(f"query sample {item['sample_id']}: no answer options (eval.options={mode})")
        # by text; an identical text (one answer "a, b" vs the pair a, b) by the number of answers
        out.append([list(o) for o in sorted(options, key=lambda o: (answer_text(list(o)), len(o)))])
    return out


# ---------------------------------------------------------------------------------------- answering


@dataclasses.dataclass
class StepScore:
    """One answering of a query set."""

    correct: list[bool]
    token_acc_bos: float
    token_acc: float
    predictions: list[str | Answer]
    """Answer lists (constrained decoding, the controls: compared by identity) or free text (greedy)."""


def _answer_ids(model: ECGLanguageModel, answer) -> list[int]:
    """The answer's ids as the model is scored on them (after "Answer:", with the tokenizer's leading space)."""
    return model.answer_ids(answer)


def score_predictions(
    model: ECGLanguageModel, predictions: list[str | Answer], golds: list[list[str]]
) -> StepScore:
    """Exact match (metrics.exact_match: answer lists by identity, strings as free text) and token accuracy
    (with / without BOS) of predicted answers against the gold answer lists."""
    pred_ids = [_answer_ids(model, p) for p in predictions]
    gold_ids = [_answer_ids(model, g) for g in golds]
    # no BOS in this tokenizer: the BOS-included number equals the answer-token one
    bos = model.bos[0] if model.bos else None
    return StepScore(
        correct=[metrics.exact_match(p, g) for p, g in zip(predictions, golds, strict=True)],
        token_acc_bos=metrics.token_accuracy(pred_ids, gold_ids, bos=bos),
        token_acc=metrics.token_accuracy(pred_ids, gold_ids),
        predictions=list(predictions),
    )


def paper_compat_score(model: ECGLanguageModel, prefix: torch.Tensor, questions, golds) -> StepScore:
    """The official prediction: argmax at every gold position (gold length, BOS included in the target)."""
    batch = model.collate(model.prompt_rows(questions, golds, n_ecg=model.n_ecg_of(prefix)))
    pred = model.target_predictions(prefix, batch)  # (B, A), -1 on padding
    preds, targets = [], []
    for i in range(len(questions)):
        keep = batch.target_mask[i]
        preds.append(pred[i][keep].tolist())
        targets.append(batch.target_ids[i][keep].tolist())
    has_bos = bool(model.bos) and all(t and t[0] == model.bos[0] for t in targets)
    # without BOS: drop the BOS target position (and what was predicted there)
    skip = 1 if has_bos else 0
    texts = [model.tokenizer.decode(p[skip:], skip_special_tokens=True).strip() for p in preds]
    return StepScore(
        correct=[metrics.exact_match(t, g) for t, g in zip(texts, golds, strict=True)],
        token_acc_bos=metrics.token_accuracy(preds, targets),
        token_acc=metrics.token_accuracy([p[skip:] for p in preds], [t[skip:] for t in targets]),
        predictions=texts,
    )


def decode(
    model: ECGLanguageModel, prefix: torch.Tensor, questions: list[str], options: list[list[Answer]]
) -> list[str | Answer]:
    """Answers for B questions given their prefixes (B, width, D_llm): the best-scoring option, an
    answer list (constrained), or the greedy decoding's text, as `model.cfg.decoding` says."""
    if model.cfg.decoding == "constrained":
        scores = model.score_options(prefix, questions, options)
        return [opts[int(s.argmax())] for opts, s in zip(options, scores, strict=True)]
    return model.greedy(prefix, questions)


def answer_query(
    model: ECGLanguageModel, prefix: torch.Tensor, questions: list[str], golds, options: list[list[Answer]]
) -> StepScore:
    """Answer B query questions given their prefixes (B, n_prefix, D_llm) as `model.cfg` says."""
    if model.cfg.paper_compat:
        return paper_compat_score(model, prefix, questions, golds)
    return score_predictions(model, decode(model, prefix, questions, options), golds)


def decode_blocks(
    model: ECGLanguageModel, blocks: list[tuple[torch.Tensor, list[str], list[list[Answer]]]]
) -> list[list[str | Answer]]:
    """`decode` for several query sets at once, each (prefixes (B_k, width, D_llm), questions, options):
    one decoding pass over all of them (one per prefix width when one- and two-ECG sets meet) -> the
    predictions of each set. Rows are independent in the LLM, so each set's answers are its own."""
    by_kind: dict[int, list[int]] = {}  # ECGs per row (the prefix width) -> its blocks
    for k, (prefix, _, _) in enumerate(blocks):
        by_kind.setdefault(model.n_ecg_of(prefix), []).append(k)
    predictions: list[list] = [[] for _ in blocks]
    # a frozen LLM partitioned across ranks (lockstep): the ECG counts any rank decodes, each decoded by all
    for n_ecg in model.agreed_kinds(by_kind):
        members = by_kind.get(n_ecg)
        if members is None:  # another rank's rows: the same LLM calls on a stand-in row, answers dropped
            stand_in = [[[PADDING_ANSWER]]] if model.cfg.decoding == "constrained" else []
            decode(model, model.padding_prefix(n_ecg), [PADDING_QUESTION], stand_in)
            continue
        prefix = torch.cat([blocks[k][0] for k in members])
        questions = [q for k in members for q in blocks[k][1]]
        options = [o for k in members for o in blocks[k][2]]  # per query; empty lists when greedy
        decoded = decode(model, prefix, questions, options)
        start = 0
        for k in members:
            n = len(blocks[k][1])
            predictions[k] = decoded[start : start + n]
            start += n
    return predictions


def prompt_key(item: dict, options: list[Answer]) -> tuple:
    """What the answer of a method that reads no ECG depends on: the question text and the option set."""
    return item["question"], tuple(tuple(o) for o in options)


def distinct_prompts(items: list[dict], options: list[list[Answer]]) -> tuple[list[int], list[int]]:
    """(first, inverse): the items whose prompts differ (`prompt_key`), and for every item the index into
    `first` of its prompt. What a method that reads no ECG answers depends on nothing else."""
    seen: dict[tuple, int] = {}
    inverse = []
    for item, opts in zip(items, options or [[]] * len(items), strict=True):
        inverse.append(seen.setdefault(prompt_key(item, opts), len(seen)))
    first = [inverse.index(u) for u in range(len(seen))]
    return first, inverse


# ------------------------------------------------------------------------------------- the episodes

FeatureFn = Callable[[dict], tuple[Features, Features]]
"""episode -> ((support pooled, tokens), (query pooled, tokens))."""
Answerer = Callable[
    [ECGLanguageModel, Params | None, Features, Features, dict, list[list[Answer]]], StepScore
]
"""(model, params, support features, query features, episode, options) -> the query set's StepScore."""


def default_answerer(model, params, support_features, query_features, episode, options) -> StepScore:
    pooled, tokens = query_features
    prefix = model.fuse(pooled, tokens, params)
    q = episode["query"]
    return answer_query(model, prefix, [i["question"] for i in q], [i["answer"] for i in q], options)


def ecg_features(
    model: ECGLanguageModel, store, leads: list[str] | None = None, cache: dict | None = None
) -> FeatureFn:
    """FeatureFn of the frozen encoder on the stored ECGs (lead subset applied; cache: see encode_ecgs)."""

    def features(episode: dict) -> tuple[Features, Features]:
        pooled, tokens = encode_items(model, store, episode["support"] + episode["query"], leads, cache)
        n = len(episode["support"])
        split = (lambda t: (t[:n], t[n:])) if tokens is not None else (lambda t: (None, None))
        (ts, tq) = split(tokens)
        return (pooled[:n], ts), (pooled[n:], tq)

    return features


def reported_steps(inner_steps: int, stride: int) -> list[int]:
    """The inner steps after which the query sets are answered: 0, every `stride`-th, and the last."""
    if stride < 1:
        raise ValueError(f"eval.curve_stride={stride}: must be >= 1")
    return sorted({0, inner_steps, *range(0, inner_steps + 1, stride)})


def episode_options(
    model: ECGLanguageModel, cfg: Config, episode: dict, template_answers: dict[int, list[str]] | None
) -> list[list[Answer]]:
    """The option list per query item that every method of one comparison chooses among: `query_options`
    under `options_mode(cfg)` when the model decodes constrained (and not under model.paper_compat); else
    [] (free text: no option sets, and every method answers without them)."""
    if model.cfg.decoding != "constrained" or model.cfg.paper_compat:
        return []
    return query_options(episode, template_answers, options_mode(cfg))


def options_used(model: ECGLanguageModel, cfg: Config) -> str | None:
    """The option mode a comparison's records were scored under (`episode_options`), None for free text."""
    return None if model.cfg.decoding != "constrained" or model.cfg.paper_compat else options_mode(cfg)


def _result(method: str, records: list[dict], cfg: Config, options: str | None) -> dict:
    return {
        "method": method,
        "options": options,
        "steps": list(records[0]["steps"]) if records else [0],
        "summary": metrics.summarize(
            records,
            cfg.eval.ci_level,
            cfg.eval.ci_method,
            cfg.eval.bootstrap_samples,
            cfg.eval.bootstrap_seed,
        ),
        "episodes": records,
    }


def _record(
    index: int,
    episode: dict,
    steps: list[int],
    scores: list[StepScore],
    options: list[list[Answer]],
    support_loss: list[float] | None = None,
    support_loss_floor: float | None = None,
) -> dict:
    return metrics.episode_record(
        index,
        episode["query"][0]["question_type"],
        episode["classes"],
        steps,
        [s.correct for s in scores],
        [s.token_acc_bos for s in scores],
        [s.token_acc for s in scores],
        [i["class"] for i in episode["query"]],
        scores[-1].predictions,
        [len(o) for o in options] if options else None,
        support_loss,
        support_loss_floor,
    )


def _progress(total: int, desc: str, on: bool):
    if not on:
        return None
    from ecgray.logs import progress

    return progress(total=total, desc=desc, unit="ep")


def run_episodes(
    model: ECGLanguageModel,
    start_params: Callable[[int], Params] | None,
    episodes: list[dict],
    features: FeatureFn,
    cfg: Config,
    *,
    template_answers: dict[int, list[str]] | None,
    answerer: Answerer = default_answerer,
    method: str = "meta_test",
    progress: bool = False,
) -> dict:
    """The loop of the methods that do not adapt (the controls, blind_llm, in_context): per episode, answer
    the query set once (step 0) with `start_params(index)` (None: a method without trainable weights),
    among the comparison's options (`episode_options`; the shortcut controls restrict their picks to them).
    Adapting methods run through `run_adapting`. Intervals: eval.ci_level / ci_method / bootstrap_samples /
    bootstrap_seed.
    -> {"method", "options" (the option mode, None: free text), "steps" ([0]), "summary"
    (metrics.summarize), "episodes" (per-episode records)}."""
    records = []
    bar = _progress(len(episodes), method, progress)
    with eval_mode(model), torch.no_grad():
        for index, episode in enumerate(episodes):
            options = episode_options(model, cfg, episode, template_answers)
            params = None if start_params is None else start_params(index)
            support_features, query_features = features(episode)
            score = answerer(model, params, support_features, query_features, episode, options)
            records.append(_record(index, episode, [0], [score], options))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return _result(method, records, cfg, options_used(model, cfg))


# ------------------------------------------------------------------------------ adapting in lockstep


@dataclasses.dataclass
class Adapting:
    """A method that adapts a mapper on each episode's support set with the meta-test's inner loop (the
    meta-learned model, ecg_free, finetune_scratch, supervised, ...): what `run_adapting` needs of it."""

    name: str
    start: Callable[[int], Params]
    """episode index -> the weights the inner loop starts from (never written)."""
    features: FeatureFn
    """episode -> the (support, query) features its mapper reads."""
    reads_ecg: bool = True
    """False (an all-zero ECG): its rows depend on the prompt alone, so it runs one row per distinct
    support prompt (weighted by its count) and answers one row per distinct query prompt."""
    adapts_like: str | None = None
    """The name of a method whose inner loop this one's is (the same start weights, the same support
    features; only the query features differ, e.g. shuffled_ecg and the meta-learned model): in a run with
    that method it takes that method's fast weights at each step instead of adapting its own copy (checked
    equal per episode), so the inner loop runs once for both."""


@dataclasses.dataclass
class _Task:
    """One (episode, method) of a lockstep pass."""

    method: int
    episode: int
    support: TaskData
    query: Features
    """The query rows' features; for a method that reads no ECG, those of the distinct prompts only."""
    questions: list[str]
    options: list[list[Answer]]
    inverse: list[int] | None
    """query item -> its row in `questions` (None: one row per item)."""


def run_adapting(
    model: ECGLanguageModel,
    methods: list[Adapting],
    episodes: list[dict],
    cfg: Config,
    *,
    template_answers: dict[int, list[str]] | None,
    progress: bool = False,
) -> dict[str, dict]:
    """Every adapting method on every episode (module docstring): per pass of `eval.episodes_per_pass`
    episodes, all (episode, method) inner loops run in lockstep as one task batch through the frozen LLM
    (one forward + backward per inner step for all their support sets, the question KV cache computed once
    per distinct question), and the query sets are answered in one decoding pass at each reported step
    (`reported_steps(meta.inner_steps, eval.curve_stride)`). Each task keeps its own fast weights and rows
    never interact in the LLM, so every record is the one-method, one-episode-at-a-time result; it also
    holds the support loss per inner step and the support set's ECG-blind floor (metrics.blind_loss_floor).
    -> {method name: {"method", "options", "steps", "summary", "episodes"}} in the order of `methods`."""
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"run_adapting: method names repeat: {names}")
    per_pass = cfg.eval.episodes_per_pass
    if per_pass < 1:
        raise ValueError(f"eval.episodes_per_pass={per_pass}: must be >= 1")
    inner_steps = cfg.meta.inner_steps
    steps = reported_steps(inner_steps, cfg.eval.curve_stride)
    records: dict[str, list[dict]] = {m.name: [] for m in methods}
    bar = _progress(len(episodes), "+".join(names), progress)
    with eval_mode(model):
        for first in range(0, len(episodes), per_pass):
            group = list(range(first, min(first + per_pass, len(episodes))))
            options = {i: episode_options(model, cfg, episodes[i], template_answers) for i in group}
            floors = {i: metrics.blind_loss_floor(episodes[i]["support"], model) for i in group}
            tasks = [
                _task(model, k, m, i, episodes[i], options[i], cfg.meta.support_centring)
                for i in group
                for k, m in enumerate(methods)
            ]
            starts = [methods[t.method].start(t.episode) for t in tasks]
            scores, losses = _adapt_and_answer(
                model, tasks, starts, _sources(methods, tasks, starts), episodes, inner_steps, steps,
                cfg.meta.inner_lr,
            )  # fmt: skip
            for task, per_step, loss in zip(tasks, scores, losses, strict=True):
                i = task.episode
                records[methods[task.method].name].append(
                    _record(i, episodes[i], steps, per_step, options[i], loss, floors[i])
                )
            if bar is not None:
                bar.update(len(group))
    if bar is not None:
        bar.close()
    return {name: _result(name, records[name], cfg, options_used(model, cfg)) for name in names}


def _sources(methods: list[Adapting], tasks: list[_Task], starts: list[Params]) -> list[int]:
    """Per task, the task whose fast weights it answers with: itself, or (`Adapting.adapts_like`, when that
    method is in the run) the same episode's task of that method, after checking that both start from the
    same weights and read the same support features (else the shared inner loop would not be its own)."""
    index = {m.name: k for k, m in enumerate(methods)}
    at = {(t.method, t.episode): j for j, t in enumerate(tasks)}
    sources = []
    for j, t in enumerate(tasks):
        like = methods[t.method].adapts_like
        if like is None or like not in index:
            sources.append(j)
            continue
        source = at[(index[like], t.episode)]
        mine, theirs = tasks[j].support, tasks[source].support
        same = (
            starts[j].keys() == starts[source].keys()
            and all(torch.equal(starts[j][k], starts[source][k]) for k in starts[j])
            and torch.equal(mine.pooled, theirs.pooled)
            and (mine.tokens is None) == (theirs.tokens is None)
            and (mine.tokens is None or torch.equal(mine.tokens, theirs.tokens))
            and mine.rows == theirs.rows
            and mine.weights == theirs.weights
        )
        if not same:
            raise ValueError(
                f"{methods[t.method].name} adapts like {like}, but on episode {t.episode} its start weights or "
                "support set differ from that method's: it must run its own inner loop (adapts_like=None)"
            )
        sources.append(source)
    return sources


def _task(
    model, method_index: int, method: Adapting, index: int, episode: dict, options, centre: bool = False
) -> _Task:
    (sp, st), (qp, qt) = method.features(episode)
    support, query = episode["support"], episode["query"]
    questions = [i["question"] for i in query]
    if method.reads_ecg:
        if centre:  # meta.support_centring: as in meta-training (ecgray.train.loop.task_sets)
            sp, qp = centre_on_support(model.mapper, sp, qp)
        data = model.task_data(sp, st, [i["question"] for i in support], [i["answer"] for i in support])
        return _Task(method_index, index, data, (qp, qt), questions, options, None)
    # no ECG: identical prompts are identical rows, run once (support: weighted by their count)
    counts: dict[tuple[str, str], int] = {}
    rows: list[int] = []  # the first item of each distinct (question, answer)
    for j, item in enumerate(support):
        key = (item["question"], answer_text(item["answer"]))
        if key not in counts:
            counts[key] = 0
            rows.append(j)
        counts[key] += 1
    data = model.task_data(
        sp[rows], None if st is None else st[rows], [support[j]["question"] for j in rows],
        [support[j]["answer"] for j in rows],
    )  # fmt: skip
    data.weights = list(counts.values())
    if model.cfg.paper_compat:  # the quirk's prediction depends on the gold answer's length: every row
        return _Task(method_index, index, data, (qp, qt), questions, options, None)
    first, inverse = distinct_prompts(query, options)
    return _Task(
        method_index, index, data, (qp[first], None if qt is None else qt[first]),
        [questions[j] for j in first], [options[j] for j in first] if options else [], inverse,
    )  # fmt: skip


def _adapt_and_answer(
    model, tasks: list[_Task], params: list[Params], sources: list[int], episodes, inner_steps: int,
    steps: list[int], inner_lr: float,
) -> tuple[list[list[StepScore]], list[list[float]]]:  # fmt: skip
    """Per task, the query set's StepScore at each of `steps` (inner steps, 0 = the start weights), and its
    support loss before each inner step (at the weights after 0..inner_steps-1 updates). sources[j]: the
    task whose fast weights task j answers with (`_sources`); only the tasks that are their own source
    adapt."""
    scores: list[list[StepScore]] = [[] for _ in tasks]
    adapting = [j for j, source in enumerate(sources) if source == j]
    slot = {j: n for n, j in enumerate(adapting)}  # task -> its place in the adapted batch

    def answer(step: int, fast: list[Params]) -> None:
        if step not in steps:
            return
        with torch.no_grad():
            weights = [fast[slot[source]] for source in sources]
            prefixes = [model.fuse(*t.query, w) for t, w in zip(tasks, weights, strict=True)]
            if model.cfg.paper_compat:  # the quirk's token accuracy is per query set: one set at a time
                for t, prefix, out in zip(tasks, prefixes, scores, strict=True):
                    q = episodes[t.episode]["query"]
                    out.append(paper_compat_score(model, prefix, t.questions, [i["answer"] for i in q]))
                return
            decoded = decode_blocks(
                model, [(p, t.questions, t.options) for t, p in zip(tasks, prefixes, strict=True)]
            )
        for t, predictions, out in zip(tasks, decoded, scores, strict=True):
            if t.inverse is not None:  # one row per distinct prompt: back to every query item
                predictions = [predictions[j] for j in t.inverse]
            golds = [i["answer"] for i in episodes[t.episode]["query"]]
            out.append(score_predictions(model, predictions, golds))

    params = [params[j] for j in adapting]
    answer(0, params)
    if inner_steps == 0:
        return scores, [[] for _ in tasks]
    support = model.task_set([tasks[j].support for j in adapting])
    result = adapt(model.loss_fn(), params, support, inner_steps, inner_lr, True, on_step=answer)
    losses = result.support_losses.T.tolist()  # (inner_steps, M) -> per adapted task
    return scores, [losses[slot[source]] for source in sources]


def meta_test(
    model: ECGLanguageModel,
    meta_params: Params,
    episodes: list[dict],
    ecg_store,
    cfg: Config,
    *,
    template_answers: dict[int, list[str]] | None = None,
    leads: list[str] | None = None,
    progress: bool = False,
    method: str = "meta_test",
    feature_cache: dict | None = None,
) -> dict:
    """Adapt a copy of `meta_params` on every episode's support set and answer its query set after each
    inner step 0..meta.inner_steps (module docstring). leads: evaluate with only these leads (by name).
    template_answers: admissible answers per template (default: `load_template_answers(cfg)`).
    feature_cache: a dict shared across calls so the encoder runs once per ECG (see encode_ecgs)."""
    if template_answers is None and options_used(model, cfg) and needs_template_answers(options_mode(cfg)):
        template_answers = load_template_answers(cfg)
    method_ = meta_learned(model, meta_params, ecg_store, leads, feature_cache, name=method)
    return run_adapting(
        model, [method_], episodes, cfg, template_answers=template_answers, progress=progress
    )[method]


def meta_learned(
    model: ECGLanguageModel,
    meta_params: Params,
    ecg_store,
    leads: list[str] | None = None,
    feature_cache: dict | None = None,
    name: str = "meta_test",
) -> Adapting:
    """The meta-learned mapper as an `Adapting` method: a copy of `meta_params` adapted on the ECGs."""
    return Adapting(
        name, lambda index: copy_params(meta_params), ecg_features(model, ecg_store, leads, feature_cache)
    )

"""The ECG-language model, top to bottom: encode -> fuse -> splice into the prompt -> frozen LLM.

    ECG (B, 12, T) --frozen encoder--> tokens (B, N, D_enc), pooled (B, D_enc)      [cacheable per ECG]
                   --mapper (the only trainable part, maybe fast weights)--> prefix (B, n_prefix, D_llm)
                   --spliced into the token embeddings of the prompt--> frozen LLM --> answer-token logits

Every sequence has three parts, `[before ; prefix ; after]`:

    prefix_first    before = [BOS]                             after = "Question:" " {q}" "Answer:" " {answer}" EOS
    question_first  before = [BOS] "Question:" " {q}"          after = "Answer:" " {answer}" EOS
    prefix_last     before = [BOS] "Question:" " {q}" "Answer:" after = " {answer}" EOS
    paper_compat    before = []                                after = tokenizer("Question: {q}Answer: ") cut /
                                                                       padded to 30 tokens (with its BOS)

(BOS only when the tokenizer adds one; q is lowercased and cut to `max_question_tokens`.)

Two ECGs per sample (ECG-QA's comparison questions: "... of the second ECG ... as compared to the first
ECG?"): each ECG goes through the same mapper on its own, and the prefix slot holds both, in order, each
after a text marker (`ECG_MARKERS`), in every layout:

    prefix = [ "First ECG:" ; prefix of ECG 1 ; "Second ECG:" ; prefix of ECG 2 ]   (B, prefix_width(2), D_llm)

Why text markers (the frozen LLM's own embeddings of those tokens) rather than learned marker vectors: the
questions name the ECGs in exactly these words, so the markers tie each prefix to the words that ask about
it with what the LLM already reads; they add no trainable tensor, so a mapper, its fast weights, checkpoints
and served adapters are the same for one and two ECGs, and nothing has to be learned from the few
comparison episodes to tell the two apart. The markers sit inside the prefix slot, so `before` (and with
question_first its KV cache) is unchanged, and single-ECG rows are exactly what they were.
`paper_compat` reproduces the official single-ECG code and refuses two-ECG samples. Each piece is
tokenised as the tokenizer writes the whole text "Question: {q}Answer: {answer}": the prompt ends at
"Answer:" and the answer carries its leading space (SmolLM2: `:` `Ġyes`, not `:` `Ġ` `yes`, a sequence
that tokenizer never makes); a piece's ids are ids(text up to its end) minus ids(text before it)
(`_continuation`). `before` is LEFT-padded and `after` RIGHT-padded, so the prefix sits at one column for
the whole batch and every row is contiguous; explicit position ids skip the padding, so a padded row
computes exactly what it would alone. `before` does not depend on the ECG, so it can be run once without
gradient and reused as a KV cache (`CACHED_LAYOUTS`): with question_first that is the whole question, with
prefix_last the question and "Answer:" (computed once per episode, reused by every inner step). prefix_last
puts the prefix right before the answer: the last prefix vector's position predicts the answer's first token,
so each row runs n_prefix + len(answer) positions past the cache instead of question_first's
n_prefix + 2 + len(answer) ("Answer" ":" for SmolLM2), and the mapper's output reaches the answer logit through
that position's own residual stream.

Teacher forcing: the loss covers the answer tokens + EOS only, and logits are computed only at the
positions that predict them (final hidden state gathered there, then the LM head), never for the whole
sequence and vocabulary. `paper_compat` reproduces the official quirk: answer token j (BOS included) is read
from the logit at position n_prefix - 1 + j, i.e. over the question; the answer is never fed.

The LLM is frozen (requires_grad False, eval mode); gradients flow through its activations into the prefix.

Lockstep (a frozen LLM partitioned across ranks, DeepSpeed ZeRO-3: `synchronise_ranks`). Each call of an LLM
module then all-gathers that module's weights from every rank, so every rank must make the same module
calls in the same order, forward and backward, whatever its own episodes are. The counts that depend on a
rank's data are agreed (an all-reduce of their maximum) where they are decided, and a rank with fewer pads
with passes of the same code on a one-row stand-in whose result is dropped:
  - training / adapting (`task_set`): one pass per ECG count (1, 2) that any rank has, not one per length
    bucket (each pass costs a gather of the whole LLM, so fewer taller passes win; one pass per loss also
    lets DeepSpeed free the gathered weights after its backward); a rank with no rows of a count runs a
    padding pass whose loss enters with weight 0 (`task_losses`), so its backward runs too and adds exactly 0;
  - option scoring (`score_options`): the number of trie passes; greedy decoding (`greedy_ids`): it stops
    when every rank's rows are done; decoding several query sets (`eval.meta_test.decode_blocks`): the ECG
    counts any rank decodes (`agreed_kinds`, `padding_prefix`);
  - the two-ECG markers' embeddings are taken once, on every rank, when the lockstep starts.
Every pass then runs the same code path on every rank (only the row counts and lengths differ), so its
module calls, and the backward's, come in the same order. Without lockstep nothing changes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ecgray.config import COMPARISON_TYPES, ModelConfig

QUESTION_WRAP = "Question:"
PADDING_QUESTION = "padding"
PADDING_ANSWER = "padding"
"""The stand-in row of a padding pass (lockstep: module docstring); its result is never used."""
ECG_MARKERS = ("First ECG:", "Second ECG:")
"""Text before each ECG's prefix in a two-ECG prompt, in order (module docstring)."""
ANSWER_WRAP = "Answer:"  # the prompt ends here: the answer brings its own leading space
PAPER_PROMPT = "Question: {q}Answer: "  # the official prompt, trailing space token included (paper_compat)
CACHED_LAYOUTS = ("question_first", "prefix_last")  # layouts whose `before` holds the question: a KV cache


def answer_text(answer: list[str] | str) -> str:
    """An ECG-QA answer (an unordered set) as the string the LLM learns: sorted, joined with ", "."""
    if isinstance(answer, str):
        return answer
    return ", ".join(sorted(a.strip().lower() for a in answer))


@dataclass
class PromptRows:
    """Tokenised rows as Python lists (cheap to concatenate across tasks); `collate` makes tensors."""

    before: list[list[int]]
    after: list[list[int]]
    target_start: list[int]
    """Index into `[prefix ; after]` of the position whose logit predicts the first target token."""
    targets: list[list[int]]
    n_ecg: list[int]
    """ECGs of each row (1, or 2 for a comparison sample): its prefix slot is `prefix_width(n_ecg)` wide."""

    def __len__(self) -> int:
        return len(self.before)

    def __add__(self, other: PromptRows) -> PromptRows:
        return PromptRows(
            self.before + other.before,
            self.after + other.after,
            self.target_start + other.target_start,
            self.targets + other.targets,
            self.n_ecg + other.n_ecg,
        )

    def select(self, index: list[int]) -> PromptRows:
        return PromptRows(
            [self.before[i] for i in index],
            [self.after[i] for i in index],
            [self.target_start[i] for i in index],
            [self.targets[i] for i in index],
            [self.n_ecg[i] for i in index],
        )


@dataclass
class PromptBatch:
    """Padded tensors of B rows + (optionally) the frozen KV cache of their `before` tokens."""

    before_ids: torch.Tensor  # (B, Lb) left-padded
    before_mask: torch.Tensor  # (B, Lb)
    after_ids: torch.Tensor  # (B, R) right-padded
    after_mask: torch.Tensor  # (B, R)
    target_pos: torch.Tensor  # (B, A) index into [prefix ; after]
    target_ids: torch.Tensor  # (B, A)
    target_mask: torch.Tensor  # (B, A) bool
    cache: list[tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)
    """Per layer (keys, values) of `before`, (B, heads, Lb, head_dim); None: `before` is run every pass."""
    n_ecg: int = 1
    """ECGs of every row of the batch (a batch never mixes one- and two-ECG rows)."""

    @property
    def size(self) -> int:
        return self.after_ids.shape[0]


@dataclass
class TaskData:
    """One support or query set: frozen encoder outputs + tokenised prompts (built once per episode)."""

    pooled: torch.Tensor  # (B, D_enc); two ECGs per sample: (B, 2, D_enc)
    tokens: torch.Tensor | None  # (B, N, D_enc) | (B, 2, N, D_enc), or None when the mapper reads only pooled
    rows: PromptRows
    weights: list[int] | None = None
    """Row r stands for weights[r] identical rows of the set (None: every row once). A method whose rows
    cannot depend on the ECG (an all-zero ECG) keeps one row per distinct prompt and its count: the task's
    mean loss and its gradient are those of the full set, at a fraction of the LLM's work."""


@dataclass
class TaskSet:
    """M tasks' support (or query) sets with their rows collated once (question KV cache included), so
    every inner step reuses them; `ECGLanguageModel.loss_fn` reads it. The stacked rows are collated in
    buckets of similar length (`length_buckets`): `batches` holds (row indices, PromptBatch) per bucket; no
    row indices: a padding pass of one stand-in row (lockstep, `ECGLanguageModel.task_set`)."""

    tasks: list[TaskData]
    batches: list[tuple[list[int], PromptBatch]]


def length_buckets(lengths: list[int], ratio: float = 2.0) -> list[list[int]]:
    """Row indices grouped by length, shortest first: a bucket ends where a row is more than `ratio` times
    its bucket's shortest, so padding to the bucket's longest wastes at most about 1 - 1/ratio of a pass
    (ECG-QA query answers run from 1 to ~45 tokens; one padded batch wastes two thirds)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if not buckets or lengths[i] > ratio * lengths[buckets[-1][0]]:
            buckets.append([])
        buckets[-1].append(i)
    return buckets


def _pad(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            cols = slice(width - len(s), width) if left else slice(0, len(s))
            ids[i, cols] = torch.tensor(s, dtype=torch.long)
            mask[i, cols] = 1
    return ids, mask


def _shared(a: list[int], b: list[int]) -> int:
    """Length of the common leading part of two token lists."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class OptionTrie:
    """The token trie of one sample's options: node n holds token[n] at depth[n] under parent[n] (-1: a
    first token); ancestry[n, m] is True when m is n or one of its ancestors; paths[o] lists option o's
    nodes (padded with -1) and ends[o] its last node, where EOS is scored."""

    def __init__(self, options: list[list[int]]):
        index: dict[tuple[int, ...], int] = {}
        self.token: list[int] = []
        self.parent: list[int] = []
        self.depth: list[int] = []
        paths = []
        for ids in options:
            path = []
            for d in range(len(ids)):
                key = tuple(ids[: d + 1])
                if key not in index:
                    index[key] = len(self.token)
                    self.token.append(ids[d])
                    self.parent.append(path[-1] if path else -1)
                    self.depth.append(d)
                path.append(index[key])
            paths.append(path)
        self.size = len(self.token)
        self.ends = [p[-1] for p in paths]
        longest = max((len(p) for p in paths), default=0)
        self.paths = [p + [-1] * (longest - len(p)) for p in paths]
        self.ancestry = [[False] * self.size for _ in range(self.size)]
        for n in range(self.size):
            m = n
            while m >= 0:
                self.ancestry[n][m] = True
                m = self.parent[m]


class ECGLanguageModel(nn.Module):
    """Frozen encoder + trainable mapper + frozen LLM (module docstring).

    encoder: (B, 12, T), lead_mask -> (tokens, pooled), or None when features come precomputed.
    mapper: `fusion.build_mapper(...)`; llm, tokenizer: `llm.load_llm(...)`."""

    def __init__(
        self, encoder: nn.Module | None, mapper: nn.Module, llm: nn.Module, tokenizer, cfg: ModelConfig
    ):
        super().__init__()
        if cfg.paper_compat and cfg.prompt_layout != "prefix_first":
            raise ValueError(
                "model.paper_compat=True needs model.prompt_layout=prefix_first (the paper's layout)"
            )
        self.cfg = cfg
        self.encoder = encoder
        self.mapper = mapper
        self.llm = llm
        self.tokenizer = tokenizer
        for module in (encoder, llm):
            if module is not None:
                module.eval()
                module.requires_grad_(False)
        self.decoder = llm.base_model  # the transformer without its LM head
        self.lm_head = llm.get_output_embeddings()
        self.embed = llm.get_input_embeddings()  # Gemma's sqrt(D) scale lives inside: same space as prefix
        self.d_llm = int(self.embed.embedding_dim)  # not weight.shape: a partitioned weight holds a slice
        self.softcap = getattr(llm.config, "final_logit_softcapping", None)
        params = inspect.signature(self.decoder.forward).parameters
        # transformers >= 5.2x calls the cache argument `cache`, older releases `past_key_values`
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.sliding_window = getattr(llm.config, "sliding_window", None)

        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer: needs an EOS token (the answer ends with it)")
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id)
        probe = tokenizer("a")["input_ids"]
        bos = tokenizer.bos_token_id
        self.bos = [int(bos)] if bos is not None and probe and probe[0] == bos else []
        self._question_wrap = self._ids(QUESTION_WRAP)
        self._marker_ids = [self._ids(marker) for marker in ECG_MARKERS]
        if not all(self._marker_ids):
            raise ValueError(f"tokenizer: an ECG marker of {ECG_MARKERS} tokenises to nothing")
        self._marker_embeds: list[torch.Tensor] | None = None
        """The markers' embeddings, taken once when the lockstep starts (`synchronise_ranks`); None: off."""

    # ----------------------------------------------------------------------------------------- lockstep
    def synchronise_ranks(self) -> None:
        """Run in lockstep with the other ranks of torch.distributed's group (module docstring): call it on
        every rank, at the same point, once the LLM's weights are gathered by module hooks (DeepSpeed
        ZeRO-3). From then on the ranks agree on every data-dependent number of LLM calls."""
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError(
                "synchronise_ranks: torch.distributed is not initialised (no ranks to agree with)"
            )
        device = self.embed.weight.device
        with torch.no_grad():  # the same embedding calls on every rank, now
            self._marker_embeds = [self.embed(torch.tensor(ids, device=device)) for ids in self._marker_ids]

    def in_lockstep(self) -> bool:
        """Whether LLM calls are agreed across ranks. A partitioned LLM (parameters carrying DeepSpeed's
        ds_id) without `synchronise_ranks` is an error: its calls would hang or mix up the ranks."""
        if self._marker_embeds is not None:
            return True
        if hasattr(self.embed.weight, "ds_id"):
            raise RuntimeError(
                "the frozen LLM is partitioned across ranks (DeepSpeed ZeRO-3) but the model is not in lockstep: "
                "call ECGLanguageModel.synchronise_ranks() on every rank first"
            )
        return False

    def _max_over_ranks(self, values: list[int]) -> list[int]:
        """Element-wise maximum of `values` over the ranks (lockstep), or `values` themselves."""
        if not self.in_lockstep():
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.long, device=self.embed.weight.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    def agreed_kinds(self, local) -> list[int]:
        """The ECG counts per row (1, 2) of `local` (those this rank has) or, in lockstep, of any rank."""
        present = self._max_over_ranks([int(n in set(local)) for n in (1, 2)])
        return [n for n, p in zip((1, 2), present, strict=True) if p]

    def padding_prefix(self, n_ecg: int) -> torch.Tensor:
        """A zero prefix of one row, (1, prefix_width(n_ecg), D_llm): the stand-in of a padding pass."""
        return torch.zeros(1, self.prefix_width(n_ecg), self.d_llm, device=self.embed.weight.device)

    def train(self, mode: bool = True) -> ECGLanguageModel:
        # Only the mapper ever trains (dropout); the frozen parts stay in eval mode.
        self.mapper.train(mode)
        self.training = mode
        return self

    # ------------------------------------------------------------------------------------------ encode
    @torch.no_grad()
    def encode(
        self, ecg: torch.Tensor, lead_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen encoder: ecg (B, 12, T) -> (tokens (B, N, D_enc), pooled (B, D_enc)); cache these per ECG."""
        if self.encoder is None:
            raise ValueError("ECGLanguageModel.encode: built without an encoder; pass precomputed features")
        return self.encoder(ecg, lead_mask)

    # -------------------------------------------------------------------------------------------- fuse
    def mapper_params(self) -> dict[str, torch.Tensor]:
        """The trainable tensors (the meta-parameters), by name."""
        return dict(self.mapper.named_parameters())

    def fuse(
        self, pooled: torch.Tensor, tokens: torch.Tensor | None, params: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """(B, D_enc), (B, N, D_enc) -> prefix (B, n_prefix, D_llm); `params` = fast weights (else the module's).
        Two ECGs per sample, (B, 2, D_enc), (B, 2, N, D_enc): each ECG through the same mapper, then
        `splice_ecgs` -> (B, prefix_width(2), D_llm)."""
        if pooled.dim() != 3:
            return self._map(pooled, tokens, params)
        b, n_ecg = pooled.shape[:2]
        if n_ecg != 2:
            raise ValueError(f"fuse: pooled {tuple(pooled.shape)}: one or two ECGs per sample, got {n_ecg}")
        if tokens is not None and (tokens.dim() != 4 or tuple(tokens.shape[:2]) != (b, 2)):
            raise ValueError(f"fuse: tokens {tuple(tokens.shape)} do not fit pooled {tuple(pooled.shape)}")
        flat = None if tokens is None else tokens.flatten(0, 1)  # (B * 2, N, D_enc)
        per_ecg = self._map(pooled.flatten(0, 1), flat, params)  # (B * 2, n_prefix, D_llm)
        return self.splice_ecgs(per_ecg.unflatten(0, (b, 2)))

    def _map(self, pooled: torch.Tensor, tokens: torch.Tensor | None, params) -> torch.Tensor:
        if params is None:
            return self.mapper(pooled, tokens)
        return functional_call(self.mapper, params, (pooled, tokens))

    def splice_ecgs(self, per_ecg: torch.Tensor) -> torch.Tensor:
        """(B, 2, n_prefix, D_llm) prefixes of the first and second ECG -> the two-ECG prefix slot
        [marker 1 ; prefix 1 ; marker 2 ; prefix 2], (B, prefix_width(2), D_llm) (module docstring)."""
        b = per_ecg.shape[0]
        parts = []
        for j, ids in enumerate(self._marker_ids):
            if self.in_lockstep():  # taken once on every rank: no LLM call that other ranks would not make
                marker = self._marker_embeds[j]
            else:
                marker = self.embed(torch.tensor(ids, dtype=torch.long, device=self.embed.weight.device))
            parts += [marker.to(per_ecg.dtype).expand(b, -1, -1), per_ecg[:, j]]  # (B, L_j, D), (B, P, D)
        return torch.cat(parts, dim=1)

    def prefix_width(self, n_ecg: int) -> int:
        """Positions of the prefix slot of a row with n_ecg ECGs: n_prefix, or 2 n_prefix + the markers."""
        if n_ecg == 1:
            return self.cfg.n_prefix
        if n_ecg == 2:
            return 2 * self.cfg.n_prefix + sum(len(ids) for ids in self._marker_ids)
        raise ValueError(f"{n_ecg} ECGs per sample: expected 1 or 2")

    def n_ecg_of(self, prefix: torch.Tensor) -> int:
        """ECGs per sample of a prefix tensor (B, width, D_llm), read off its width (the two differ)."""
        width = int(prefix.shape[1])
        for n_ecg in (1, 2):
            if width == self.prefix_width(n_ecg):
                return n_ecg
        raise ValueError(
            f"prefix of {width} positions: neither one ECG's ({self.prefix_width(1)}) nor two ECGs' "
            f"({self.prefix_width(2)}) with model.n_prefix={self.cfg.n_prefix}"
        )

    # ------------------------------------------------------------------------------------------ prompt
    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _continuation(self, context: str, text: str) -> list[int]:
        """The ids of `text` as the tokenizer writes it right after `context`: ids(context + text) minus
        ids(context). Refused when a token straddles the boundary (no split of the ids is `text`'s own)."""
        head, ids = self._ids(context), self._ids(context + text)
        if ids[: len(head)] != head:
            raise ValueError(
                f"tokenizer: {context + text!r} does not tokenise as {context!r} followed by {text!r} "
                f"(a token spans the boundary: {head} vs {ids})"
            )
        return ids[len(head) :]

    def answer_ids(self, answer: list[str] | str) -> list[int]:
        """An answer's target ids (EOS excluded): those the tokenizer gives " {answer}" after "Answer:"."""
        text = answer_text(answer)
        return self._continuation(ANSWER_WRAP, " " + text) if text else []

    def prompt_rows(
        self,
        questions: list[str],
        answers: list[list[str] | str | list[int]] | None = None,
        eos: bool = True,
        n_ecg: int | list[int] = 1,
    ) -> PromptRows:
        """Tokenise B samples for the configured layout. answers: ECG-QA answer lists / strings, or token-id
        lists (decoding); None: no targets. eos: append EOS to the targets (proper mode). n_ecg: ECGs per
        sample (one for all, or per row): the width of its prefix slot (`prefix_width`)."""
        if answers is not None and len(answers) != len(questions):
            raise ValueError(f"prompt_rows: {len(questions)} questions but {len(answers)} answers")
        n_ecgs = [n_ecg] * len(questions) if isinstance(n_ecg, int) else list(n_ecg)
        if len(n_ecgs) != len(questions):
            raise ValueError(f"prompt_rows: {len(questions)} questions but {len(n_ecgs)} ECG counts")
        if self.cfg.paper_compat and any(n != 1 for n in n_ecgs):
            raise ValueError(
                "model.paper_compat reproduces the official single-ECG prompt; two-ECG (comparison) samples "
                "need model.paper_compat=False"
            )
        rows = PromptRows([], [], [], [], [])
        n_prefix = self.cfg.n_prefix
        for i, question in enumerate(questions):
            answer = None if answers is None else answers[i]
            rows.n_ecg.append(n_ecgs[i])
            if self.cfg.paper_compat:
                # the official input: tokenizer(prompt) with its BOS and trailing space, cut / padded to 30;
                # the target is tokenised on its own and keeps its BOS
                prompt = self.tokenizer(PAPER_PROMPT.format(q=question.lower()))["input_ids"]
                prompt = list(prompt)[: self.cfg.paper_prompt_tokens]
                prompt += [self.pad_id] * (self.cfg.paper_prompt_tokens - len(prompt))
                if answer is None:
                    target = []
                elif isinstance(answer, list) and answer and isinstance(answer[0], int):
                    target = list(answer)
                else:
                    target = list(self.tokenizer(answer_text(answer))["input_ids"])
                if len(target) > len(prompt) + 1:
                    raise ValueError(
                        f"paper_compat: answer of {len(target)} tokens is longer than the "
                        f"{len(prompt)}-token prompt it is read from (sample {i})"
                    )
                rows.before.append([])
                rows.after.append(prompt)
                rows.target_start.append(n_prefix - 1)  # over the question: the quirk
                rows.targets.append(target)
                continue
            q = " " + question.lower()
            q_ids = self._continuation(QUESTION_WRAP, q)[: self.cfg.max_question_tokens]
            wrap = self._continuation(QUESTION_WRAP + q, ANSWER_WRAP)  # as written after the question
            if answer is None:
                a_ids = []
            elif isinstance(answer, list) and answer and isinstance(answer[0], int):
                a_ids = list(answer)  # token ids (decoding): as given
            else:
                a_ids = self.answer_ids(answer)
            target = a_ids + ([self.eos_id] if eos and answer is not None else [])
            if self.cfg.prompt_layout == "prefix_last":
                before = self.bos + self._question_wrap + q_ids + wrap
                after = list(a_ids)
            elif self.cfg.prompt_layout == "question_first":
                before = self.bos + self._question_wrap + q_ids
                after = wrap + a_ids
            else:
                before = list(self.bos)
                after = self._question_wrap + q_ids + wrap + a_ids
            # the token at index width + len(after without answer) - 1 predicts the first answer token
            width = self.prefix_width(n_ecgs[i])
            rows.before.append(before)
            rows.after.append(after)  # EOS is only a target: nothing is predicted from its position
            rows.target_start.append(width + len(after) - len(a_ids) - 1)
            rows.targets.append(target)
        return rows

    def collate(self, rows: PromptRows, use_cache: bool | None = None) -> PromptBatch:
        """Pad rows into tensors; with use_cache (default: `CACHED_LAYOUTS`) also run `before` once (no grad).
        The rows must share their ECG count (`task_set` buckets them apart)."""
        n_ecg = set(rows.n_ecg)
        if len(n_ecg) > 1:
            raise ValueError(f"collate: rows of {sorted(n_ecg)} ECGs in one batch; collate them apart")
        device = self.embed.weight.device
        before_ids, before_mask = _pad(rows.before, self.pad_id, left=True)
        after_ids, after_mask = _pad(rows.after, self.pad_id, left=False)
        target_ids, target_mask = _pad(rows.targets, self.pad_id, left=False)
        width = target_ids.shape[1]
        target_pos = torch.tensor(rows.target_start, dtype=torch.long)[:, None] + torch.arange(width)[None]
        # padded target slots point at position 0 (masked out anyway) so gathers stay in range
        target_pos = torch.where(target_mask.bool(), target_pos, torch.zeros_like(target_pos))
        batch = PromptBatch(
            before_ids.to(device),
            before_mask.to(device),
            after_ids.to(device),
            after_mask.to(device),
            target_pos.to(device),
            target_ids.to(device),
            target_mask.bool().to(device),
            n_ecg=n_ecg.pop() if n_ecg else 1,
        )
        if use_cache is None:
            use_cache = self.cfg.prompt_layout in CACHED_LAYOUTS
        if use_cache and batch.before_ids.shape[1] > 0:
            batch.cache = self._before_cache(rows, batch)
        return batch

    @torch.no_grad()
    def _before_cache(self, rows: PromptRows, batch: PromptBatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        lb = batch.before_ids.shape[1]
        if self.sliding_window is not None and lb >= self.sliding_window - 1:
            raise ValueError(
                f"{self.cfg.prompt_layout} KV cache: {lb} question tokens do not fit the LLM's sliding window "
                f"({self.sliding_window}); lower model.max_question_tokens"
            )
        self.in_lockstep()  # raises for a partitioned LLM out of lockstep
        # Episodes repeat questions (one question_id group per class): run each distinct one once.
        distinct: dict[tuple[int, ...], int] = {}
        inverse = [distinct.setdefault(tuple(b), len(distinct)) for b in rows.before]
        first = [inverse.index(u) for u in range(len(distinct))]
        ids, mask = batch.before_ids[first], batch.before_mask[first]
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        cache = self._new_cache(None)
        self.decoder(
            inputs_embeds=self.embed(ids),
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_kw: cache},
        )
        index = torch.tensor(inverse, device=ids.device)
        return [
            (layer.keys.index_select(0, index), layer.values.index_select(0, index)) for layer in cache.layers
        ]

    def _new_cache(self, kv: list[tuple[torch.Tensor, torch.Tensor]] | None):
        from transformers import DynamicCache

        # A fresh cache object per pass: the LLM appends the new keys to it, the stored tensors stay untouched.
        return DynamicCache(ddp_cache_data=kv, config=self.llm.config)

    # ------------------------------------------------------------------------------------- frozen LLM
    def hidden_states(self, prefix: torch.Tensor, batch: PromptBatch) -> tuple[torch.Tensor, int]:
        """Run the frozen LLM on [before ; prefix ; after] -> (final hidden states, offset of the prefix in it)."""
        hidden, offset, _ = self._forward(prefix, batch, keep_cache=False)
        return hidden, offset

    def _forward(self, prefix: torch.Tensor, batch: PromptBatch, keep_cache: bool):
        """hidden_states, plus (keep_cache) the KV cache of the whole [before ; prefix ; after] sequence."""
        b, p = prefix.shape[:2]
        if b != batch.size or prefix.shape[2] != self.d_llm:
            raise ValueError(
                f"prefix {tuple(prefix.shape)} does not fit the prompt batch: expected ({batch.size}, "
                f"n_prefix, {self.d_llm})"
            )
        if p != self.prefix_width(batch.n_ecg):
            raise ValueError(
                f"prefix has {p} positions but model.n_prefix={self.cfg.n_prefix} with {batch.n_ecg} ECG(s) per "
                f"row needs {self.prefix_width(batch.n_ecg)}"
            )
        device = prefix.device
        self.in_lockstep()  # raises for a partitioned LLM out of lockstep
        parts = [prefix.to(self.embed.weight.dtype), self.embed(batch.after_ids)]  # (B, P, D), (B, R, D)
        mask = torch.cat([batch.before_mask, batch.before_mask.new_ones(b, p), batch.after_mask], dim=1)
        n_before = batch.before_mask.sum(1, keepdim=True)  # (B, 1) real tokens before the prefix
        cache = self._new_cache(batch.cache) if batch.cache is not None or keep_cache else None
        if batch.cache is not None:
            position_ids = n_before + torch.arange(p + batch.after_ids.shape[1], device=device)[None]
            offset = 0
        else:
            parts.insert(0, self.embed(batch.before_ids))
            position_ids = (mask.cumsum(1) - 1).clamp(min=0)
            offset = batch.before_ids.shape[1]
        out = self.decoder(
            inputs_embeds=torch.cat(parts, dim=1),
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            **({self._cache_kw: cache} if cache is not None else {}),
        )
        return out.last_hidden_state, offset, cache

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head (+ Gemma's final soft-capping) in fp32."""
        logits = self.lm_head(hidden).float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def target_logits(
        self, prefix: torch.Tensor, batch: PromptBatch, full_logits: bool = False
    ) -> torch.Tensor:
        """Logits at the positions that predict each target token: (N, V) over the True cells of target_mask
        (row-major). full_logits: compute the whole (B, S, V) first (the reference engine's cost)."""
        hidden, offset = self.hidden_states(prefix, batch)
        pos = batch.target_pos + offset  # (B, A)
        if full_logits:
            logits = self.logits(hidden)  # (B, S, V)
            picked = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))
            return picked[batch.target_mask]
        picked = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, A, D)
        return self.logits(picked[batch.target_mask])  # (N, V)

    def token_nll(self, prefix: torch.Tensor, batch: PromptBatch, full_logits: bool = False) -> torch.Tensor:
        """Teacher-forced negative log-likelihood per target token, (B, A), zero on padding."""
        logits = self.target_logits(prefix, batch, full_logits)
        nll = batch.target_mask.new_zeros(batch.target_mask.shape, dtype=torch.float32)
        nll = nll.masked_scatter(
            batch.target_mask, F.cross_entropy(logits, batch.target_ids[batch.target_mask], reduction="none")
        )
        return nll

    # ---------------------------------------------------------------------------------------- training
    def task_data(
        self, pooled: torch.Tensor, tokens: torch.Tensor | None, questions: list[str], answers
    ) -> TaskData:
        """One support / query set from precomputed encoder outputs: pooled (B, D_enc), or (B, 2, D_enc) for
        two ECGs per sample (tokens likewise)."""
        if pooled.shape[0] != len(questions):
            raise ValueError(f"task_data: {pooled.shape[0]} ECG vectors but {len(questions)} questions")
        n_ecg = 2 if pooled.dim() == 3 else 1
        return TaskData(pooled, tokens, self.prompt_rows(questions, answers, n_ecg=n_ecg))

    def task_losses(
        self,
        fast_weights: list[dict[str, torch.Tensor]],
        tasks: list[TaskData],
        batches: list[tuple[list[int], PromptBatch]] | None = None,
        full_logits: bool = False,
    ) -> torch.Tensor:
        """Mean answer-token loss of each task under its own fast weights, (M,), in one frozen-LLM pass per
        length bucket over all M tasks' rows. batches: `task_set(tasks).batches` (pass them to reuse the
        collated rows and question KV cache); None: collated here."""
        if len(fast_weights) != len(tasks):
            raise ValueError(f"task_losses: {len(fast_weights)} fast-weight sets for {len(tasks)} tasks")
        if batches is None:
            batches = self.task_set(tasks).batches
        prefixes = [self.fuse(t.pooled, t.tokens, w) for w, t in zip(fast_weights, tasks, strict=True)]
        widest = max(p.shape[1] for p in prefixes)
        # tasks of one and of two ECGs: zero-padded to the widest slot; each bucket takes its own width
        prefix = torch.cat(
            [p if p.shape[1] == widest else F.pad(p, (0, 0, 0, widest - p.shape[1])) for p in prefixes], dim=0
        )  # (sum of B_m, widest prefix slot, D_llm)
        rows, row_nll, row_count = [], [], []
        padding = []  # lockstep: the padding passes' losses, entered with weight 0
        for index, batch in batches:
            width = self.prefix_width(batch.n_ecg)
            if not index:  # a padding pass: on a stand-in prefix of the graph, so its backward runs too
                stand_in = (
                    prefix[:1, :width] if width <= widest else F.pad(prefix[:1], (0, 0, 0, width - widest))
                )
                padding.append(self.token_nll(stand_in, batch, full_logits).sum())
                continue
            rows += index
            part = prefix[index] if width == widest else prefix[index][:, :width]
            row_nll.append(self.token_nll(part, batch, full_logits).sum(1))
            row_count.append(batch.target_mask.sum(1))
        inverse = torch.empty(len(rows), dtype=torch.long)
        inverse[torch.tensor(rows)] = torch.arange(len(rows))
        inverse = inverse.to(prefix.device)
        nll, count = torch.cat(row_nll)[inverse], torch.cat(row_count)[inverse]  # back in stacked row order
        if any(t.weights is not None for t in tasks):  # rows standing for several identical ones
            weights = [w for t in tasks for w in (t.weights or [1] * len(t.rows))]
            weights = torch.tensor(weights, dtype=nll.dtype, device=nll.device)
            nll, count = nll * weights, count * weights
        sizes = [len(t.rows) for t in tasks]
        per_task_nll = torch.stack([chunk.sum() for chunk in nll.split(sizes)])
        per_task_count = torch.stack([chunk.sum() for chunk in count.split(sizes)])
        if (per_task_count == 0).any():
            raise ValueError("task_losses: a task has no answer tokens (answers missing?)")
        losses = per_task_nll / per_task_count
        if padding:  # + 0 exactly; the padding passes' backward adds exactly 0 to every gradient
            losses = losses + 0.0 * torch.stack(padding).sum()
        return losses

    def task_set(self, tasks: list[TaskData]) -> TaskSet:
        """Collate M tasks' rows once, in length buckets (and, `CACHED_LAYOUTS`, their question KV cache); rows
        of one and of two ECGs go to different buckets. In lockstep: one batch per ECG count any rank has,
        a padding batch (no rows of its own) where this rank has none (module docstring)."""
        rows = stack_rows(tasks)
        if self.in_lockstep():
            batches = []
            for n_ecg in self.agreed_kinds(rows.n_ecg):
                members = [i for i, n in enumerate(rows.n_ecg) if n == n_ecg]
                if members:
                    batches.append((members, self.collate(rows.select(members))))
                else:  # another rank has rows of this count: the same calls, on a stand-in row
                    padding = self.prompt_rows([PADDING_QUESTION], [PADDING_ANSWER], n_ecg=n_ecg)
                    batches.append(([], self.collate(padding)))
            return TaskSet(list(tasks), batches)
        buckets = []
        for n_ecg in sorted(set(rows.n_ecg)):
            members = [i for i, n in enumerate(rows.n_ecg) if n == n_ecg]
            lengths = [len(rows.after[i]) for i in members]
            buckets += [[members[j] for j in bucket] for bucket in length_buckets(lengths)]
        return TaskSet(list(tasks), [(index, self.collate(rows.select(index))) for index in buckets])

    def loss_fn(self, full_logits: bool = False):
        """The `ecgray.meta` loss: (fast weights dict | list of M dicts, TaskSet) -> scalar | (M,)."""

        def loss(fast_weights, data: TaskSet) -> torch.Tensor:
            if isinstance(fast_weights, dict):
                return self.task_losses([fast_weights], data.tasks, data.batches, full_logits)[0]
            return self.task_losses(fast_weights, data.tasks, data.batches, full_logits)

        return loss

    # ---------------------------------------------------------------------------------------- decoding
    @torch.no_grad()
    def score_options(
        self, prefix: torch.Tensor, questions: list[str], options: list[list[str]], chunk: int = 1024
    ) -> list[torch.Tensor]:
        """Constrained decoding: log p(option + EOS | prompt) summed over its tokens, for every admissible
        option of every sample -> list of (n_options_i,) tensors.

        The prompt ([before ; prefix ; ... "Answer:"]) runs once per sample; its KV cache is then shared by
        that sample's options, which run as one token trie (`OptionTrie`): options sharing leading tokens
        ("lead i", "lead i, lead ii") run those tokens once, each trie node attending to the prompt and its
        own ancestors. That is exactly what teacher forcing each option on the full prompt computes, at a
        fraction of the cost. `chunk`: padded trie nodes per pass (at least one trie); a sample whose trie
        outgrows it (or the sliding window) gets several."""
        if self.cfg.paper_compat:
            raise ValueError(
                "score_options: option scoring needs teacher forcing; set model.paper_compat=False"
            )
        if len(options) != len(questions) or prefix.shape[0] != len(questions):
            raise ValueError(
                f"score_options: {len(questions)} questions, {prefix.shape[0]} prefixes, {len(options)} option lists"
            )
        ids = [[self.answer_ids(o) for o in opts] for opts in options]
        if not any(ids):
            raise ValueError("score_options: no options given")
        if any(not i for opts in ids for i in opts):
            raise ValueError("score_options: an option tokenises to nothing")
        # 1. the prompts: last hidden state (predicts each option's first token) and the KV cache
        batch = self.collate(self.prompt_rows(questions, None, n_ecg=self.n_ecg_of(prefix)))
        hidden, offset, cache = self._forward(prefix, batch, keep_cache=True)
        p = prefix.shape[1]
        last = offset + p + batch.after_mask.sum(1) - 1  # (B,) the last real prompt position
        first_logp = torch.log_softmax(self.logits(hidden[torch.arange(len(questions)), last]), -1)  # (B, V)
        prompt_mask = torch.cat(
            [batch.before_mask, batch.before_mask.new_ones(len(questions), p), batch.after_mask], 1
        )
        prompt_len = prompt_mask.sum(1)  # (B,) real prompt tokens: the options' first position id
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        # one trie per sample (several when it outgrows `chunk` or the sliding window): (sample, options, trie)
        longest = max(len(i) for opts in ids for i in opts)
        width_limit = max(chunk, longest)  # one option always fits a trie
        if self.sliding_window is not None:
            window = self.sliding_window - 2 - int(prompt_mask.shape[1])  # trie nodes the window leaves
            if longest > window:
                raise ValueError(
                    f"score_options: prompt ({int(prompt_mask.shape[1])} tokens) + option ({longest} tokens) "
                    f"do not fit the LLM's sliding window ({self.sliding_window}); lower model.max_question_tokens"
                )
            width_limit = min(width_limit, window)
        tries: list[tuple[int, list[int], OptionTrie]] = []
        for i, opts in enumerate(ids):
            group: list[int] = []
            size = 0
            # in token order an option shares the most leading tokens with the one before it, and adds
            # that many fewer nodes
            for j in sorted(range(len(opts)), key=lambda j: opts[j]):
                new = len(opts[j]) - (_shared(opts[j], opts[group[-1]]) if group else 0)
                if group and size + new > width_limit:
                    tries.append((i, group, OptionTrie([opts[g] for g in group])))
                    group, size, new = [], 0, len(opts[j])
                group.append(j)
                size += new
            if group:
                tries.append((i, group, OptionTrie([opts[g] for g in group])))
        device, dtype = prefix.device, self.embed.weight.dtype
        scores = [torch.empty(len(o), device=device) for o in ids]
        # tries in passes of at most `chunk` padded nodes (at least one trie), similar sizes together
        # (`length_buckets`) so little of a pass is padding
        passes: list[list[tuple[int, list[int], OptionTrie]]] = []
        for bucket in length_buckets([t.size for _, _, t in tries], ratio=1.5):
            rows = max(1, chunk // max(tries[b][2].size for b in bucket))
            passes += [[tries[b] for b in bucket[k : k + rows]] for k in range(0, len(bucket), rows)]
        # lockstep: as many trie passes as the rank with the most; past its own, a rank repeats its first
        (n_passes,) = self._max_over_ranks([len(passes)])
        for k in range(n_passes):
            part = passes[k] if k < len(passes) else passes[0]
            owner = torch.tensor([i for i, _, _ in part], device=device)
            width = max(t.size for _, _, t in part)
            tokens = torch.full((len(part), width), self.pad_id, dtype=torch.long)
            positions = torch.zeros((len(part), width), dtype=torch.long)
            tree = torch.eye(width, dtype=torch.bool).repeat(len(part), 1, 1)  # padding attends to itself
            real = torch.zeros((len(part), width), dtype=torch.bool)
            for r, (_, _, t) in enumerate(part):
                tokens[r, : t.size] = torch.as_tensor(t.token)
                positions[r, : t.size] = torch.as_tensor(t.depth)
                tree[r, : t.size, : t.size] = torch.as_tensor(t.ancestry)
                real[r, : t.size] = True
            # 2. every trie node after its own prompt's cache, attending to the prompt and its ancestors
            allowed = torch.cat(
                [prompt_mask[owner].bool()[:, None, :].expand(-1, width, -1), tree.to(device)], 2
            )
            additive = torch.zeros(allowed.shape, dtype=dtype, device=device)
            out = self.decoder(
                inputs_embeds=self.embed(tokens.to(device)),
                attention_mask=additive.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None],
                position_ids=prompt_len[owner, None] + positions.to(device),
                use_cache=True,
                **{self._cache_kw: self._new_cache([(k[owner], v[owner]) for k, v in kv])},
            )
            # 3. log p(next token | node) at every node: its children's tokens, and EOS where an option ends
            logits = self.logits(out.last_hidden_state[real.to(device)])  # (nodes, V), row by row
            if k >= len(passes):  # a padding pass: its scores are this rank's already
                continue
            log_norm = torch.logsumexp(logits, -1)
            base = 0
            for i, group, t in part:
                tok = torch.as_tensor(t.token, device=device)
                parent = torch.as_tensor(t.parent, device=device)
                up = base + parent.clamp(min=0)
                # log p(node's token | the tokens above it)
                edge = torch.where(parent >= 0, logits[up, tok] - log_norm[up], first_logp[i, tok])
                path = torch.as_tensor(t.paths, device=device)  # (options, depth) node ids, -1: none
                along = torch.where(path >= 0, edge[path.clamp(min=0)], 0.0).sum(1)
                ends = base + torch.as_tensor(t.ends, device=device)
                scores[i][torch.as_tensor(group, device=device)] = (
                    along + logits[ends, self.eos_id] - log_norm[ends]
                )
                base += t.size
        return scores

    def greedy(
        self, prefix: torch.Tensor, questions: list[str], max_new_tokens: int | None = None
    ) -> list[str]:
        """Greedy decoding until EOS or max_answer_tokens -> answer strings."""
        ids = self.greedy_ids(prefix, questions, max_new_tokens)
        return [self.tokenizer.decode(g, skip_special_tokens=True).strip() for g in ids]

    @torch.no_grad()
    def greedy_ids(
        self, prefix: torch.Tensor, questions: list[str], max_new_tokens: int | None = None
    ) -> list[list[int]]:
        """Greedy token ids (EOS excluded); one LLM pass per new token, the question cache built once."""
        if self.cfg.paper_compat:
            raise ValueError("greedy: the paper's quirk never feeds the answer; use target_predictions")
        max_new_tokens = max_new_tokens or self.cfg.max_answer_tokens
        generated: list[list[int]] = [[] for _ in questions]
        done = [False] * len(questions)
        n_ecg = self.n_ecg_of(prefix)
        # the cache of the question part does not change while decoding: build it once
        base = self.collate(
            self.prompt_rows(questions, [[self.eos_id]] * len(questions), eos=False, n_ecg=n_ecg)
        )
        for _ in range(max_new_tokens):
            # a placeholder token at the end makes its predicting position a target: read the next token there
            rows = self.prompt_rows(questions, [g + [self.eos_id] for g in generated], eos=False, n_ecg=n_ecg)
            batch = self.collate(rows, use_cache=False)
            batch.cache = base.cache
            logits = self.target_logits(prefix, batch)  # (N, V) row-major
            last = torch.cumsum(batch.target_mask.sum(1), 0) - 1
            next_ids = logits[last].argmax(-1).tolist()
            for i, tok in enumerate(next_ids):
                if not done[i]:
                    if tok == self.eos_id:
                        done[i] = True
                    else:
                        generated[i].append(tok)
            # lockstep: until every rank's rows are done (a rank whose rows are done keeps making the calls)
            if self._max_over_ranks([int(not all(done))]) == [0]:
                break
        return generated

    @torch.no_grad()
    def target_predictions(self, prefix: torch.Tensor, batch: PromptBatch) -> torch.Tensor:
        """argmax token at every target position, (B, A) (padding: -1). With paper_compat this is the
        official prediction (length taken from the gold answer): token accuracy = mean(pred == target)."""
        pred = self.target_logits(prefix, batch).argmax(-1)
        out = torch.full_like(batch.target_ids, -1)
        return out.masked_scatter(batch.target_mask, pred)


def _whole(params: list[nn.Parameter]) -> AbstractContextManager:
    return nullcontext()


def stack_rows(tasks: list[TaskData]) -> PromptRows:
    """The prompt rows of M tasks, concatenated in task order (for one shared LLM pass)."""
    rows = tasks[0].rows
    for t in tasks[1:]:
        rows = rows + t.rows
    return rows


def check_data_fits_encoder(cfg) -> None:
    """The encoder reads data.fs Hz windows of data.window_s s: a run whose encoder states another input
    (encoder.fs, encoder.window_s) is refused, naming both specs."""
    from ecgray.models.encoder import input_fits, input_spec

    if not input_fits(cfg.encoder, cfg.data.fs, cfg.data.window_s):
        raise ValueError(
            f"encoder expects {input_spec(cfg.encoder)} (encoder.fs, encoder.window_s); data gives "
            f"{cfg.data.fs} Hz, {float(cfg.data.window_s)} s (data.fs, data.window_s)"
        )


def check_question_types_fit_model(cfg) -> None:
    """model.paper_compat reproduces the official single-ECG code: a run with comparison question types
    (`episodes.types()`) under it is refused before anything is built."""
    comparison = [qt for qt in cfg.episodes.types() if qt in COMPARISON_TYPES]
    if cfg.model.paper_compat and comparison:
        raise ValueError(
            f"model.paper_compat=True reproduces the official single-ECG code; the question types {comparison} "
            "carry two ECGs per sample: set model.paper_compat=False or leave them out of episodes.*"
        )
    if cfg.meta.support_centring and cfg.model.mapper != "grounded":
        raise ValueError(
            f"meta.support_centring=true centres the grounded mapper's standardisation on the support set; "
            f"model.mapper={cfg.model.mapper} has no feature statistics: set model.mapper=grounded or leave it off"
        )


def build_model(
    cfg,
    device: str | torch.device = "cpu",
    mapper_state: dict | None = None,
    feature_stats: dict | None = None,
    gathered: Callable[[list[nn.Parameter]], AbstractContextManager] | None = None,
) -> ECGLanguageModel:
    """The model of a run config: frozen encoder (`cfg.encoder`), frozen LLM (`cfg.model.llm`) and a mapper
    seeded from `cfg.seed` (identical in every process), or loaded from `mapper_state` (a checkpoint's
    tensors; shape mismatches are named). The one place the three parts are put together.
    feature_stats: a fresh model.mapper=grounded's {"feature_mean", "feature_std"} of the meta-train side
    (`ecgray.features.pooled_stats`); a checkpoint's mapper_state brings its own, never recomputed.
    gathered: params -> a context in which they are whole, for an LLM built partitioned (DeepSpeed ZeRO-3:
    `ecgray.train.engine.partitioned_loading`); the LLM's weights read outside a module call go through it."""
    from ecgray.models.checkpoint import load_mapper_state
    from ecgray.models.encoder import load_encoder
    from ecgray.models.fusion import build_mapper, token_embedding_norm
    from ecgray.models.llm import llm_hidden_size, load_llm

    check_data_fits_encoder(cfg)
    check_question_types_fit_model(cfg)
    encoder = load_encoder(cfg.encoder, device=device, seed=cfg.seed)
    llm, tokenizer = load_llm(
        cfg.model.llm, cfg.model.dtype, device, seed=cfg.seed, attention=cfg.model.attention
    )
    stats = mapper_state  # the grounded mapper's fixed tensors: a checkpoint's own, else the fresh ones
    if cfg.model.mapper == "grounded" and mapper_state is None:
        embed = llm.get_input_embeddings()
        with (gathered or _whole)(list(embed.parameters())):  # every rank takes part at ZeRO-3
            stats = {**(feature_stats or {}), "token_norm": token_embedding_norm(embed)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        mapper = build_mapper(cfg.model, encoder.d_enc, llm_hidden_size(llm), stats).to(device)
    if mapper_state is not None:
        load_mapper_state(
            mapper, {k: v.to(device) for k, v in mapper_state.items()}, source="checkpoint mapper"
        )
    return ECGLanguageModel(encoder, mapper, llm, tokenizer, cfg.model)

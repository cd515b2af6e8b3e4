"""The model side of the service, without Ray: frozen models loaded once, adaptation, batched answering.

`QAEngine.adapt` runs the inner loop (`ecgray.meta.adapt`, method.md section 3: inner_steps plain SGD steps
of inner_lr on the whole support set, dropout off) and returns the fast weights. `QAEngine.answer` answers
a batch of queries, each with its own fast weights (None: the meta-learned weights), in one frozen-LLM pass:
the admissible options are scored when known (constrained decoding), else the answer is decoded greedily.

Adaptation works on its own copy of the mapper module: `functional_call` swaps a module's parameters while
it runs, so the answering thread and the adapting thread must never share one.
"""

from __future__ import annotations

import ast
import copy
import csv
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ecgray.config import Config, ServeConfig
from ecgray.data.signals import Canonical

Params = dict[str, torch.Tensor]
DEFAULT_TEMPLATE_ANSWERS = (
    Path(__file__).resolve().parents[1]
    / "ecgray"
    / "synth"
    / "assets"
    / "ecgqa_ptbxl_answers_for_each_template.csv"
)


@dataclass
class Query:
    ecg: Canonical | tuple[Canonical, Canonical]
    """One ECG, or a comparison question's pair (first, second)."""
    question: str
    options: list[str] | None
    fast_weights: Params | None
    """None: the meta-learned (zero-shot) weights."""


def read_template_answers(path: str | Path) -> dict[int, list[str]]:
    """answers_for_each_template.csv (template_id, Python-literal list) -> template_id -> admissible answers."""
    out = {}
    with open(path, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                out[int(row["template_id"])] = [str(a) for a in ast.literal_eval(row["classes"])]
            except (KeyError, ValueError, SyntaxError) as err:
                raise ValueError(f"{path}: line {line}: expected template_id,classes ({err})") from None
    return out


def params_bytes(params: Params) -> int:
    return sum(t.numel() * t.element_size() for t in params.values())


def encoder_id(cfg: Config) -> str:
    """The frozen encoder's identity: its kind and a hash of its weights file (random-init: the seed)."""
    if cfg.encoder.checkpoint is None:
        return f"{cfg.encoder.kind}:random:{cfg.seed}"
    h = hashlib.sha256()
    with open(cfg.encoder.checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"{cfg.encoder.kind}:{h.hexdigest()[:16]}"


class QAEngine:
    """Frozen encoder + LLM and the meta-learned mapper of one checkpoint (module docstring)."""

    def __init__(self, cfg: Config, mapper_state: Params, device: str = "cpu"):
        from ecgray.models.ecg_lm import ECGLanguageModel, build_model

        if cfg.meta.support_centring:
            raise ValueError(
                "the checkpoint was meta-trained with meta.support_centring=true: the service does not centre "
                "queries on their adapter's support set; serve a checkpoint trained without it"
            )
        self.cfg = cfg
        self.lm = build_model(cfg, device, mapper_state=mapper_state).eval()
        encoder, mapper, llm, tokenizer = self.lm.encoder, self.lm.mapper, self.lm.llm, self.lm.tokenizer
        # adaptation's own mapper module (module docstring); encoder and LLM are shared, read-only
        self.adapt_lm = ECGLanguageModel(encoder, copy.deepcopy(mapper), llm, tokenizer, cfg.model).eval()
        self.device = torch.device(device)
        h = hashlib.sha256()
        for name, tensor in sorted(mapper_state.items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        self.checkpoint_id = h.hexdigest()[:16]
        # what an adapter id depends on besides the support set: the mapper, the frozen models (the same
        # mapper over another encoder file gives other fast weights), the inner loop and the input
        self.model_id = (
            f"{self.checkpoint_id}|{encoder_id(cfg)}|{cfg.model.llm}|{cfg.model.prompt_layout}|"
            f"{cfg.meta.inner_steps}|{cfg.meta.inner_lr}|{cfg.data.fs}|{cfg.data.window_s}|{cfg.data.window}|"
            f"{cfg.data.leads}"
        )
        self.adapter_bytes = params_bytes(dict(mapper.named_parameters()))

    # ------------------------------------------------------------------------------------------- encode
    def _encode(self, lm, ecgs: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Canonical ECGs -> pooled (B, D_enc), tokens (B, N, D_enc); pairs (all items pairs) -> (B, 2, D_enc),
        (B, 2, N, D_enc), both ECGs of all pairs in one encoder pass."""
        pairs = isinstance(ecgs[0], tuple)
        flat = [e for pair in ecgs for e in pair] if pairs else ecgs
        x = torch.from_numpy(np.stack([e.signal for e in flat])).to(self.device)  # (B, 12, T)
        mask = torch.from_numpy(np.stack([e.lead_mask for e in flat])).to(self.device)  # (B, 12)
        tokens, pooled = lm.encode(x, mask)
        if pairs:
            return pooled.unflatten(0, (len(ecgs), 2)), tokens.unflatten(0, (len(ecgs), 2))
        return pooled, tokens

    # -------------------------------------------------------------------------------------------- adapt
    def adapt(self, support: list[tuple[Canonical, str, list[str]]]) -> tuple[Params, list[float]]:
        """Inner loop on one support set -> (fast weights, support loss before each step)."""
        from ecgray.meta.maml import adapt

        lm = self.adapt_lm
        pooled, tokens = self._encode(lm, [s[0] for s in support])
        data = lm.task_set([lm.task_data(pooled, tokens, [s[1] for s in support], [s[2] for s in support])])
        params = {k: v.detach() for k, v in lm.mapper_params().items()}
        with torch.enable_grad():
            result = adapt(lm.loss_fn(), params, data, self.cfg.meta.inner_steps, self.cfg.meta.inner_lr)
        fast = {k: v.detach() for k, v in result.fast_weights.items()}
        return fast, result.support_losses[:, 0].tolist()

    # ------------------------------------------------------------------------------------------- answer
    @torch.no_grad()
    def answer(self, queries: list[Query]) -> list[dict]:
        """Answer a batch: one encoder pass, one mapper call per distinct fast-weight set, one LLM pass for
        the option-scored rows and one greedy decode for the rest -- per kind (one ECG, or pairs: their
        prefixes differ in width)."""
        kinds: dict[bool, list[int]] = {}
        for i, q in enumerate(queries):
            kinds.setdefault(isinstance(q.ecg, tuple), []).append(i)
        results: list[dict] = [{} for _ in queries]
        for index in kinds.values():
            for i, result in zip(index, self._answer_kind([queries[i] for i in index]), strict=True):
                results[i] = result
        return results

    def _answer_kind(self, queries: list[Query]) -> list[dict]:
        lm = self.lm
        pooled, tokens = self._encode(lm, [q.ecg for q in queries])
        groups: dict[int, list[int]] = {}
        for i, q in enumerate(queries):
            groups.setdefault(id(q.fast_weights), []).append(i)
        prefix = [None] * len(queries)
        for index in groups.values():
            weights = queries[index[0]].fast_weights
            rows = torch.tensor(index)
            out = lm.fuse(pooled[rows], None if tokens is None else tokens[rows], weights)  # (b, P, D_llm)
            for k, i in enumerate(index):
                prefix[i] = out[k]
        prefix = torch.stack(prefix)  # (B, n_prefix, D_llm)
        results: list[dict] = [{} for _ in queries]
        scored = [i for i, q in enumerate(queries) if q.options]
        if scored:
            options = [queries[i].options for i in scored]
            scores = lm.score_options(prefix[scored], [queries[i].question for i in scored], options)
            for i, opts, s in zip(scored, options, scores, strict=True):
                values = [float(v) for v in s]
                bad = [o for o, v in zip(opts, values, strict=True) if not math.isfinite(v)]
                if bad:
                    raise FloatingPointError(f"non-finite option scores for {bad}")
                results[i] = {
                    "answer": opts[int(np.argmax(values))],
                    "scores": dict(zip(opts, values, strict=True)),
                }
        free = [i for i, q in enumerate(queries) if not q.options]
        if free:
            texts = lm.greedy(prefix[free], [queries[i].question for i in free])
            for i, text in zip(free, texts, strict=True):
                results[i] = {"answer": text, "scores": None}
        return results

    def probe(self) -> float:
        """A real forward of a flat 12-lead probe ECG (encoder, mapper, option scoring): the seconds it took.
        Raises when the models no longer give finite scores (the replica's health check)."""
        import time

        t = time.perf_counter()
        n = self.cfg.data.n_samples
        ecg = Canonical(np.zeros((12, n), np.float32), np.ones(12, bool), 0)
        self.answer([Query(ecg, "does this ecg show sinus rhythm?", ["yes", "no"], None)])
        return time.perf_counter() - t

    def info(self) -> dict:
        from ecgray.config import to_dict

        return {
            "checkpoint_id": self.checkpoint_id,
            "llm": self.cfg.model.llm,
            "d_llm": self.lm.d_llm,
            "mapper": self.cfg.model.mapper,
            "mapper_params": sum(p.numel() for p in self.lm.mapper.parameters()),
            "adapter_bytes": self.adapter_bytes,
            "model": to_dict(self.cfg.model),
            "encoder": to_dict(self.cfg.encoder),
            "data": to_dict(self.cfg.data),
            "meta": {"inner_steps": self.cfg.meta.inner_steps, "inner_lr": self.cfg.meta.inner_lr},
        }


def load_engine(checkpoint: str | Path, llm: str | None = None, device: str | None = None) -> QAEngine:
    """A checkpoint directory (safetensors + YAML, never pickle) -> QAEngine; `llm` overrides model.llm;
    device None: the checkpoint's `device` (auto: CUDA when visible)."""
    from ecgray.config import from_dict, to_dict
    from ecgray.models.checkpoint import load_checkpoint

    state, cfg = load_checkpoint(checkpoint)
    if device is None:
        device = "cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        if cfg.device == "cuda" and device == "cpu":
            raise ValueError(f"checkpoint {checkpoint}: device=cuda but no CUDA device is visible")
    if llm is not None:
        tree = to_dict(cfg)
        tree["model"]["llm"] = llm
        cfg = from_dict(tree)
    return QAEngine(cfg, state, device)


def adapters_per_replica(engine: QAEngine, cfg: ServeConfig) -> int:
    """How many adapters an answer replica keeps loaded within serve.adapter_cache_mb; at least one fits,
    else start-up fails."""
    cap = int(cfg.adapter_cache_mb * 2**20)
    if cap < engine.adapter_bytes:
        raise ValueError(
            f"serve.adapter_cache_mb={cfg.adapter_cache_mb} ({cap} bytes) cannot hold one adapter "
            f"({engine.adapter_bytes} bytes for {engine.cfg.model.llm})"
        )
    return cap // engine.adapter_bytes

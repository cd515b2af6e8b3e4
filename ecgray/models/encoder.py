"""The ECG encoder: 12-lead window (B, 12, T) -> tokens (B, N, D_enc) and a pooled vector (B, D_enc).

`build_encoder(cfg)` chooses the class by `cfg.kind`: `ECGEncoder` below (conv_transformer, ecgray's own,
trained by `ecgray pretrain-encoder`) or `Wav2Vec2ECGEncoder` (wav2vec2_ecg, the fairseq-signals ECG
transformer of the paper and of ECG-FM, in ecgray/models/wav2vec2_ecg.py). Both take the same input and
give the same outputs, so the mapper, training, eval and serving do not know which one runs.

The built-in conv_transformer, a small stand-in for the paper's encoder:
  1. missing leads (lead_mask False) zero-filled, then normalisation (`cfg.normalize`, see
     `prepare_input`) over the present leads only;
  2. the mask itself embedded and added to every token, so the model knows "lead absent" from "flat lead";
  3. conv stem: Conv1d(12 -> stem_channels, k=7) + GELU, then a patchifying Conv1d(kernel = stride =
     cfg.patch) -> N = T / patch tokens of width D_enc;
  4. fixed sinusoidal positions (any N works), cfg.n_layers pre-norm transformer layers, final LayerNorm;
  5. pooled = mean over tokens (the paper mean-pools its encoder's tokens too).

Checkpoints are safetensors whose metadata holds the architecture and input fields of the `EncoderConfig`
they were trained with (`save_encoder` / `load_encoder`); a mismatch with the run's config is an error.
fairseq .pt checkpoints are never read here: `ecgray convert-encoder` (ecgray/models/convert.py) turns them
into such a safetensors file once.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ecgray.config import EncoderConfig

N_LEADS = 12
# Per kind, the EncoderConfig fields that define the weights' shapes and meaning and the input they were
# trained on; they must match on load.
ARCH_FIELDS: dict[str, tuple[str, ...]] = {
    "conv_transformer": (
        "kind", "d_enc", "n_layers", "n_heads", "patch", "stem_channels", "ffn_mult",
        "normalize", "fs", "window_s",
    ),
    "wav2vec2_ecg": (
        "kind", "d_enc", "n_layers", "n_heads", "ffn_mult", "conv_layers", "extractor_mode", "conv_bias",
        "pos_conv_kernel", "pos_conv_groups", "layer_norm_first", "normalize", "fs", "window_s",
    ),
}  # fmt: skip
METADATA_KEY = "ecgray.encoder_config"


def normalize_record(x: torch.Tensor, lead_mask: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Per-record normalisation: remove each lead's mean (baseline), then divide the whole record by one
    standard deviation taken over its present leads, so relative lead amplitudes (heart axis) survive.
    Masked leads are ignored by the statistics and come out as zeros. x (B, 12, T), lead_mask (B, 12)."""
    m = lead_mask.to(x.dtype).unsqueeze(-1)  # (B, 12, 1)
    x = (x - x.mean(dim=-1, keepdim=True)) * m
    n_present = (m.sum(dim=(1, 2)) * x.shape[-1]).clamp_min(1.0)  # (B,)
    std = torch.sqrt(x.pow(2).sum(dim=(1, 2)) / n_present)  # (B,)
    # eps (mV) keeps an all-flat record finite instead of amplifying float noise.
    return x / (std + eps)[:, None, None]


def normalize_lead(x: torch.Tensor, lead_mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-lead z-score over time (ECG-FM's input): subtract each lead's mean, divide by its (population)
    standard deviation. Constant leads (std <= eps mV) and masked leads come out as zeros, as ECG-FM's
    preprocessing zeroes constant leads. x (B, 12, T), lead_mask (B, 12)."""
    x = x - x.mean(dim=-1, keepdim=True)
    std = x.pow(2).mean(dim=-1, keepdim=True).sqrt()  # (B, 12, 1)
    keep = lead_mask.unsqueeze(-1) & (std > eps)
    return torch.where(keep, x / std.clamp_min(eps), torch.zeros_like(x))


def prepare_input(x: torch.Tensor, lead_mask: torch.Tensor, normalize: str) -> torch.Tensor:
    """The encoder's input step: missing leads zero-filled first (so their values, whatever they are, never
    reach the statistics or the output), then `normalize` (record / lead / none). x (B, 12, T) mV."""
    x = torch.where(lead_mask.unsqueeze(-1), x, torch.zeros_like(x))
    if normalize == "record":
        return normalize_record(x, lead_mask)
    if normalize == "lead":
        return normalize_lead(x, lead_mask)
    return x


def check_batch(x: torch.Tensor, lead_mask: torch.Tensor | None) -> torch.Tensor:
    """Validate an ECG batch x (B, 12, T) and its lead_mask (B, 12); returns the mask as bool on x's device
    (all leads present when None)."""
    if x.dim() != 3 or x.shape[1] != N_LEADS:
        raise ValueError(f"ECG batch must have shape (B, {N_LEADS}, T), got {tuple(x.shape)}")
    if lead_mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if lead_mask.shape != x.shape[:2]:
        raise ValueError(f"lead_mask must have shape {tuple(x.shape[:2])}, got {tuple(lead_mask.shape)}")
    return lead_mask.to(device=x.device, dtype=torch.bool)


def sinusoidal_positions(n: int, d: int, device=None, dtype=None) -> torch.Tensor:
    """(n, d) fixed sine/cosine position table."""
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(n, d, device=device)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div[: d // 2])
    return table.to(dtype or torch.float32)


class ECGEncoder(nn.Module):
    """Conv-stem + pre-norm transformer ECG encoder (module docstring)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.kind != "conv_transformer":
            raise ValueError(f"ECGEncoder is the conv_transformer kind, got encoder.kind={cfg.kind!r}")
        if cfg.d_enc % cfg.n_heads != 0:
            raise ValueError(f"encoder.d_enc={cfg.d_enc} must be divisible by encoder.n_heads={cfg.n_heads}")
        if cfg.d_enc % 2 != 0:
            raise ValueError(f"encoder.d_enc={cfg.d_enc} must be even (sinusoidal positions)")
        if cfg.patch < 1:
            raise ValueError(f"encoder.patch={cfg.patch} must be >= 1")
        self.cfg = cfg
        self.stem = nn.Sequential(
            nn.Conv1d(N_LEADS, cfg.stem_channels, kernel_size=7, padding=3),
            nn.GELU(),
            nn.Conv1d(cfg.stem_channels, cfg.d_enc, kernel_size=cfg.patch, stride=cfg.patch),
        )
        self.lead_embed = nn.Linear(N_LEADS, cfg.d_enc, bias=False)
        layer = nn.TransformerEncoderLayer(
            d_model=cfg.d_enc,
            nhead=cfg.n_heads,
            dim_feedforward=cfg.ffn_mult * cfg.d_enc,
            dropout=cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # enable_nested_tensor only matters for padding masks, which we never pass.
        self.layers = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_enc)

    @property
    def d_enc(self) -> int:
        return self.cfg.d_enc

    def n_tokens(self, n_samples: int) -> int:
        """Tokens produced for a window of n_samples samples."""
        self._check_length(n_samples)
        return n_samples // self.cfg.patch

    def _check_length(self, n_samples: int) -> None:
        if n_samples % self.cfg.patch != 0 or n_samples < self.cfg.patch:
            raise ValueError(
                f"ECG window of T={n_samples} samples is not a positive multiple of encoder.patch="
                f"{self.cfg.patch}: choose data.window_s / data.fs or encoder.patch so that patch divides T"
            )

    def forward(
        self, x: torch.Tensor, lead_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 12, T) in mV, lead_mask (B, 12) bool or None (all present) -> (tokens (B, N, D_enc),
        pooled (B, D_enc)). Leads whose mask is False are zero-filled: their values never reach the output."""
        lead_mask = check_batch(x, lead_mask)
        self._check_length(x.shape[-1])
        dtype = self.stem[0].weight.dtype
        x = prepare_input(x.to(dtype), lead_mask, self.cfg.normalize)
        tokens = self.stem(x).transpose(1, 2)  # (B, D_enc, N) -> (B, N, D_enc)
        n = tokens.shape[1]
        tokens = tokens + sinusoidal_positions(n, self.cfg.d_enc, tokens.device, dtype)[None]
        tokens = tokens + self.lead_embed(lead_mask.to(dtype))[:, None, :]  # (B, 1, D_enc) broadcast
        tokens = self.norm(self.layers(tokens))  # (B, N, D_enc)
        return tokens, tokens.mean(dim=1)


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    """A randomly initialised encoder of `cfg.kind` (ECGEncoder or Wav2Vec2ECGEncoder)."""
    if cfg.kind == "conv_transformer":
        return ECGEncoder(cfg)
    if cfg.kind == "wav2vec2_ecg":
        from ecgray.models.wav2vec2_ecg import Wav2Vec2ECGEncoder

        return Wav2Vec2ECGEncoder(cfg)
    raise ValueError(f"encoder.kind={cfg.kind!r}: expected one of {sorted(ARCH_FIELDS)}")


def arch_dict(cfg: EncoderConfig) -> dict:
    """The architecture and input fields of an EncoderConfig's kind (what a checkpoint must agree on)."""
    full = asdict(cfg)
    return {k: full[k] for k in ARCH_FIELDS[cfg.kind]}


def input_spec(cfg: EncoderConfig) -> str:
    """The input an encoder was trained on, in words: "500 Hz, 5.0 s windows"."""
    window = "any window length" if cfg.window_s is None else f"{float(cfg.window_s)} s windows"
    return f"{cfg.fs} Hz, {window}"


def input_fits(cfg: EncoderConfig, fs: int | float, window_s: float) -> bool:
    """Whether signals at fs Hz in windows of window_s seconds are the input the encoder was trained on."""
    if fs != cfg.fs:
        return False
    return cfg.window_s is None or round(cfg.window_s * cfg.fs) == round(window_s * fs)


def save_encoder(encoder: nn.Module, path: str | Path, extra_metadata: dict | None = None) -> Path:
    """Write the encoder's weights as safetensors, its architecture config in the file's metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {METADATA_KEY: json.dumps(arch_dict(encoder.cfg), sort_keys=True)}
    for key, value in (extra_metadata or {}).items():
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)  # atomic: a reader never sees a half-written checkpoint
    return path


def read_encoder_config(path: str | Path) -> dict:
    """The architecture config stored in an encoder checkpoint's metadata."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors' own error type
        raise ValueError(f"encoder checkpoint {path}: not a safetensors file ({err})") from err
    if METADATA_KEY not in metadata:
        raise ValueError(
            f"encoder checkpoint {path}: no '{METADATA_KEY}' metadata (not written by save_encoder)"
        )
    return json.loads(metadata[METADATA_KEY])


def freeze(module: nn.Module) -> nn.Module:
    """eval mode, requires_grad False on every parameter."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _where_weights_come_from(cfg: EncoderConfig) -> str:
    if cfg.kind == "wav2vec2_ecg":
        return "the safetensors file `ecgray convert-encoder IN.pt OUT.safetensors` wrote from a fairseq checkpoint"
    return "the safetensors file `ecgray pretrain-encoder` wrote"


def check_encoder_checkpoint(cfg: EncoderConfig) -> None:
    """Train and eval need the frozen encoder's weights: no `checkpoint` is an error unless `random_init`
    says a random encoder is meant (tests, smoke runs); a named file must exist."""
    if cfg.checkpoint is None:
        if not cfg.random_init:
            raise ValueError(
                f"encoder.checkpoint is not set: the frozen encoder would be random. Point it at "
                f"{_where_weights_come_from(cfg)}, or set encoder.random_init=true (tests only)"
            )
    else:
        from ecgray import storage

        if not storage.is_file(cfg.checkpoint):
            raise FileNotFoundError(f"encoder.checkpoint={cfg.checkpoint}: no such file")


def _check_is_safetensors(path: Path) -> None:
    """A torch pickle given as encoder.checkpoint is refused (loading it would unpickle), with the way out."""
    import zipfile

    if path.suffix in (".pt", ".pth", ".ckpt", ".bin") or zipfile.is_zipfile(path):
        raise ValueError(
            f"encoder checkpoint {path} (encoder.checkpoint) is a torch pickle, not safetensors: convert it "
            f"once with `ecgray convert-encoder {path} OUT.safetensors` and point encoder.checkpoint at OUT"
        )


def load_encoder(cfg: EncoderConfig, device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    """Build the encoder of `cfg.kind`, load `cfg.checkpoint` (safetensors only) and freeze it (eval,
    requires_grad False).

    A checkpoint written with other architecture or input fields is an error naming both values.
    `cfg.checkpoint=None` gives a random-init encoder (seeded; tests and ablations only) with a warning."""
    if cfg.checkpoint is None:
        warnings.warn(
            f"encoder.checkpoint is None: using a RANDOM-INIT encoder (tests only; point encoder.checkpoint "
            f"at {_where_weights_come_from(cfg)})",
            stacklevel=2,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = build_encoder(cfg)
        return freeze(encoder.to(device))
    from ecgray import storage

    if storage.is_uri(cfg.checkpoint) and storage.is_file(cfg.checkpoint):
        with storage.local_file(cfg.checkpoint) as local:  # a temporary copy, removed after loading
            return _load_encoder_file(cfg, local, device)
    return _load_encoder_file(cfg, Path(cfg.checkpoint), device)


def _load_encoder_file(cfg: EncoderConfig, path: Path, device) -> nn.Module:
    if not path.is_file():
        how = (
            "convert a fairseq checkpoint with `ecgray convert-encoder IN.pt OUT.safetensors` and point "
            "encoder.checkpoint at OUT.safetensors"
            if cfg.kind == "wav2vec2_ecg"
            else "train one with `ecgray pretrain-encoder --data PREPARED_DIR --out DIR` and point "
            "encoder.checkpoint at DIR/encoder.safetensors"
        )
        raise FileNotFoundError(f"encoder checkpoint {path} (encoder.checkpoint) not found: {how}")
    _check_is_safetensors(path)
    stored = read_encoder_config(path)
    wanted = arch_dict(cfg)
    diffs = [
        f"encoder.{k}: checkpoint has {stored.get(k)!r}, config has {wanted[k]!r}"
        for k in ARCH_FIELDS[cfg.kind]
        if stored.get(k) != wanted[k]
    ]
    if diffs:
        raise ValueError(f"encoder checkpoint {path} does not match the config:\n  " + "\n  ".join(diffs))
    from safetensors.torch import load_file

    encoder = build_encoder(cfg)
    state = load_file(str(path))
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"encoder checkpoint {path}: missing tensors {missing}, unexpected tensors {unexpected}"
        )
    return freeze(encoder.to(device))

"""The fairseq-signals ECG transformer (wav2vec 2.0 family: W2V+CMSC+RLM, ECG-FM) in pure torch, frozen.

The paper's encoder and ECG-FM's public weights are this architecture; fairseq-signals itself does not
install on a current stack, so it is written here from the architecture, with no fairseq import. The forward
is fairseq-signals' `ECGTransformerModel` at feature extraction (no masking, no quantizer), top to bottom:
  0. missing leads (lead_mask False) zero-filled and the input normalised (`cfg.normalize`; `lead` =
     per-lead z-score, ECG-FM's input), as the ECG models handle limited leads by zeroing absent ones;
  1. feature extractor: per conv layer [channels, kernel, stride] a Conv1d (no bias) then GELU; in the
     `default` mode (the ECG models') the first layer has a GroupNorm with one group per channel before its
     GELU, in `layer_norm` mode every layer a LayerNorm over channels (both in fp32);
     N = the tokens left after the convs (floor((T - kernel) / stride) + 1 per layer: 2,500 -> 156);
  2. LayerNorm over the last conv's channels (`layer_norm`), Linear -> D_enc (`post_extract_proj`);
  3. + convolutional positional encoding (`conv_pos`): a weight-normed grouped Conv1d (kernel 128, 16
     groups, padding 64; the one extra output of an even kernel trimmed, fairseq's SamePad) -> GELU;
  4. transformer (`encoder`): post-LN (layer_norm_first False, fairseq-signals' default) applies
     encoder.layer_norm to its input, then per layer x = LN(x + MHA(x)), x = LN(x + FC2(GELU(FC1(x))));
     pre-LN applies x = x + MHA(LN(x)), x = x + FC2(GELU(FC1(LN(x)))) and encoder.layer_norm at the end;
  5. pooled = mean over the N tokens (the paper mean-pools the tokens).

Parameter and buffer names are fairseq-signals' (the `ECGTransformerModel` layout: feature_extractor.*,
layer_norm.*, post_extract_proj.*, conv_pos.pos_conv.0.weight_g / weight_v / bias, encoder.layers.{i}.*,
encoder.layer_norm.*), so a converted checkpoint names every tensor as the reference implementation does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ecgray.config import EncoderConfig
from ecgray.models.encoder import N_LEADS, check_batch, prepare_input


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the weights' dtype (as fairseq's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).type_as(x)


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the weights' dtype (as fairseq's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class TransposeLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(-2, -1)


def conv_block(
    n_in: int, n_out: int, kernel: int, stride: int, norm: str | None, bias: bool
) -> nn.Sequential:
    """Conv1d -> [norm] -> GELU, indexed as fairseq's block (0 conv, 1 its Dropout(0), 2 the norm)."""
    layers: list[nn.Module] = [nn.Conv1d(n_in, n_out, kernel, stride=stride, bias=bias), nn.Identity()]
    if norm == "group":
        layers.append(Fp32GroupNorm(n_out, n_out))  # one group per channel: each channel over time
    elif norm == "layer":
        layers.append(nn.Sequential(TransposeLast(), Fp32LayerNorm(n_out), TransposeLast()))
    layers.append(nn.GELU())
    return nn.Sequential(*layers)


class ConvFeatureExtractor(nn.Module):
    """(B, 12, T) -> (B, C, N): the strided convolutions of `cfg.conv_layers`."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.conv_layers = nn.ModuleList()
        n_in = N_LEADS
        for i, (n_out, kernel, stride) in enumerate(cfg.conv_layers):
            if cfg.extractor_mode == "layer_norm":
                norm = "layer"
            else:
                norm = "group" if i == 0 else None
            self.conv_layers.append(conv_block(n_in, n_out, kernel, stride, norm, cfg.conv_bias))
            n_in = n_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.conv_layers:
            x = block(x)
        return x


class WeightNormConv1d(nn.Module):
    """Grouped Conv1d whose weight is weight_g * weight_v / ||weight_v||, the norm taken per kernel position
    (over output and input channels: torch / fairseq weight_norm with dim=2)."""

    def __init__(self, channels: int, kernel: int, groups: int):
        super().__init__()
        self.kernel, self.groups = kernel, groups
        v = torch.randn(channels, channels // groups, kernel) * (4 / (kernel * channels)) ** 0.5
        self.weight_g = nn.Parameter(v.norm(dim=(0, 1), keepdim=True))  # (1, 1, K)
        self.weight_v = nn.Parameter(v)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))
        return F.conv1d(x, weight, self.bias, padding=self.kernel // 2, groups=self.groups)


class SamePad(nn.Module):
    """Drops the one extra output position a padding of kernel // 2 gives an even kernel."""

    def __init__(self, kernel: int):
        super().__init__()
        self.remove = 1 if kernel % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : x.shape[-1] - self.remove]


class ConvPositionalEncoding(nn.Module):
    """(B, N, D) -> (B, N, D) relative positions from a wide grouped convolution (added to the tokens)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        k = cfg.pos_conv_kernel
        self.pos_conv = nn.Sequential(
            WeightNormConv1d(cfg.d_enc, k, cfg.pos_conv_groups), SamePad(k), nn.GELU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_conv(x.transpose(1, 2)).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q / k / v / out projections (fairseq's MultiheadAttention)."""

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def heads(t):  # (B, N, D) -> (B, H, N, D / H)
            return t.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # softmax(q k^T / sqrt(D / H)) v
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class TransformerLayer(nn.Module):
    """One wav2vec 2.0 encoder layer, post-LN or pre-LN (`layer_norm_first`)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.d_enc
        self.layer_norm_first = cfg.layer_norm_first
        self.self_attn = SelfAttention(d, cfg.n_heads, cfg.dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.ffn_mult * d)
        self.fc2 = nn.Linear(cfg.ffn_mult * d, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer_norm_first:
            x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x)))
            return x + self.dropout(self.fc2(F.gelu(self.fc1(self.final_layer_norm(x)))))
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x)))
        return self.final_layer_norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.layer_norm_first = cfg.layer_norm_first
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.n_layers))
        self.layer_norm = nn.LayerNorm(cfg.d_enc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.layer_norm_first:
            x = self.layer_norm(x)  # post-LN: the encoder's LayerNorm comes first
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x) if self.layer_norm_first else x


class Wav2Vec2ECGEncoder(nn.Module):
    """fairseq-signals ECG transformer (module docstring); the interface of ECGEncoder."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.kind != "wav2vec2_ecg":
            raise ValueError(f"Wav2Vec2ECGEncoder is the wav2vec2_ecg kind, got encoder.kind={cfg.kind!r}")
        if cfg.d_enc % cfg.n_heads != 0:
            raise ValueError(f"encoder.d_enc={cfg.d_enc} must be divisible by encoder.n_heads={cfg.n_heads}")
        if cfg.d_enc % cfg.pos_conv_groups != 0:
            raise ValueError(
                f"encoder.d_enc={cfg.d_enc} must be divisible by encoder.pos_conv_groups={cfg.pos_conv_groups}"
            )
        self.cfg = cfg
        channels = cfg.conv_layers[-1][0]
        self.feature_extractor = ConvFeatureExtractor(cfg)
        self.layer_norm = nn.LayerNorm(channels)
        # fairseq has no projection when the conv width already is D_enc
        self.post_extract_proj = nn.Linear(channels, cfg.d_enc) if channels != cfg.d_enc else nn.Identity()
        self.conv_pos = ConvPositionalEncoding(cfg)
        self.encoder = TransformerEncoder(cfg)

    @property
    def d_enc(self) -> int:
        return self.cfg.d_enc

    def n_tokens(self, n_samples: int) -> int:
        """Tokens produced for a window of n_samples samples."""
        n = n_samples
        for _, kernel, stride in self.cfg.conv_layers:
            n = (n - kernel) // stride + 1
            if n < 1:
                raise ValueError(
                    f"ECG window of T={n_samples} samples is too short for encoder.conv_layers="
                    f"{self.cfg.conv_layers}: choose a longer data.window_s or fewer / smaller conv layers"
                )
        return n

    def forward(
        self, x: torch.Tensor, lead_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 12, T) in mV, lead_mask (B, 12) bool or None (all present) -> (tokens (B, N, D_enc),
        pooled (B, D_enc)). Leads whose mask is False are zero-filled: their values never reach the output."""
        lead_mask = check_batch(x, lead_mask)
        self.n_tokens(x.shape[-1])
        dtype = self.layer_norm.weight.dtype
        x = prepare_input(x.to(dtype), lead_mask, self.cfg.normalize)
        features = self.feature_extractor(x).transpose(1, 2)  # (B, C, N) -> (B, N, C)
        tokens = self.post_extract_proj(self.layer_norm(features))  # (B, N, D_enc)
        tokens = self.encoder(tokens + self.conv_pos(tokens))
        return tokens, tokens.mean(dim=1)

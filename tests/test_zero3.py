"""ZeRO-3 (the frozen LLM partitioned across workers, ecgray/train/engine.py) on CPU: 2 Ray Train workers,
gloo, a tiny LLaMA-shaped LLM loaded from a safetensors directory (the partitioned from_pretrained path).
Its meta-gradient and evaluation equal ZeRO-0's on episodes whose LLM call counts differ between the ranks
(length buckets, one- vs two-ECG rows, option-trie passes, greedy decoding lengths); `ecgray train` at
ZeRO-3 evaluates in training and resumes from its checkpoint."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tolerances import rounding_tolerance

from ecgray.config import ConfigError, from_dict, load_config, to_dict
from ecgray.train.toy import toy_overrides, write_toy_prepared


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """The tiny random LLaMA (tied embeddings, like SmolLM2) saved as a Hugging Face safetensors directory."""
    from ecgray.models.llm import load_llm

    out = tmp_path_factory.mktemp("tiny-llama-hf")
    model, tokenizer = load_llm("tiny-llama", seed=0)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def zero3_overrides(toy, llm_dir) -> list[str]:
    # every tensor partitioned (the tiny model's are all below DeepSpeed's default persistence threshold)
    # and freed after each module's call (no gathered weight kept for later calls): every call all-gathers
    return [
        *toy_overrides(toy), f"model.llm={llm_dir}", "train.zero3_persistence_threshold=0",
        "train.zero3_max_live_parameters=0",
    ]  # fmt: skip


def test_zero_stage_3_is_lockstep_meta_training_only():
    """Meta-training takes ZeRO-3; a job whose LLM calls are not rank-synchronised (ecgray align) refuses it,
    naming the key and the alternative; the DeepSpeed config carries the persistence threshold."""
    from ecgray.train import engine as eng

    cfg = load_config(None, ["train.zero_stage=3", "train.zero3_persistence_threshold=0"])
    eng.check_zero_stage(cfg, lockstep=True)
    with pytest.raises(ConfigError, match=r"train\.zero_stage=3 is supported by meta-training") as err:
        eng.check_zero_stage(cfg)
    assert "train.zero_stage=0" in str(err.value)
    zero = eng.deepspeed_config(cfg, world=2)["zero_optimization"]
    assert zero == {
        "stage": 3, "stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 10**9,
        "stage3_max_reuse_distance": 10**9, "memory_efficient_linear": False,
    }  # fmt: skip
    for stage in (0, 1, 2):
        cfg = load_config(None, [f"train.zero_stage={stage}"])
        eng.check_zero_stage(cfg)
        assert eng.deepspeed_config(cfg, world=2)["zero_optimization"] == {"stage": stage}


def test_build_engine_at_zero3_needs_the_model_to_put_in_lockstep():
    from torch import nn

    from ecgray.train import engine as eng

    cfg = load_config(None, ["train.zero_stage=3"])
    with pytest.raises(ValueError, match="pass the ECGLanguageModel holding `llm` as lm="):
        eng.build_engine(nn.Linear(2, 2), nn.Linear(2, 2), cfg, world=1)


# ----------------------------------------------------------- the sliced partitioned load (2 gloo processes)


def _odd_llm_dir(out: Path) -> Path:
    """A tiny LLaMA whose norms have an odd number of elements (hidden 33, head_dim 8): over 2 ranks their
    partitions end in DeepSpeed's padding (3 heads of 8). Tied embeddings, like SmolLM2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ecgray.models.llm import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=33, head_dim=8, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def _sliced_load_worker(rank: int, world: int, dirs: list[str], init: str, out: str) -> None:
    """One gloo process: each LLM directory loaded partitioned (train.zero_stage=3), every parameter and
    buffer gathered and compared bit for bit with a plain load_llm of the same directory (fp32; a bf16
    request is refused: DeepSpeed builds fp32 partitions without a GPU).
    transformers' whole-file ZeRO-3 loader is made to fail, so the sliced load must serve every model."""
    import os

    import torch.distributed as dist
    import transformers.modeling_utils

    from ecgray.models.llm import load_llm
    from ecgray.train import engine as eng

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # as Ray Train sets them
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)

    def whole_file(*args, **kwargs):
        raise AssertionError("transformers' ZeRO-3 loader read the whole checkpoint")

    report = {}
    cfg = load_config(None, ["train.zero_stage=3", "train.zero3_persistence_threshold=0"])
    with eng.partitioned_loading(cfg, world), pytest.raises(ValueError, match="set model.dtype=auto"):
        load_llm(dirs[0], dtype="bfloat16")  # DeepSpeed builds fp32 partitions on CPU: refused, not cast
    for llm_dir in dirs:
        for dtype in ("float32",):
            with eng.partitioned_loading(cfg, world) as gathered:
                original, transformers.modeling_utils.load_state_dict = (
                    transformers.modeling_utils.load_state_dict, whole_file,
                )  # fmt: skip
                try:
                    model, _ = load_llm(llm_dir, dtype=dtype)
                finally:
                    transformers.modeling_utils.load_state_dict = original
            reference, _ = load_llm(llm_dir, dtype=dtype)
            expected = dict(reference.named_parameters(remove_duplicate=False))
            names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
            assert sorted(names) == sorted(expected), (names, list(expected))
            differ = []
            for name, p in model.named_parameters(remove_duplicate=False):
                assert p.ds_tensor.numel() == -(-p.ds_numel // world), name  # this rank's partition only
                with gathered([p]):
                    if p.dtype != expected[name].dtype or not torch.equal(p.data, expected[name].data):
                        differ.append(name)
            buffers = dict(reference.named_buffers())
            differ += [n for n, b in model.named_buffers() if not torch.equal(b, buffers[n])]
            report[f"{Path(llm_dir).name}/{dtype}"] = {
                "differ": differ,
                "tied": model.lm_head.weight is model.model.embed_tokens.weight,
                "held": eng.held_parameter_bytes(model),
                "whole": eng.held_parameter_bytes(reference),
                "odd": sum(p.ds_numel % world for p in model.parameters()),
            }
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


@pytest.mark.slow
def test_sliced_partitioned_load_is_bitwise_a_normal_load(tiny_llm_dir, tmp_path):
    """2 gloo processes load the tiny LLaMA and an odd-sized one partitioned (each rank reading only its
    slice of every tensor from the safetensors; transformers' whole-file loader disabled): every parameter,
    gathered, is exactly the plain load's; the tied lm_head stays tied; each rank
    holds half of the parameters."""
    import torch.multiprocessing as mp

    dirs = [str(tiny_llm_dir), str(_odd_llm_dir(tmp_path / "odd"))]
    mp.spawn(_sliced_load_worker, args=(2, dirs, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(report) == 2, sorted(report)
        for key, r in report.items():
            assert r["differ"] == [], (rank, key, r["differ"])
            assert r["tied"], (rank, key)
            n_tensors = 2 * 9 + 2  # 9 tensors a layer, the final norm, the (tied) embedding
            assert r["whole"] / 2 <= r["held"] <= r["whole"] / 2 + 4 * n_tensors, (rank, key, r)
        assert report["odd/float32"]["odd"] > 0  # the padding at the end of a partition is exercised


# ------------------------------------------------------------------- hand-made episodes that differ per rank


def _item(sid, question, answer, ecg, template, qtype="single-query"):
    return {
        "sample_id": sid, "template_id": template, "question_type": qtype, "question": question,
        "answer": answer, "ecg_id": ecg, "class": f"{template}:{', '.join(answer)}", "attribute": [],
    }  # fmt: skip


def _episode(items_support, items_query):
    return {
        "support": items_support,
        "query": items_query,
        "classes": sorted({i["class"] for i in items_support}),
    }


SHORT = ["sinus rhythm"]
LONG = ["left ventricular hypertrophy", "right bundle branch block", "inferior myocardial infarction"]


def rank_episodes() -> tuple[list[list[dict]], list[list[dict]]]:
    """(meta-train episodes, meta-val episodes) per rank. Rank 0: answers of 2-20 tokens (several length
    buckets at ZeRO-0), a comparison episode (two-ECG rows) and option tries of very different sizes
    (several trie passes); rank 1: one-token yes / no answers of single ECGs (one bucket, one trie pass)."""
    q_rhythm, q_codes = "which rhythm does this ecg show?", "which codes does this ecg show?"
    q_compare = "what symptoms of the second ecg are not present in the first ecg?"
    verify = "does this ecg show symptoms of code 1?"

    def query_episode(base):
        support = [
            _item(base + 0, q_rhythm, SHORT, 1, 301), _item(base + 1, q_rhythm, ["atrial fibrillation"], 2, 301),
            _item(base + 2, q_codes, LONG, 3, 302), _item(base + 3, q_codes, ["none"], 4, 302),
        ]  # fmt: skip
        query = [_item(base + 4, q_rhythm, SHORT, 5, 301), _item(base + 5, q_codes, LONG, 6, 302)]
        return _episode(support, query)

    def compare_episode(base):
        qt = "comparison_consecutive-query"
        support = [
            _item(base + 0, q_compare, LONG, [7, 8], 401, qt), _item(base + 1, q_compare, ["none"], [9, 10], 401, qt),
        ]  # fmt: skip
        return _episode(support, [_item(base + 2, q_compare, ["none"], [11, 12], 401, qt)])

    def verify_episode(base):
        qt = "single-verify"
        support = [
            _item(base + 0, verify, ["yes"], 20, 101, qt), _item(base + 1, verify, ["no"], 21, 101, qt),
            _item(base + 2, verify, ["yes"], 22, 101, qt), _item(base + 3, verify, ["no"], 23, 101, qt),
        ]  # fmt: skip
        return _episode(support, [_item(base + 4, verify, ["yes"], 24, 101, qt)])

    train = [[compare_episode(0), query_episode(10)], [verify_episode(20), verify_episode(30)]]
    val = [[query_episode(40), compare_episode(50)], [verify_episode(60), verify_episode(70)]]
    return train, val


def _gradient_loop(config: dict) -> None:
    """One Ray Train worker: this rank's meta-gradient of its own episodes, DeepSpeed's average of the ranks'
    (engine.backward, read before any step), and the meta-val sums with constrained and greedy decoding."""
    cfg = from_dict(config["cfg"])
    import ray.train
    from deepspeed.utils import safe_get_full_grad

    from ecgray.data.shards import ECGStore
    from ecgray.train import engine as eng
    from ecgray.train.loop import FeatureCache, meta_gradient, meta_test_sums

    rank, world, device = eng.worker_setup(cfg, seed=cfg.seed)
    lm, master = eng.worker_model(cfg, device, None, world)
    engine, module = eng.build_engine(master, lm.llm, cfg, world, lm=lm)
    store = ECGStore.open(cfg.data.prepared_dir)  # no features attached: the frozen encoder runs here
    theta = eng.gather_theta(module)
    result = meta_gradient(lm, FeatureCache(lm, store), theta, config["train"][rank], cfg)
    engine.backward(engine(result.grads))
    averaged = {
        k: safe_get_full_grad(p).detach().float().clone() for k, p in module.mapper.named_parameters()
    }
    sums = {"constrained": meta_test_sums(lm, theta, config["val"][rank], store, cfg)}
    lm.cfg = dataclasses.replace(lm.cfg, decoding="greedy")
    sums["greedy"] = meta_test_sums(lm, theta, config["val"][rank], store, cfg)
    out = Path(config["out"])
    save_file(
        {f"local.{k}": v.contiguous() for k, v in result.grads.items()}, str(out / f"local{rank}.safetensors")
    )
    if rank == 0:
        save_file({f"mean.{k}": v.contiguous() for k, v in averaged.items()}, str(out / "mean.safetensors"))
    info = {"sums": sums, "held_bytes": eng.held_parameter_bytes(module), "meta_loss": result.meta_loss}
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    ray.train.report({"done": 1})


def _run_gradients(cfg, tmp: Path) -> dict:
    import ray.cloudpickle

    from ecgray.train.engine import torch_trainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the loop lives in this test module
    train, val = rank_episodes()
    tmp.mkdir(parents=True)
    config = {"cfg": to_dict(cfg), "train": train, "val": val, "out": str(tmp)}
    result = torch_trainer(cfg, _gradient_loop, config, cfg.train.name).fit()
    assert result.error is None, result.error
    out = {"mean": load_file(str(tmp / "mean.safetensors"))}
    for rank in (0, 1):
        out[f"local{rank}"] = load_file(str(tmp / f"local{rank}.safetensors"))
        out[f"rank{rank}"] = json.loads((tmp / f"rank{rank}.json").read_text())
    return out


@pytest.mark.slow
def test_zero3_meta_gradient_and_evaluation_equal_zero0(toy, tiny_llm_dir, tmp_path, ray_session):
    """The same episodes at ZeRO-0 and ZeRO-3, 2 workers, the question-first layout (question KV-cache passes
    too): each rank's meta-gradient, DeepSpeed's average of them and the meta-val sums (constrained and
    greedy decoding) agree, although the ranks' episodes need different numbers of LLM passes."""
    from ecgray.models.ecg_lm import build_model
    from ecgray.train.loop import FeatureCache, task_sets

    common = [
        *zero3_overrides(toy, tiny_llm_dir), "model.prompt_layout=question_first", "meta.tasks_per_step=4",
        "train.num_workers=2", f"train.storage_path={tmp_path}/runs", "eval.curve_stride=1",
        "model.max_answer_tokens=6",
    ]  # fmt: skip
    runs = {
        stage: _run_gradients(
            load_config(None, [*common, f"train.zero_stage={stage}", f"train.name=grad{stage}"]), tmp_path / f"z{stage}"
        )
        for stage in (0, 3)
    }  # fmt: skip

    # the premise: rank 0's episodes take more LLM passes than rank 1's at ZeRO-0 (length buckets of the
    # support and query sets, one- and two-ECG rows) and in option scoring (tries of different sizes)
    from ecgray.data.shards import ECGStore
    from ecgray.eval.meta_test import query_options
    from ecgray.models.ecg_lm import OptionTrie, length_buckets

    cfg = load_config(None, common)
    lm = build_model(cfg, "cpu")
    train, val = rank_episodes()
    cache = FeatureCache(lm, ECGStore.open(toy))
    passes = [sum(len(s.batches) for s in task_sets(lm, cache, eps)) for eps in train]
    assert passes[0] > passes[1] >= 2, passes

    def trie_passes(episode):
        tries = [
            OptionTrie([lm.answer_ids(o) for o in opts]) for opts in query_options(episode, None, "support")
        ]
        return len(length_buckets([t.size for t in tries], ratio=1.5))

    assert trie_passes(val[0][0]) > trie_passes(val[1][0]) == 1

    z0, z3 = runs[0], runs[3]
    tol = rounding_tolerance(z0["mean"].values(), reduction=len(lm.tokenizer))
    for key, grad in z0["mean"].items():
        torch.testing.assert_close(z3["mean"][key], grad, **tol)
    assert max(float(g.abs().max()) for g in z0["mean"].values()) > 0
    for rank in (0, 1):
        local = z0[f"local{rank}"]
        tol = rounding_tolerance(local.values(), reduction=len(lm.tokenizer))
        for key, grad in local.items():
            torch.testing.assert_close(z3[f"local{rank}"][key], grad, **tol)
        # DeepSpeed's average is the two ranks' mean
        for key in local:
            mean = (z0["local0"][key] + z0["local1"][key]) / 2
            torch.testing.assert_close(z0["mean"][key.replace("local.", "mean.")], mean, **tol)
        assert z3[f"rank{rank}"]["meta_loss"] == pytest.approx(z0[f"rank{rank}"]["meta_loss"], rel=1e-5)
        assert z3[f"rank{rank}"]["sums"] == z0[f"rank{rank}"]["sums"]
        assert z0[f"rank{rank}"]["sums"]["constrained"][0] == 2  # both meta-val episodes evaluated

    # ZeRO-3 holds its half of every tensor (the ceiling of an odd count's half: at most 4 bytes per tensor)
    n_tensors = sum(1 for _ in lm.llm.parameters()) + sum(1 for _ in lm.mapper.parameters())
    held0, held3 = z0["rank0"]["held_bytes"], z3["rank0"]["held_bytes"]
    assert held3 <= held0 / 2 + 4 * n_tensors and held3 >= held0 / 2


# ----------------------------------------------------------------------------- `ecgray train` at ZeRO-3


def train_cfg(toy, llm_dir, tmp, name, steps, stage):
    return load_config(
        None,
        zero3_overrides(toy, llm_dir)
        + [
            "meta.tasks_per_step=2", f"meta.outer_steps={steps}", "meta.eval_every=2", "meta.checkpoint_every=2",
            "train.num_workers=2", f"train.zero_stage={stage}", f"train.storage_path={tmp}", f"train.name={name}",
        ],
    )  # fmt: skip


def finished(result):
    from ecgray.models.checkpoint import load_checkpoint

    assert result.error is None, result.error
    state, _ = load_checkpoint(result.checkpoint.path)
    train_state = json.loads((Path(result.checkpoint.path) / "train_state.json").read_text())
    return result.metrics, state, train_state


@pytest.mark.slow
def test_zero3_training_evaluates_and_resumes_like_zero0(toy, tiny_llm_dir, tmp_path, ray_session):
    """`ecgray train` at ZeRO-3: 2 steps (meta-val evaluation at step 2, a checkpoint), then the same run
    continued to 4 steps resumes from that checkpoint (mapper, AdamW moments, step) and ends where an
    uninterrupted ZeRO-0 run of 4 steps ends; the checkpoint holds the mapper and config only."""
    from ecgray.train.meta_train import build_trainer

    first = build_trainer(train_cfg(toy, tiny_llm_dir, tmp_path, "z3", 2, 3)).fit()
    m1, _, t1 = finished(first)
    assert m1["step"] == t1["step"] == 2 and m1["meta_val_episodes"] == 2
    resumed = build_trainer(train_cfg(toy, tiny_llm_dir, tmp_path, "z3", 4, 3)).fit()
    m3, s3, t3 = finished(resumed)
    plain = build_trainer(train_cfg(toy, tiny_llm_dir, tmp_path, "z0", 4, 0)).fit()
    m0, s0, t0 = finished(plain)
    assert t3["step"] == 4 and t3["restarts"] == [2] and t0["restarts"] == []
    assert m3["meta_val_episodes"] == 2
    assert m3["meta_val_token_acc"] == pytest.approx(m0["meta_val_token_acc"], abs=1e-6)
    assert m3["meta_loss"] == pytest.approx(m0["meta_loss"], rel=1e-5)
    assert m3["param_mb_per_worker"] < 0.51 * m0["param_mb_per_worker"]
    for k in s0:
        # Adam divides by sqrt(v): near-zero gradient entries amplify float-order noise (tests/test_train.py)
        torch.testing.assert_close(s3[k], s0[k], rtol=1e-3, atol=1e-4)
    # the same checkpoint at either stage: the mapper's tensors (nothing of the LLM), config, train state
    assert sorted(s3) == sorted(s0)
    names = [sorted(p.name for p in Path(r.checkpoint.path).iterdir()) for r in (resumed, plain)]
    assert names[0] == names[1], names

"""`ecgray align`: items (captions of training ECGs only, eval statements left out, meta-train QA items),
the training loss going down, the job on Ray Train with 2 workers matching one process, and meta-training
starting from the aligned mapper."""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ecgray.config import load_config
from ecgray.train import align as A
from ecgray.train.toy import toy_overrides, write_toy_prepared

CODES = ["1AVB", "IMI", "LVH", "AFIB", "CLBBB"]
"""The statement each toy template asks about (template 100 + t asks about CODES[t])."""
VALID_ECGS = {1, 2, 3}
"""Toy ECGs moved to the prepared `valid` split: never captioned."""


def write_world(out) -> str:
    """The toy prepared data, its questions asking about real statements (by ECG-QA name) and every ECG
    carrying scp_codes: SR, its template's statement and the next template's."""
    out = write_toy_prepared(out)
    names = A.statement_names()
    qa_file = out / "qa" / "part-00000.parquet"
    qa = pq.read_table(qa_file)
    rows = qa.to_pylist()
    template_of = {}
    for row in rows:
        t = row["template_id"] - 100
        name = names[CODES[t]]
        row.update(question=f"Does this ECG show symptoms of {name}?", attribute=[name])
        template_of[row["ecg_id"][0]] = t
    pq.write_table(pa.Table.from_pylist(rows, schema=qa.schema), qa_file)
    for ecg_file in sorted((out / "ecgs").glob("*.parquet")):
        table = pq.read_table(ecg_file)
        ids = table.column("ecg_id").to_pylist()
        meta = [
            json.dumps(
                {
                    "scp_codes": {
                        "SR": 0.0,
                        CODES[template_of[i]]: 100.0,
                        CODES[(template_of[i] + 1) % 5]: 50.0,
                    }
                }
            )
            for i in ids
        ]
        split = ["valid" if i in VALID_ECGS else "train" for i in ids]
        table = table.set_column(table.schema.get_field_index("metadata"), "metadata", pa.array(meta))
        table = table.set_column(table.schema.get_field_index("split"), "split", pa.array(split))
        pq.write_table(table, ecg_file, row_group_size=64)
    return str(out)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from ecgray.data.shards import read_qa

    prepared = write_world(tmp_path_factory.mktemp("align_prepared"))
    cfg = load_config(None, [*toy_overrides(prepared), "align.batch_size=8", "align.lr=0.01"])
    return prepared, cfg, read_qa(prepared)


def test_batches_cover_every_item_each_epoch_and_split_across_workers():
    n, b = 10, 4
    stream = [i for step in range(5) for i in A.batch_positions(n, b, step, seed=3)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != list(range(10))  # shuffled
    assert A.batch_positions(n, b, 2, seed=3) == stream[8:12]  # any step on its own
    batch = A.batch_positions(n, b, 1, seed=3)
    assert A.worker_slice(batch, 0, 2) + A.worker_slice(batch, 1, 2) == batch
    with pytest.raises(ValueError, match=r"align.batch_size=4 is not a multiple of train.num_workers=3"):
        A.worker_slice(batch, 0, 3)


def test_captions_come_from_training_ecgs_and_leave_out_eval_statements(world):
    prepared, cfg, qa = world
    held_out = A.eval_ecg_ids(qa, cfg)
    asked = A.eval_statements(qa, cfg)
    names = A.statement_names()
    eval_names = asked & {names[c] for c in CODES}
    assert held_out and eval_names  # the toy's meta-val / meta-test classes ask about some statements
    for mode in ("exclude_eval", "all"):
        items, summary = A.caption_items(prepared, qa, cfg, mode)
        ids = {i["ecg_id"] for i in items}
        assert items and not ids & held_out and not ids & VALID_ECGS
        assert all(i["question"] == A.CAPTION_QUESTION and i["answer"] == sorted(i["answer"]) for i in items)
        statements = {s for i in items for s in i["answer"]}
        assert "sinus rhythm" in statements
        if mode == "exclude_eval":
            assert not statements & asked, statements & asked
            assert set(summary["caption_excluded_statements"]) == eval_names
        else:
            assert statements & eval_names  # the same ECGs do show them: exclude_eval is what removes them
    assert A.caption_items(prepared, qa, cfg, "none")[0] == []
    # every ECG not held out and of the train split is captioned (each shows SR at least)
    assert len(A.caption_items(prepared, qa, cfg, "all")[0]) == 120 - len(held_out | VALID_ECGS)
    with pytest.raises(ValueError, match=r"captions of ECGs \[\] outside .* and \[\d+\] used by meta-val"):
        A.check_caption_ecgs([{"ecg_id": min(held_out)}], set(range(1, 121)), held_out, "toy")
    with pytest.raises(ValueError, match=r"captions of ECGs \[1\] outside the prepared train split"):
        A.check_caption_ecgs([{"ecg_id": 1}], set(range(4, 121)), held_out, "toy")


def test_verify_captions_ask_about_one_shown_and_one_absent_statement_per_ecg(world):
    prepared, cfg, qa = world
    for mode in ("all", "exclude_eval"):
        captions, _ = A.caption_items(prepared, qa, cfg, mode)
        shown = {c["ecg_id"]: set(c["answer"]) for c in captions}
        vocabulary = set().union(*shown.values())
        items = A.verify_captions(captions, repeats=3, seed=5)
        assert items == A.verify_captions(captions, repeats=3, seed=5)  # seeded
        lacking = sum(bool(vocabulary - statements) for statements in shown.values())
        assert len(items) == 3 * (len(captions) + lacking)  # a `no` item where the ECG lacks a statement
        for item in items:
            statement = item["question"].removeprefix("Does this ECG show ").removesuffix("?")
            assert statement in vocabulary  # never a statement the captions leave out
            assert item["answer"] == (["yes"] if statement in shown[item["ecg_id"]] else ["no"])
        answers = Counter(i["answer"][0] for i in items)
        assert (answers["yes"], answers["no"]) == (3 * len(captions), 3 * lacking)
        if mode == "exclude_eval":
            assert not any(s in i["question"] for i in items for s in A.eval_statements(qa, cfg))
    # the config picks the form; an unknown one is named
    verify = dataclasses.replace(cfg, align=dataclasses.replace(cfg.align, caption_form="verify"))
    items, summary = A.align_items(prepared, qa, verify)
    assert summary["caption_items"] == sum(i["class"] == "caption" for i in items) > 0
    assert {tuple(i["answer"]) for i in items if i["class"] == "caption"} == {("yes",), ("no",)}
    odd = dataclasses.replace(cfg, align=dataclasses.replace(cfg.align, caption_form="prose"))
    with pytest.raises(ValueError, match=r"align.caption_form='prose': expected list or verify"):
        A.align_items(prepared, qa, odd)


def test_qa_items_are_meta_train_samples_only(world):
    from ecgray.data.episodes import EpisodeSampler

    prepared, cfg, qa = world
    items = A.qa_items(qa, cfg)
    eval_classes = set()
    for side in A.EVAL_SIDES:
        sampler = EpisodeSampler(qa, cfg.episodes, side, seed=0)
        eval_classes |= {key for key, _ in sampler.pools["single-verify"]}
    train_pool = EpisodeSampler(qa, cfg.episodes, "meta-train", seed=0).pools["single-verify"]
    assert {i["class"] for i in items} == {key for key, _ in train_pool}
    assert not {i["class"] for i in items} & eval_classes
    assert not {i["ecg_id"] for i in items} & A.eval_ecg_ids(qa, cfg)  # the toy: one ECG per sample
    both, summary = A.align_items(prepared, qa, cfg)
    assert summary["items"] == len(both) == summary["caption_ecgs"] + len(items)
    # captions repeated: each caption k times, the QA items once
    thrice = dataclasses.replace(cfg, align=dataclasses.replace(cfg.align, caption_repeats=3))
    repeated, summary3 = A.align_items(prepared, qa, thrice)
    assert (
        summary3["caption_items"] == 3 * summary["caption_ecgs"]
        and repeated[len(repeated) - len(items) :] == items
    )
    assert Counter(i["ecg_id"] for i in repeated if i["class"] == "caption") == Counter(
        {i["ecg_id"]: 3 for i in both if i["class"] == "caption"}
    )
    off = dataclasses.replace(cfg, align=dataclasses.replace(cfg.align, captions="none", qa_items=False))
    with pytest.raises(ValueError, match="no alignment items"):
        A.align_items(prepared, qa, off)


@pytest.fixture(scope="module")
def model(world):
    from ecgray.models.ecg_lm import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-init encoder warns
        return build_model(world[1], "cpu")


def responsive(model):
    """The model with its frozen LLM re-initialised at unit gain (weights N(0, 1 / fan_in), embeddings
    N(0, 1)): HF's N(0, 0.02) init leaves a 2-layer LLM's logits blind to its inputs (loss ln V whatever
    the prefix), so there would be nothing to align. Seeded; the module is shared, so copy first."""
    import copy

    model = copy.deepcopy(model)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for m in model.llm.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, m.in_features**-0.5)
            elif isinstance(m, torch.nn.Embedding):
                m.weight.normal_(0, 1.0)
    return model


def test_alignment_lowers_the_training_loss(world, model):
    from ecgray.data.shards import ECGStore
    from ecgray.eval import baselines as B
    from ecgray.train.loop import FeatureCache

    prepared, cfg, qa = world
    items, _ = A.align_items(prepared, qa, cfg)
    lm = responsive(model)
    theta = {k: v.detach().clone() for k, v in lm.mapper_params().items()}
    a = cfg.align
    kw = dict(batch_size=a.batch_size, lr=a.lr, weight_decay=0.01, grad_clip=1.0, seed=a.seed)
    params, losses = A.train_mapper(
        lm, theta, items, FeatureCache(lm, ECGStore.open(prepared)), steps=40, **kw
    )
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"align on toy data: loss {first:.3f} (first 5 steps) -> {last:.3f} (last 5 of {len(losses)})")
    assert last < 0.9 * first  # measured: 6.1 -> 5.1
    assert all(torch.equal(v, theta[k]) for k, v in lm.mapper_params().items())  # never written
    # the supervised baseline is this training on the QA items, from a fresh mapper of eval.seed
    sup_cfg = dataclasses.replace(
        cfg, eval=dataclasses.replace(cfg.eval, supervised_steps=2, supervised_batch_size=4)
    )
    store = ECGStore.open(prepared)
    qa_only = A.qa_items(qa, cfg)
    sup, sup_losses = B.train_supervised(model, qa_only, store, sup_cfg)
    ref, ref_losses = A.train_mapper(
        model, B.fresh_mapper_params(model, cfg.eval.seed), qa_only, FeatureCache(model, store), steps=2,
        batch_size=4, lr=cfg.eval.supervised_lr, weight_decay=cfg.meta.weight_decay,
        grad_clip=cfg.meta.grad_clip, seed=cfg.eval.seed,
    )  # fmt: skip
    assert sup_losses == ref_losses and all(torch.equal(sup[k], ref[k]) for k in ref)


def test_meta_training_starts_from_the_align_checkpoint(world, model, tmp_path):
    from ecgray.models.checkpoint import save_checkpoint
    from ecgray.train.meta_train import check_config

    _, cfg, _ = world
    aligned = {k: v.detach() + 0.5 for k, v in model.mapper.state_dict().items()}
    save_checkpoint(tmp_path / "align", aligned, cfg, {"align_loss": 1.0})
    run = dataclasses.replace(cfg, align=dataclasses.replace(cfg.align, checkpoint=str(tmp_path / "align")))
    state = A.initial_mapper_state(run)
    assert set(state) == set(aligned) and all(torch.equal(state[k], aligned[k]) for k in aligned)
    check_config(run)  # the driver accepts it
    assert A.initial_mapper_state(cfg) is None  # unset: the seeded fresh mapper
    other = dataclasses.replace(run, model=dataclasses.replace(run.model, n_prefix=2))
    with pytest.raises(ValueError, match=r"align.checkpoint=.*align: trained with other model.n_prefix"):
        check_config(other)
    other = dataclasses.replace(run, encoder=dataclasses.replace(run.encoder, d_enc=32))
    with pytest.raises(ValueError, match=r"other encoder.d_enc than this run"):
        A.initial_mapper_state(other)


def test_align_command_refuses_a_config_without_steps(world, capsys):
    prepared, _, _ = world
    args = argparse.Namespace(config=None, overrides=[*toy_overrides(prepared)])  # align.steps=0 by default
    assert A.run(args) == 2
    assert "ecgray align: align.steps must be >= 1" in capsys.readouterr().err


def test_align_job_help(capsys):
    from jobs._entry import main

    with pytest.raises(SystemExit) as exit_info:
        main("ecgray.train.align", "jobs.align", "help test", ["--help"])
    assert exit_info.value.code == 0 and "--config" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- on Ray


@pytest.mark.slow
def test_two_worker_alignment_matches_one_process_and_meta_training_starts_from_it(
    world, model, tmp_path, ray_session
):
    from ecgray.data.shards import ECGStore
    from ecgray.models.checkpoint import load_checkpoint
    from ecgray.train.align import build_trainer
    from ecgray.train.loop import FeatureCache
    from ecgray.train.meta_train import build_trainer as meta_trainer

    prepared, _, qa = world
    steps = 4
    overrides = [
        *toy_overrides(prepared), f"train.storage_path={tmp_path}", "train.num_workers=2",
        f"align.steps={steps}", "align.batch_size=8", "align.lr=0.01", "align.checkpoint_every=2",
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    result = build_trainer(cfg).fit()
    assert result.error is None, result.error
    metrics = result.metrics
    state, _ = load_checkpoint(result.checkpoint.path)
    assert metrics["step"] == steps and metrics["align_items"] > metrics["align_qa_items"] > 0
    assert metrics["align_loss_last_10"] > 0 and metrics["align_caption_excluded_statements"]
    assert 0 < metrics["align_blind_loss_floor"] < metrics["align_loss_first_step"]
    # one process, the same items, batches and AdamW: the workers' token-weighted gradient average is
    # the whole batch's gradient
    items, _ = A.align_items(prepared, qa, cfg)
    theta = {k: v.detach().clone() for k, v in model.mapper_params().items()}
    ref, losses = A.train_mapper(
        model, theta, items, FeatureCache(model, ECGStore.open(prepared)), steps=steps, batch_size=8, lr=0.01,
        weight_decay=cfg.meta.weight_decay, grad_clip=cfg.meta.grad_clip, seed=cfg.align.seed,
    )  # fmt: skip
    assert metrics["align_loss"] == pytest.approx(losses[-1], rel=1e-5)
    assert metrics["align_loss_first_step"] == pytest.approx(losses[0], rel=1e-5)
    for k in ref:
        # Adam divides by sqrt(v): near-zero gradient entries amplify float-order noise; lr * steps = 0.04
        torch.testing.assert_close(state[k], ref[k], rtol=1e-3, atol=1e-4)
    # meta-training from it, with a zero meta learning rate: its mapper stays the aligned one
    meta_cfg = load_config(
        None,
        [*toy_overrides(prepared), f"train.storage_path={tmp_path}", "train.name=meta", "meta.outer_steps=1",
         "meta.meta_lr=0.0", f"align.checkpoint={result.checkpoint.path}"],
    )  # fmt: skip
    meta = meta_trainer(meta_cfg).fit()
    assert meta.error is None, meta.error
    meta_state, _ = load_checkpoint(meta.checkpoint.path)
    assert all(torch.equal(meta_state[k], state[k]) for k in state)

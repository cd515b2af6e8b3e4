"""The ECG-language model forward: teacher forcing against a hand-built LLM call, both layouts, the KV cache,
padding invariance, paper_compat, decoding, and a frozen LLM that never receives a gradient. Checkpoints
(round trip, atomic replace, named mismatches) at the end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tolerances import rounding_tolerance

from ecgray.config import Config, ConfigError, EncoderConfig, ModelConfig
from ecgray.models.checkpoint import load_checkpoint, load_mapper_state, load_metrics, save_checkpoint
from ecgray.models.ecg_lm import (
    CACHED_LAYOUTS,
    ECGLanguageModel,
    OptionTrie,
    answer_text,
    length_buckets,
    stack_rows,
)
from ecgray.models.encoder import ECGEncoder
from ecgray.models.fusion import AttentionMapper, build_mapper
from ecgray.models.llm import llm_hidden_size, load_llm

QUESTIONS = [
    "Does this ECG show symptoms of baseline drift?",
    "Which leads show static noise in this ECG?",
    "Does this ECG show symptoms of baseline drift?",
]
ANSWERS = [["yes"], ["v1", "lead i"], ["no"]]
LAYOUTS = ["prefix_first", "question_first", "prefix_last"]
D_ENC = 16


def assert_same_math(actual, expected, reduction: int = 512, reference=None) -> None:
    """actual == expected up to the rounding of a different summation order (`rounding_tolerance`); the
    longest reduction in the tiny LLMs is the LM head's log-softmax over their 512-token vocabulary."""
    tol = rounding_tolerance(expected if reference is None else reference, reduction)
    torch.testing.assert_close(actual, expected, **tol)


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gemma"])
def llm(request):
    return request.param, *load_llm(request.param)


def make_model(llm, layout="prefix_first", **overrides) -> ECGLanguageModel:
    name, model, tokenizer = llm
    cfg = ModelConfig(llm=name, prompt_layout=layout, **overrides)
    torch.manual_seed(0)
    mapper = build_mapper(cfg, D_ENC, llm_hidden_size(model)).eval()
    return ECGLanguageModel(None, mapper, model, tokenizer, cfg)


def tokenizer_split(tok, question: str, answer) -> tuple[list[int], list[int], list[int]]:
    """The tokenizer's own ids of the whole text "Question: {q}Answer: {a}" (BOS first), cut into the
    question part, "Answer:" and the answer (what comes after the ids of "Question: {q}Answer:")."""
    q = question.lower()
    full = tok(f"Question: {q}Answer: {answer_text(answer)}")["input_ids"]
    question_part, prompt = tok(f"Question: {q}")["input_ids"], tok(f"Question: {q}Answer:")["input_ids"]
    assert full[: len(prompt)] == prompt and prompt[: len(question_part)] == question_part
    return question_part, prompt[len(question_part) :], full[len(prompt) :]


def hand_built_nll(m: ECGLanguageModel, prefix, question, answer, layout) -> torch.Tensor:
    """One sample through the plain HF forward, full logits, with the prefix and answer spliced by hand."""
    tok, emb = m.tokenizer, m.llm.get_input_embeddings()
    question_part, wrap, a = tokenizer_split(tok, question, answer)
    bos, q = question_part[:1], question_part[1:]  # the tiny tokenizers prepend BOS
    if layout == "prefix_first":
        before, after = bos, q + wrap + a
    elif layout == "question_first":
        before, after = bos + q, wrap + a
    else:
        before, after = bos + q + wrap, a
    x = torch.cat([emb(torch.tensor([before])), prefix[None], emb(torch.tensor([after]))], 1)
    logits = m.llm(inputs_embeds=x).logits[0].float()
    first = len(before) + prefix.shape[0] + len(after) - len(a) - 1  # predicts the first answer token
    targets = torch.tensor(a + [tok.eos_token_id])
    return F.cross_entropy(logits[first : first + len(targets)], targets, reduction="none")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rows_are_the_tokenizers_own_ids_of_the_whole_text(llm, layout):
    """The prompt ends at "Answer:" and the answer is what the tokenizer makes of " {a}" there: with the
    tiny byte-level BPE (GPT-2 / SmolLM2 convention) `:` `Ġyes`, never `:` `Ġ` `yes`."""
    m = make_model(llm, layout)
    tok = m.tokenizer
    rows, prompts = m.prompt_rows(QUESTIONS, ANSWERS), m.prompt_rows(QUESTIONS, None)
    for i, (question, answer) in enumerate(zip(QUESTIONS, ANSWERS, strict=True)):
        question_part, wrap, a = tokenizer_split(tok, question, answer)
        assert rows.targets[i] == a + [m.eos_id] and m.answer_ids(answer) == a
        prompt = prompts.before[i] + prompts.after[i]
        assert tok.convert_ids_to_tokens(prompt[-1]) == ":"  # no lone space token after it
        assert prompts.before[i] + prompts.after[i] == question_part + wrap
        assert rows.before[i] + rows.after[i] == question_part + wrap + a
        # what comes before the prefix: [BOS] alone, the question, or the question and "Answer:"
        split = {"prefix_first": 1, "question_first": len(question_part), "prefix_last": len(prompt)}[layout]
        assert rows.before[i] == prompt[:split] and prompts.before[i] == prompt[:split]
        # the first target sits right after the prompt: [before ; prefix ; after] is contiguous
        assert rows.target_start[i] == m.cfg.n_prefix + len(prompts.after[i]) - 1
    assert tok.convert_ids_to_tokens(m.answer_ids(["yes"])) == ["Ġyes"]
    assert m.answer_ids(["v1", "lead i"]) == tok(" lead i, v1", add_special_tokens=False)["input_ids"]


def test_prefix_last_caches_answer_wrap_with_the_question(llm):
    """prefix_last moves "Answer:" from the rows' uncached part into the question's KV cache: the same text
    and targets as question_first, len("Answer:" ids) fewer positions run per row past the cache, and the
    first target read at the last prefix position."""
    qf, pl = make_model(llm, "question_first"), make_model(llm, "prefix_last")
    a, b = qf.prompt_rows(QUESTIONS, ANSWERS), pl.prompt_rows(QUESTIONS, ANSWERS)
    for i, question in enumerate(QUESTIONS):
        wrap = tokenizer_split(qf.tokenizer, question, ANSWERS[i])[1]
        assert a.before[i] + a.after[i] == b.before[i] + b.after[i] and a.targets[i] == b.targets[i]
        assert b.before[i] == a.before[i] + wrap and len(b.after[i]) == len(a.after[i]) - len(wrap)
        assert b.target_start[i] == pl.cfg.n_prefix - 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_teacher_forced_loss_equals_hand_built_forward(llm, layout):
    m = make_model(llm, layout)
    prefix = m.fuse(torch.randn(3, D_ENC), None)
    batch = m.collate(m.prompt_rows(QUESTIONS, ANSWERS))
    assert (batch.cache is not None) == (layout in CACHED_LAYOUTS)
    nll = m.token_nll(prefix, batch)
    for i in range(3):
        ref = hand_built_nll(m, prefix[i], QUESTIONS[i], ANSWERS[i], layout)
        assert int(batch.target_mask[i].sum()) == len(ref)
        assert_same_math(nll[i, : len(ref)], ref)
    # answer-position logits == full-sequence logits, gathered
    assert_same_math(m.token_nll(prefix, batch, full_logits=True), nll)


@pytest.mark.parametrize("layout", CACHED_LAYOUTS)
def test_question_cache_equals_full_pass_and_padding_is_invisible(llm, layout):
    m = make_model(llm, layout)
    prefix = m.fuse(torch.randn(3, D_ENC), None)
    rows = m.prompt_rows(QUESTIONS, ANSWERS)
    cached = m.token_nll(prefix, m.collate(rows))
    full = m.token_nll(prefix, m.collate(rows, use_cache=False))
    assert_same_math(cached, full)
    for i in range(3):  # a padded row computes what it computes alone
        alone = m.token_nll(prefix[i : i + 1], m.collate(rows.select([i])))
        assert_same_math(alone[0], cached[i, : alone.shape[1]])
    # the distinct questions are run once: rows 0 and 2 share their cached keys
    k = m.collate(rows).cache[0][0]
    assert torch.equal(k[0], k[2]) and not torch.equal(k[0], k[1])


def test_paper_compat_reads_the_answer_over_the_question(llm):
    m = make_model(llm, paper_compat=True)
    tok = m.tokenizer
    prefix = m.fuse(torch.randn(3, D_ENC), None)
    batch = m.collate(m.prompt_rows(QUESTIONS, ANSWERS))
    assert batch.after_ids.shape[1] == 30 and batch.before_ids.shape[1] == 0
    nll = m.token_nll(prefix, batch)
    for i in range(3):
        prompt = tok(f"Question: {QUESTIONS[i].lower()}Answer: ")["input_ids"][:30]
        x = torch.cat([prefix[i][None], m.llm.get_input_embeddings()(torch.tensor([prompt]))], 1)
        logits = m.llm(inputs_embeds=x).logits[0].float()
        target = tok(answer_text(ANSWERS[i]))["input_ids"]  # BOS included: the quirk
        assert target[0] == tok.bos_token_id
        p = m.cfg.n_prefix
        ref = F.cross_entropy(logits[p - 1 : p - 1 + len(target)], torch.tensor(target), reduction="none")
        assert_same_math(nll[i, : len(target)], ref)
    pred = m.target_predictions(prefix, batch)
    assert ((pred >= 0) == batch.target_mask).all()
    with pytest.raises(ValueError, match="prefix_first"):
        make_model(llm, "question_first", paper_compat=True)


def test_llm_is_frozen_and_gets_no_gradient(llm):
    m = make_model(llm, "question_first")
    before = {k: v.clone() for k, v in m.llm.state_dict().items()}
    tasks = [m.task_data(torch.randn(3, D_ENC), None, QUESTIONS, ANSWERS)]
    loss = m.task_losses([m.mapper_params()], tasks).sum()
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in m.llm.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.mapper.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.llm.state_dict().items())
    m.train()
    assert m.mapper.training and not m.llm.training


def test_task_losses_are_per_task_token_means(llm):
    m = make_model(llm, "question_first")
    t1 = m.task_data(torch.randn(3, D_ENC), None, QUESTIONS, ANSWERS)
    t2 = m.task_data(torch.randn(2, D_ENC), None, QUESTIONS[:2], [["no"], ["v2"]])
    w = m.mapper_params()
    w2 = {k: v + 0.01 * torch.randn_like(v) for k, v in w.items()}
    both = m.task_losses([w, w2], [t1, t2])
    assert_same_math(both[0], m.task_losses([w], [t1])[0])
    assert_same_math(both[1], m.task_losses([w2], [t2])[0])
    batch = m.collate(t1.rows)
    nll = m.token_nll(m.fuse(t1.pooled, None), batch)
    assert_same_math(both[0], nll.sum() / batch.target_mask.sum())


def test_weighted_distinct_rows_give_the_loss_and_gradient_of_every_row(llm):
    """A set whose rows cannot differ beyond their prompts (an all-zero ECG, ecg_free) runs one row per
    distinct prompt with its count as weight: the task's mean loss and its gradient are the full set's."""
    m = make_model(llm, "question_first")
    zeros = torch.zeros(5, D_ENC)
    questions = [QUESTIONS[0], QUESTIONS[1], QUESTIONS[0], QUESTIONS[0], QUESTIONS[1]]
    answers = [["yes"], ["v1", "lead i"], ["yes"], ["no"], ["lead i", "v1"]]
    full = m.task_data(zeros, None, questions, answers)
    distinct = m.task_data(
        zeros[:3], None, [QUESTIONS[0], QUESTIONS[1], QUESTIONS[0]], [["yes"], ["v1", "lead i"], ["no"]]
    )
    distinct.weights = [2, 2, 1]
    other = m.task_data(torch.randn(2, D_ENC), None, QUESTIONS[:2], [["no"], ["v2"]])  # unweighted beside it
    w = {k: v.detach().clone().requires_grad_() for k, v in m.mapper_params().items()}
    expected = m.task_losses([w, w], [full, other])
    actual = m.task_losses([w, w], [distinct, other])
    assert_same_math(actual, expected)
    assert torch.equal(actual[1], expected[1])  # a task without weights is computed exactly as before
    g_full = torch.autograd.grad(expected[0], list(w.values()))
    g_distinct = torch.autograd.grad(actual[0], list(w.values()))
    for a, e in zip(g_distinct, g_full, strict=True):
        assert_same_math(a, e, reference=g_full)


def test_length_buckets_split_where_rows_grow_past_the_ratio():
    assert length_buckets([3, 10, 4, 45, 7]) == [[0, 2], [4, 1], [3]]
    assert length_buckets([5, 5, 5]) == [[0, 1, 2]]
    assert length_buckets([]) == []


@pytest.mark.parametrize("layout", LAYOUTS)
def test_length_buckets_give_the_loss_and_gradient_of_one_padded_batch(llm, layout):
    m = make_model(llm, layout)
    long = [
        "lead i",
        "lead ii",
        "lead iii",
        "lead avr",
        "lead avl",
        "lead avf",
        "lead v1",
        "lead v2",
        "lead v3",
    ]
    t1 = m.task_data(torch.randn(3, D_ENC), None, QUESTIONS, [["yes"], long, ["no"]])
    t2 = m.task_data(torch.randn(3, D_ENC), None, QUESTIONS, [long[:3], ["none"], long])
    task_set = m.task_set([t1, t2])
    assert len(task_set.batches) >= 2  # short and long answers went to different buckets
    assert sorted(i for index, _ in task_set.batches for i in index) == list(range(6))
    w1 = {k: v.clone().requires_grad_(True) for k, v in m.mapper_params().items()}
    w2 = {k: (v + 0.01 * torch.randn_like(v)).requires_grad_(True) for k, v in m.mapper_params().items()}
    bucketed = m.task_losses([w1, w2], [t1, t2], task_set.batches)
    g_bucketed = torch.autograd.grad(bucketed.sum(), [*w1.values(), *w2.values()])
    # the reference: every row in one batch padded to the longest answer
    one = m.collate(stack_rows([t1, t2]))
    nll = m.token_nll(torch.cat([m.fuse(t1.pooled, None, w1), m.fuse(t2.pooled, None, w2)]), one)
    reference = torch.stack(
        [nll[:3].sum() / one.target_mask[:3].sum(), nll[3:].sum() / one.target_mask[3:].sum()]
    )
    g_reference = torch.autograd.grad(reference.sum(), [*w1.values(), *w2.values()])
    assert_same_math(bucketed, reference)
    for a, b in zip(g_bucketed, g_reference, strict=True):
        # at the scale of the whole gradient: the mapper's key bias shifts every attention score of a query
        # alike, so the softmax cancels its gradient to ~1e-11 of pure rounding
        assert_same_math(a, b, reference=g_reference)


def test_option_trie_shares_leading_tokens():
    t = OptionTrie([[7, 8, 9], [7, 8], [7, 5], [4], [7, 8, 9]])
    assert t.size == 5 and t.token == [7, 8, 9, 5, 4] and t.parent == [-1, 0, 1, 0, -1]
    assert t.depth == [0, 1, 2, 1, 0]
    assert t.paths == [[0, 1, 2], [0, 1, -1], [0, 3, -1], [4, -1, -1], [0, 1, 2]]
    assert t.ends == [2, 1, 3, 4, 2]  # "7 8" ends inside "7 8 9"; a repeated option shares its nodes
    assert [n for n in range(5) if t.ancestry[2][n]] == [0, 1, 2]
    assert [n for n in range(5) if t.ancestry[3][n]] == [0, 3] and t.ancestry[4] == [False] * 4 + [True]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_picks_the_argmax_and_options_score_their_tokens(llm, layout):
    m = make_model(llm, layout)
    prefix = m.fuse(torch.randn(3, D_ENC), None)
    generated = m.greedy_ids(prefix, QUESTIONS, max_new_tokens=3)
    texts = m.greedy(prefix, QUESTIONS, max_new_tokens=3)
    # answers start with their space token (" yes"): the decoded text is stripped of it
    assert texts == [m.tokenizer.decode(g, skip_special_tokens=True).strip() for g in generated]
    for i, ids in enumerate(generated):
        rows = m.prompt_rows([QUESTIONS[i]], [ids + [m.eos_id]], eos=False)
        pred = m.target_predictions(prefix[i : i + 1], m.collate(rows))[0].tolist()
        if ids:  # every generated token is the argmax at its position
            assert pred[: len(ids)] == ids
        if len(ids) < 3:  # it stopped: EOS was the argmax
            assert pred[len(ids)] == m.eos_id
    # options of different token lengths sharing leading tokens, one a prefix of another (EOS scored inside
    # the trie), passes of one sample and of all: every score equals the teacher-forced log-likelihood of
    # that option (+ EOS) on the full prompt
    options = [
        ["yes", "no"],
        ["v1", "lead i, v1", "none", "lead i, lead ii, v1, v2", "lead i", "lead i, lead ii"],
        ["yes", "no", "not sure", "not"],
    ]
    for chunk in (1, 8, 1024):  # tries of one option each, samples split into several tries, all in one
        scores = m.score_options(prefix, QUESTIONS, options, chunk=chunk)
        assert [s.shape[0] for s in scores] == [2, 6, 4]
        for i, opts in enumerate(options):
            for j, option in enumerate(opts):
                nll = m.token_nll(prefix[[i]], m.collate(m.prompt_rows([QUESTIONS[i]], [option])))
                assert_same_math(scores[i][j], -nll.sum())


def test_option_longer_than_the_sliding_window_is_named():
    m = make_model(("tiny-gemma", *load_llm("tiny-gemma")))  # sliding window 64
    prefix = m.fuse(torch.randn(1, D_ENC), None)
    assert m.score_options(prefix, QUESTIONS[:1], [["lead i, lead ii", "none"]])[0].shape == (2,)
    with pytest.raises(ValueError, match=r"option \(\d+ tokens\) do not fit the LLM's sliding window \(64\)"):
        m.score_options(prefix, QUESTIONS[:1], [["lead i, " * 20, "none"]])


def test_encoder_to_loss_end_to_end():
    name, model, tokenizer = "tiny-llama", *load_llm("tiny-llama")
    enc_cfg = EncoderConfig(d_enc=32, n_layers=1, n_heads=2, patch=25)
    torch.manual_seed(0)
    encoder = ECGEncoder(enc_cfg)
    cfg = ModelConfig(llm=name, mapper="qformer", qformer_width=32, qformer_layers=1)
    m = ECGLanguageModel(encoder, build_mapper(cfg, 32, llm_hidden_size(model)), model, tokenizer, cfg)
    tokens, pooled = m.encode(torch.randn(3, 12, 500))
    assert not pooled.requires_grad and not any(p.requires_grad for p in encoder.parameters())
    loss = m.task_losses([m.mapper_params()], [m.task_data(pooled, tokens, QUESTIONS, ANSWERS)])
    assert loss.shape == (1,) and torch.isfinite(loss).all()


def test_bad_prefix_shape_is_named(llm):
    m = make_model(llm)
    batch = m.collate(m.prompt_rows(QUESTIONS, ANSWERS))
    with pytest.raises(ValueError, match="does not fit the prompt batch"):
        m.token_nll(torch.randn(2, 4, m.d_llm), batch)
    with pytest.raises(ValueError, match="3 ECG vectors but 2 questions"):
        m.task_data(torch.randn(3, D_ENC), None, QUESTIONS[:2], ANSWERS[:2])


# ---------------------------------------------------------------------------------------- checkpoints


def test_round_trip_and_replace(tmp_path):
    torch.manual_seed(0)
    cfg = Config(seed=3, model=ModelConfig(mapper="attention", n_prefix=2))
    mapper = build_mapper(cfg.model, 8, 16)
    out = save_checkpoint(tmp_path / "ckpt", mapper.state_dict(), cfg, {"step": 100, "loss": 0.5})
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "mapper.safetensors", "metrics.json"]
    state, loaded = load_checkpoint(out)
    assert loaded == cfg and isinstance(loaded, Config)
    fresh = build_mapper(loaded.model, 8, 16)
    load_mapper_state(fresh, state)
    for k, v in mapper.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    assert load_metrics(out) == {"step": 100, "loss": 0.5}
    # replacing: the new one wins, no temp / old dirs are left behind
    save_checkpoint(out, {k: v * 0 for k, v in mapper.state_dict().items()}, cfg, {"step": 200})
    assert json.loads((out / "metrics.json").read_text()) == {"step": 200}
    assert load_checkpoint(out)[0]["prefix"].abs().sum() == 0
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    cfg = Config()
    save_checkpoint(tmp_path / "c", {"w": torch.ones(2)}, cfg, {"step": 1})
    with pytest.raises(TypeError, match="not tensors"):
        save_checkpoint(tmp_path / "c", {"w": [1.0, 2.0]}, cfg, {"step": 2})
    assert load_metrics(tmp_path / "c") == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_mismatches_are_named(tmp_path):
    cfg = Config()
    mapper = AttentionMapper(8, 16)
    save_checkpoint(tmp_path / "c", mapper.state_dict(), cfg)
    state, _ = load_checkpoint(tmp_path / "c")
    with pytest.raises(ValueError, match=r"shape mismatch \[.ff.bias: checkpoint \(16,\) vs model \(32,\)"):
        load_mapper_state(AttentionMapper(8, 32), state)
    with pytest.raises(ValueError, match="missing"):
        load_mapper_state(build_mapper(ModelConfig(mapper="mlp", mlp_hidden=4), 8, 16), state)
    (tmp_path / "c" / "config.yaml").write_text("model:\n  mapper: transformer\n")
    with pytest.raises(ConfigError, match="model.mapper"):
        load_checkpoint(tmp_path / "c")
    (tmp_path / "c" / "mapper.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="mapper.safetensors is missing"):
        load_checkpoint(tmp_path / "c")


# ------------------------------------------------------------------------ two ECGs (comparison questions)

# Single-ECG outputs of the code before two-ECG samples existed (the same tiny models, mapper seed 0,
# inputs from torch.Generator seed 1): prompt-row hash, the two task losses of `test_...pinned...`, option
# scores, greedy ids. Two-ECG support must leave every one of them as it was.
PINNED = {
    "tiny-llama/prefix_first/attention": ("29773f66f13cddca", [6.27785, 6.23619], [[-12.4625, -12.7529], [-18.4366, -37.5668, -18.7762, -18.5949], [-12.4555, -12.7492, -18.7073]], [[28, 28, 28], [28, 28, 28], [28, 28, 28]]),
    "tiny-llama/prefix_first/mlp": ("29773f66f13cddca", [6.27798, 6.23402], [[-12.4462, -12.7414], [-18.4383, -37.5747, -18.798, -18.6067], [-12.4727, -12.7589, -18.733]], [[28, 28, 28], [28, 28, 28], [28, 28, 28]]),
    "tiny-llama/prefix_first/qformer": ("29773f66f13cddca", [6.28542, 6.24204], [[-12.4955, -12.7754], [-18.3986, -37.5614, -18.8112, -18.6149], [-12.5273, -12.7973, -18.7544]], [[28, 28, 28], [28, 28, 28], [28, 28, 28]]),
    "tiny-llama/question_first/attention": ("e6eaa2650ac315df", [6.27506, 6.23407], [[-12.4542, -12.751], [-18.4296, -37.5493, -18.775, -18.591], [-12.4478, -12.7472, -18.7087]], [[28, 28, 28], [28, 28, 28], [28, 28, 28]]),
    "tiny-llama/question_first/mlp": ("e6eaa2650ac315df", [6.27494, 6.23124], [[-12.4449, -12.7425], [-18.4292, -37.5588, -18.7913, -18.6053], [-12.4643, -12.7456, -18.724]], [[28, 28, 28], [28, 28, 28], [28, 28, 28]]),
    "tiny-llama/question_first/qformer": ("e6eaa2650ac315df", [6.28422, 6.23803], [[-12.4861, -12.7653], [-18.4041, -37.5747, -18.8055, -18.6193], [-12.5079, -12.7814, -18.7497]], [[28, 28, 28], [28, 28, 28], [28, 28, 28]]),
    "tiny-gemma/prefix_first/attention": ("29773f66f13cddca", [6.36087, 6.37837], [[-12.9197, -12.8211], [-19.0762, -37.8542, -19.2368, -19.0941], [-12.9667, -12.8349, -18.7707]], [[83, 50, 50], [7, 7, 7], [324, 324, 324]]),
    "tiny-gemma/prefix_first/mlp": ("29773f66f13cddca", [6.31506, 6.41191], [[-12.945, -13.1201], [-18.8359, -37.4668, -18.9458, -18.6896], [-12.8072, -12.7388, -18.7182]], [[268, 268, 268], [10, 10, 10], [83, 83, 83]]),
    "tiny-gemma/prefix_first/qformer": ("29773f66f13cddca", [6.277, 6.31246], [[-12.6953, -12.7554], [-18.6713, -37.2954, -18.6722, -18.7279], [-12.6109, -12.7793, -18.5768]], [[9, 9, 9], [196, 196, 196], [148, 148, 148]]),
    "tiny-gemma/question_first/attention": ("e6eaa2650ac315df", [6.36625, 6.39771], [[-12.9872, -12.9099], [-19.0794, -37.7878, -19.1949, -19.0469], [-13.0058, -12.8875, -18.7847]], [[268, 268, 268], [7, 7, 10], [189, 189, 189]]),
    "tiny-gemma/question_first/mlp": ("e6eaa2650ac315df", [6.3066, 6.3807], [[-12.8531, -12.9552], [-18.8912, -37.4435, -18.8902, -18.7217], [-12.8431, -12.7694, -18.7198]], [[83, 83, 83], [107, 190, 452], [83, 83, 83]]),
    "tiny-gemma/question_first/qformer": ("e6eaa2650ac315df", [6.2966, 6.36889], [[-12.8102, -12.939], [-18.8356, -37.2921, -18.8255, -18.8883], [-12.7844, -12.8638, -18.7003]], [[83, 83, 83], [83, 83, 83], [83, 83, 83]]),
}  # fmt: skip
PINNED_PAPER_ROWS = "92ad9805ba304213"
OPTIONS = [["yes", "no"], ["v1", "lead i, v1", "none", "lead i"], ["yes", "no", "not sure"]]
MAPPER_KW = {"mlp_hidden": 32, "qformer_width": 32, "qformer_layers": 1}


def rows_hash(rows) -> str:
    import hashlib

    payload = json.dumps([rows.before, rows.after, rows.target_start, rows.targets]).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def mapped_model(llm, layout="prefix_first", mapper="attention", **overrides) -> ECGLanguageModel:
    name, model, tokenizer = llm
    cfg = ModelConfig(llm=name, prompt_layout=layout, mapper=mapper, **MAPPER_KW, **overrides)
    torch.manual_seed(0)
    return ECGLanguageModel(
        None, build_mapper(cfg, D_ENC, llm_hidden_size(model)).eval(), model, tokenizer, cfg
    )


@pytest.mark.parametrize("layout", ["prefix_first", "question_first"])
@pytest.mark.parametrize("mapper", ["attention", "mlp", "qformer"])
def test_single_ecg_outputs_are_pinned_from_before_two_ecg_support(llm, layout, mapper):
    m = mapped_model(llm, layout, mapper)
    rows_key, losses_0, scores_0, greedy_0 = PINNED[f"{llm[0]}/{layout}/{mapper}"]
    g = torch.Generator().manual_seed(1)
    pooled = torch.randn(3, D_ENC, generator=g)
    tokens = torch.randn(3, 5, D_ENC, generator=g) if mapper == "qformer" else None
    assert rows_hash(m.prompt_rows(QUESTIONS, ANSWERS)) == rows_key
    t1 = m.task_data(pooled, tokens, QUESTIONS, ANSWERS)
    t2 = m.task_data(
        pooled[:2] * 0.5, None if tokens is None else tokens[:2], QUESTIONS[:2], [["no"], ["v2"]]
    )
    w = m.mapper_params()
    w2 = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in w.items()}
    with torch.no_grad():
        losses = m.task_losses([w, w2], [t1, t2])
        prefix = m.fuse(pooled, tokens)
        scores = m.score_options(prefix, QUESTIONS, OPTIONS)
        greedy = m.greedy_ids(prefix, QUESTIONS, max_new_tokens=3)
    # pinned on one CPU to 6 significant digits (losses < 10: 5e-6; scores > -100: 5e-5); another CPU
    # differs by the rounding of its sums, the longest the vocabulary's log-softmax
    assert losses.tolist() == pytest.approx(losses_0, abs=5e-6 + rounding_tolerance(losses, 512)["atol"])
    for s, s0 in zip(scores, scores_0, strict=True):
        assert s.tolist() == pytest.approx(s0, abs=5e-5 + rounding_tolerance(s, 512)["atol"])
    assert greedy == greedy_0
    paper = mapped_model(llm, paper_compat=True)
    assert rows_hash(paper.prompt_rows(QUESTIONS, ANSWERS)) == PINNED_PAPER_ROWS


def two_ecg_prefix_by_hand(m: ECGLanguageModel, pooled, tokens=None, params=None) -> torch.Tensor:
    """[emb("First ECG:") ; mapper(ECG 1) ; emb("Second ECG:") ; mapper(ECG 2)] for (B, 2, D_enc) inputs."""
    from ecgray.models.ecg_lm import ECG_MARKERS

    emb = m.llm.get_input_embeddings()
    parts = []
    for j, marker in enumerate(ECG_MARKERS):
        ids = torch.tensor(m.tokenizer(marker, add_special_tokens=False)["input_ids"])
        one = m.fuse(pooled[:, j], None if tokens is None else tokens[:, j], params)  # (B, n_prefix, D_llm)
        parts += [emb(ids)[None].expand(pooled.shape[0], -1, -1), one]
    return torch.cat(parts, 1)


@pytest.mark.parametrize("mapper", ["attention", "mlp", "qformer"])
def test_two_ecg_prefix_is_both_ecgs_in_order_after_their_markers(llm, mapper):
    m = mapped_model(llm, mapper=mapper)
    pooled = torch.randn(3, 2, D_ENC)
    tokens = torch.randn(3, 2, 5, D_ENC) if mapper == "qformer" else None
    prefix = m.fuse(pooled, tokens)
    width = 2 * m.cfg.n_prefix + sum(
        len(m.tokenizer(s, add_special_tokens=False)["input_ids"]) for s in ("First ECG:", "Second ECG:")
    )
    assert prefix.shape == (3, width, m.d_llm) and m.prefix_width(2) == width and m.n_ecg_of(prefix) == 2
    by_hand = two_ecg_prefix_by_hand(m, pooled, tokens)
    # the two ECGs run as one batch of 2B rows: equal up to the rounding of another batch size
    assert_same_math(prefix, by_hand, reduction=max(D_ENC, MAPPER_KW["mlp_hidden"], m.d_llm))
    marker_rows = torch.ones(width, dtype=torch.bool)
    n, first = m.cfg.n_prefix, len(m.tokenizer("First ECG:", add_special_tokens=False)["input_ids"])
    marker_rows[first : first + n] = False
    marker_rows[-n:] = False
    assert torch.equal(prefix[:, marker_rows], by_hand[:, marker_rows])  # the markers: the LLM's embeddings
    assert m.n_ecg_of(m.fuse(pooled[:, 0], None if tokens is None else tokens[:, 0])) == 1
    with pytest.raises(ValueError, match="one or two ECGs per sample, got 3"):
        m.fuse(torch.randn(3, 3, D_ENC), None)
    with pytest.raises(ValueError, match="neither one ECG's"):
        m.n_ecg_of(torch.randn(3, 5, m.d_llm))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_ecg_rows_keep_the_text_and_move_the_target_past_the_wider_slot(llm, layout):
    m = make_model(llm, layout)
    one, two = m.prompt_rows(QUESTIONS, ANSWERS), m.prompt_rows(QUESTIONS, ANSWERS, n_ecg=2)
    assert (two.before, two.after, two.targets) == (one.before, one.after, one.targets)
    assert two.n_ecg == [2, 2, 2] and one.n_ecg == [1, 1, 1]
    shift = m.prefix_width(2) - m.cfg.n_prefix
    assert two.target_start == [t + shift for t in one.target_start]
    assert m.prompt_rows(QUESTIONS, ANSWERS, n_ecg=[1, 2, 1]).n_ecg == [1, 2, 1]
    with pytest.raises(ValueError, match=r"rows of \[1, 2\] ECGs in one batch"):
        m.collate(one + two)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_ecg_teacher_forcing_equals_hand_built_forward(llm, layout):
    """The markers and both prefixes spliced by hand into the plain HF forward, in both layouts; with
    question_first the question's KV cache gives the same as running it."""
    m = make_model(llm, layout)
    pooled = torch.randn(3, 2, D_ENC)
    prefix, by_hand = m.fuse(pooled, None), two_ecg_prefix_by_hand(m, pooled)
    rows = m.prompt_rows(QUESTIONS, ANSWERS, n_ecg=2)
    batch = m.collate(rows)
    assert (batch.cache is not None) == (layout in CACHED_LAYOUTS) and batch.n_ecg == 2
    nll = m.token_nll(prefix, batch)
    for i in range(3):
        ref = hand_built_nll(m, by_hand[i], QUESTIONS[i], ANSWERS[i], layout)
        assert int(batch.target_mask[i].sum()) == len(ref)
        assert_same_math(nll[i, : len(ref)], ref)
    assert_same_math(m.token_nll(prefix, m.collate(rows, use_cache=False)), nll)
    with pytest.raises(ValueError, match="prefix has 4 positions"):
        m.token_nll(prefix[:, :4], batch)


@pytest.mark.parametrize("mapper", ["attention", "mlp", "qformer"])
def test_gradient_reaches_the_mapper_through_both_prefixes(llm, mapper):
    """The loss of a two-ECG task moves with the second ECG as with the first, and the mapper's
    parameters get gradient through the second ECG's prefix alone (the first one's mapping detached)."""
    m = mapped_model(llm, "question_first", mapper)
    g = torch.Generator().manual_seed(2)
    pooled = torch.randn(3, 2, D_ENC, generator=g)
    tokens = torch.randn(3, 2, 5, D_ENC, generator=g) if mapper == "qformer" else None
    w = {k: v.clone().requires_grad_() for k, v in m.mapper_params().items()}
    task = m.task_data(pooled, tokens, QUESTIONS, ANSWERS)
    loss = m.task_losses([w], [task])[0]
    for j in (0, 1):  # perturbing either ECG changes the loss
        moved = pooled.clone()
        moved[:, j] += torch.randn(3, D_ENC, generator=g)
        with torch.no_grad():
            assert (
                abs(float(m.task_losses([w], [m.task_data(moved, tokens, QUESTIONS, ANSWERS)])[0] - loss))
                > 1e-6
            )
    grads = torch.autograd.grad(loss, list(w.values()))
    assert all(gr.abs().sum() > 0 for gr in grads)
    # through the second prefix only: ECG 1 mapped with detached weights, ECG 2 with the live ones
    frozen = {k: v.detach() for k, v in w.items()}
    first = m.fuse(pooled[:, 0], None if tokens is None else tokens[:, 0], frozen)
    second = m.fuse(pooled[:, 1], None if tokens is None else tokens[:, 1], w)
    prefix = m.splice_ecgs(torch.stack([first, second], 1))
    nll = m.token_nll(prefix, m.collate(m.prompt_rows(QUESTIONS, ANSWERS, n_ecg=2)))
    via_second = torch.autograd.grad(nll.sum(), list(w.values()))
    assert all(gr.abs().sum() > 0 for gr in via_second)
    assert all(p.grad is None for p in m.llm.parameters())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_and_two_ecg_tasks_in_one_pass_give_their_own_losses(llm, layout):
    m = make_model(llm, layout)
    single = m.task_data(torch.randn(3, D_ENC), None, QUESTIONS, ANSWERS)
    pair = m.task_data(torch.randn(2, 2, D_ENC), None, QUESTIONS[:2], [["no"], ["v2"]])
    assert pair.rows.n_ecg == [2, 2]
    task_set = m.task_set([single, pair])
    assert {b.n_ecg for _, b in task_set.batches} == {1, 2}
    assert all(len({[1, 1, 1, 2, 2][i] for i in index}) == 1 for index, _ in task_set.batches)
    w = m.mapper_params()
    w2 = {k: v + 0.01 * torch.randn_like(v) for k, v in w.items()}
    both = m.task_losses([w, w2], [single, pair], task_set.batches)
    assert_same_math(both[0], m.task_losses([w], [single])[0])
    assert_same_math(both[1], m.task_losses([w2], [pair])[0])
    assert torch.equal(
        m.task_losses([w], [single])[0], m.task_losses([w], [single], m.task_set([single]).batches)[0]
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_ecg_greedy_picks_the_argmax_and_options_score_their_tokens(llm, layout):
    m = make_model(llm, layout)
    prefix = m.fuse(torch.randn(3, 2, D_ENC), None)
    generated = m.greedy_ids(prefix, QUESTIONS, max_new_tokens=3)
    for i, ids in enumerate(generated):
        rows = m.prompt_rows([QUESTIONS[i]], [ids + [m.eos_id]], eos=False, n_ecg=2)
        pred = m.target_predictions(prefix[i : i + 1], m.collate(rows))[0].tolist()
        if ids:
            assert pred[: len(ids)] == ids
        if len(ids) < 3:
            assert pred[len(ids)] == m.eos_id
    scores = m.score_options(prefix, QUESTIONS, OPTIONS)
    for i, opts in enumerate(OPTIONS):
        for j, option in enumerate(opts):
            nll = m.token_nll(prefix[[i]], m.collate(m.prompt_rows([QUESTIONS[i]], [option], n_ecg=2)))
            assert_same_math(scores[i][j], -nll.sum())


def test_paper_compat_refuses_two_ecg_samples(llm):
    from ecgray.models.ecg_lm import check_question_types_fit_model

    m = make_model(llm, paper_compat=True)
    with pytest.raises(ValueError, match="paper_compat reproduces the official single-ECG prompt"):
        m.prompt_rows(QUESTIONS, ANSWERS, n_ecg=2)
    with pytest.raises(ValueError, match="paper_compat reproduces the official single-ECG prompt"):
        m.task_data(torch.randn(3, 2, D_ENC), None, QUESTIONS, ANSWERS)
    cfg = Config(model=ModelConfig(paper_compat=True))
    check_question_types_fit_model(cfg)  # single-verify: fine
    cfg.episodes.question_type = "comparison_irrelevant-query"
    with pytest.raises(ValueError, match=r"paper_compat=True .* \['comparison_irrelevant-query'\]"):
        check_question_types_fit_model(cfg)

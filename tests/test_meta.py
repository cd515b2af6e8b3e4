"""Meta-gradients pinned against closed forms and finite differences; task batching == sequential;
the reference engine == FOMAML; determinism; the outer optimiser step."""

from __future__ import annotations

import pytest
import torch
from tolerances import rounding_tolerance

from ecgray.config import MetaConfig, ModelConfig
from ecgray.meta import (
    adapt,
    apply_meta_gradient,
    make_meta_optimizer,
    meta_lr_at,
    meta_step,
    reference_meta_step,
    run_meta_step,
    set_lr,
)
from ecgray.models.ecg_lm import ECGLanguageModel
from ecgray.models.fusion import build_mapper
from ecgray.models.llm import llm_hidden_size, load_llm

DT = torch.float64


def quadratic(fast, data):
    """0.5 (w - c)^T A (w - c) per task; data = list of (A, c), one per task."""

    def one(p, a, c):
        d = p["w"] - c
        return 0.5 * d @ a @ d

    if isinstance(fast, dict):
        return one(fast, *data[0])
    return torch.stack([one(p, *d) for p, d in zip(fast, data, strict=True)])


def spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=DT)
    return m @ m.T / n + 0.5 * torch.eye(n, dtype=DT)


def test_fomaml_and_maml_match_the_closed_form():
    n, lr, steps, q_from = 4, 0.1, 6, 2
    a, b = spd(n, 1), spd(n, 2)
    ca, cb = torch.randn(n, dtype=DT), torch.randn(n, dtype=DT)
    w0 = torch.randn(n, dtype=DT, requires_grad=True)
    # SGD on the support quadratic: w_t - ca = (I - lr A)^t (w0 - ca)
    step_m = torch.eye(n, dtype=DT) - lr * a
    ws = [ca + torch.linalg.matrix_power(step_m, t) @ (w0.detach() - ca) for t in range(steps + 1)]
    ts = range(q_from, steps + 1)
    fomaml = torch.stack([b @ (ws[t] - cb) for t in ts]).mean(0)
    maml = torch.stack([torch.linalg.matrix_power(step_m, t) @ b @ (ws[t] - cb) for t in ts]).mean(0)
    assert not torch.allclose(fomaml, maml, atol=1e-3)  # the two really differ here

    for first_order, expected in [(True, fomaml), (False, maml)]:
        out = meta_step(quadratic, {"w": w0}, [(a, ca)], [(b, cb)], 1, steps, lr, q_from, first_order)
        torch.testing.assert_close(out.grads["w"], expected, rtol=1e-10, atol=1e-10)
        assert out.query_losses.shape == (steps - q_from + 1, 1) and out.support_losses.shape == (steps, 1)
    ref = reference_meta_step(quadratic, {"w": w0}, [(a, ca)], [(b, cb)], steps, lr, q_from)
    torch.testing.assert_close(ref.grads["w"], fomaml, rtol=1e-10, atol=1e-10)


def tanh_model(fast, data):
    """A small nonlinear regressor: mean squared error of tanh(x W1) W2 against y, per task."""

    def one(p, x, y):
        return ((torch.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2).mean()

    if isinstance(fast, dict):
        return one(fast, *data[0])
    return torch.stack([one(p, *d) for p, d in zip(fast, data, strict=True)])


def tanh_tasks(seed, m):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: (torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 2, generator=g, dtype=DT))  # noqa: E731
    return [mk() for _ in range(m)], [mk() for _ in range(m)]


def test_maml_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    params = {
        "w1": torch.randn(3, 4, generator=g, dtype=DT).requires_grad_(),
        "w2": torch.randn(4, 2, generator=g, dtype=DT).requires_grad_(),
    }
    support, query = tanh_tasks(1, 2)
    kw = dict(inner_steps=4, inner_lr=0.2, query_from_step=2)
    out = meta_step(tanh_model, params, support, query, 2, first_order=False, **kw)

    def objective(p):
        p = {k: v.requires_grad_() for k, v in p.items()}
        return meta_step(tanh_model, p, support, query, 2, first_order=False, **kw).meta_loss

    eps = 1e-6
    for name in params:
        fd = torch.zeros_like(params[name])
        for idx in range(params[name].numel()):
            plus = {k: v.detach().clone() for k, v in params.items()}
            minus = {k: v.detach().clone() for k, v in params.items()}
            plus[name].view(-1)[idx] += eps
            minus[name].view(-1)[idx] -= eps
            fd.view(-1)[idx] = (objective(plus) - objective(minus)) / (2 * eps)
        torch.testing.assert_close(out.grads[name], fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("first_order", [True, False])
def test_task_batched_equals_sequential_and_reference_equals_fomaml_on_toy(first_order):
    g = torch.Generator().manual_seed(3)
    params = {"w1": torch.randn(3, 4, generator=g, dtype=DT), "w2": torch.randn(4, 2, generator=g, dtype=DT)}
    params = {k: v.requires_grad_(not first_order) for k, v in params.items()}  # MAML differentiates theta
    support, query = tanh_tasks(4, 3)
    kw = dict(inner_steps=5, inner_lr=0.1, first_order=first_order)
    batched = meta_step(tanh_model, params, support, query, 3, **kw)
    singles = [meta_step(tanh_model, params, [support[m]], [query[m]], 1, **kw) for m in range(3)]
    for k in params:
        torch.testing.assert_close(batched.grads[k], sum(s.grads[k] for s in singles) / 3)
    torch.testing.assert_close(batched.query_losses, torch.cat([s.query_losses for s in singles], 1))
    torch.testing.assert_close(batched.support_losses, torch.cat([s.support_losses for s in singles], 1))
    if not first_order:
        return
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    ref = reference_meta_step(tanh_model, p, [support[0]], [query[0]], inner_steps=5, inner_lr=0.1)
    for k in params:
        torch.testing.assert_close(ref.grads[k], singles[0].grads[k])
    assert ref.meta_loss == pytest.approx(singles[0].meta_loss)


def test_second_order_tasks_from_shared_meta_parameters_adapt_alone():
    """Two tasks in lockstep from the same meta-parameters: after one inner step each task's fast weights
    are theta - lr * (its own support gradient), not the sum of both tasks' gradients."""
    w = torch.tensor([1.0, -2.0], dtype=DT, requires_grad=True)
    a = torch.eye(2, dtype=DT)
    support = [(a, torch.zeros(2, dtype=DT)), (a, torch.tensor([4.0, 4.0], dtype=DT))]
    out = adapt(quadratic, [{"w": w}, {"w": w}], support, inner_steps=1, inner_lr=0.5, first_order=False)
    # grad of 0.5 |w - c|^2 is w - c: the fast weights are w - 0.5 (w - c) = (w + c) / 2
    fast = [f["w"].detach() for f in out.fast_weights]
    torch.testing.assert_close(
        fast, [torch.tensor([0.5, -1.0], dtype=DT), torch.tensor([2.5, 1.0], dtype=DT)]
    )
    assert all(f["w"].grad_fn is not None for f in out.fast_weights)  # still attached to w
    with pytest.raises(ValueError, match=r"first_order=False differentiates .* \['w'\] do not require grad"):
        meta_step(quadratic, {"w": w.detach()}, support, support, 2, inner_steps=2, first_order=False)
    with pytest.raises(ValueError, match=r"meta.engine=reference .* \['w'\] do not require grad"):
        reference_meta_step(quadratic, {"w": w.detach()}, support[:1], support[:1], inner_steps=2)


def test_adapt_descends_and_reports_every_step():
    a, c = spd(3, 5), torch.randn(3, dtype=DT)
    w = {"w": torch.zeros(3, dtype=DT, requires_grad=True)}
    seen = []
    out = adapt(quadratic, w, [(a, c)], inner_steps=8, inner_lr=0.2, on_step=lambda s, f: seen.append(s))
    assert seen == list(range(1, 9))
    losses = out.support_losses[:, 0]
    assert (losses[1:] < losses[:-1]).all()
    assert out.fast_weights["w"].grad_fn is None  # first order: nothing attached to the meta-parameters
    assert torch.equal(w["w"], torch.zeros(3, dtype=DT))  # the meta-parameters are untouched
    second = adapt(quadratic, w, [(a, c)], inner_steps=2, inner_lr=0.2, first_order=False)
    assert second.fast_weights["w"].grad_fn is not None
    with pytest.raises(ValueError, match="query_from_step=0"):
        meta_step(quadratic, w, [(a, c)], [(a, c)], 1, inner_steps=3, query_from_step=0)
    with pytest.raises(ValueError, match="loss_fn returned shape"):
        meta_step(lambda f, d: torch.zeros(5), w, None, None, 2, inner_steps=2)


def test_outer_step_clips_and_uses_adamw():
    cfg = MetaConfig()
    p = {"w": torch.nn.Parameter(torch.ones(4))}
    opt = make_meta_optimizer(p.values(), cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["lr"] == 5e-4 and opt.defaults["weight_decay"] == 0.01
    norm = apply_meta_gradient(opt, p, {"w": torch.full((4,), 3.0)}, cfg.grad_clip)
    assert norm == pytest.approx(6.0)
    # first AdamW step moves each coordinate by lr (sign of grad) plus decoupled weight decay
    torch.testing.assert_close(p["w"].detach(), torch.full((4,), 1 - 5e-4 * 0.01 - 5e-4), rtol=0, atol=1e-6)
    assert p["w"].grad is None


def test_meta_lr_schedule():
    constant = MetaConfig(meta_lr=0.01, outer_steps=10)
    assert [meta_lr_at(s, constant) for s in (0, 5, 9)] == [0.01, 0.01, 0.01]
    cosine = MetaConfig(meta_lr=0.01, outer_steps=10, lr_schedule="cosine")
    lrs = [meta_lr_at(s, cosine) for s in range(10)]
    assert lrs[0] == 0.01 and lrs[5] == pytest.approx(0.005)
    assert (
        all(a > b for a, b in zip(lrs, lrs[1:], strict=False)) and 0 < lrs[-1] < 0.0003
    )  # the last step still moves
    p = {"w": torch.nn.Parameter(torch.ones(4))}
    opt = make_meta_optimizer(p.values(), cosine)
    set_lr(opt, lrs[5])
    apply_meta_gradient(opt, p, {"w": torch.full((4,), 3.0)}, None)
    torch.testing.assert_close(p["w"].detach(), torch.full((4,), 1 - 0.005 * 0.01 - 0.005), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ with the tiny LLM


def assert_same_grads(actual: dict, expected: dict) -> None:
    """Two fp32 meta-gradients of the same math, batched / computed differently, compared at the scale of
    the whole gradient (the mapper's key bias cancels in the softmax to ~1e-11 of pure rounding); the
    longest reduction in the tiny LLM is the log-softmax over its 512-token vocabulary."""
    tol = rounding_tolerance(expected.values(), reduction=512)
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], **tol)


QS = ["does this ecg show baseline drift?", "does this ecg show static noise?", "which leads show noise?"]


def lm_tasks(m: ECGLanguageModel, seed: int, n_tasks: int, per_task: int = 3):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n_tasks):
        qs = [QS[int(i)] for i in torch.randint(0, 3, (per_task,), generator=g)]
        ans = [["yes"] if torch.rand(1, generator=g) < 0.5 else ["no"] for _ in qs]
        tasks.append(m.task_data(torch.randn(per_task, 16, generator=g), None, qs, ans))
    return tasks


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_llm("tiny-llama")
    return model, tokenizer


def lm(tiny, layout, dropout=0.0):
    model, tokenizer = tiny
    cfg = ModelConfig(llm="tiny-llama", prompt_layout=layout, dropout=dropout)
    torch.manual_seed(0)
    mapper = build_mapper(cfg, 16, llm_hidden_size(model))
    return ECGLanguageModel(None, mapper, model, tokenizer, cfg)


def test_lm_task_batched_equals_sequential_and_reference(tiny):
    m = lm(tiny, "question_first")
    support, query = lm_tasks(m, 1, 2), lm_tasks(m, 2, 2)
    params, kw = m.mapper_params(), dict(inner_steps=4, inner_lr=0.05, query_from_step=2)
    batched = meta_step(m.loss_fn(), params, m.task_set(support), m.task_set(query), 2, **kw)
    singles = [
        meta_step(m.loss_fn(), params, m.task_set([support[i]]), m.task_set([query[i]]), 1, **kw)
        for i in range(2)
    ]
    assert_same_grads(batched.grads, {k: (singles[0].grads[k] + singles[1].grads[k]) / 2 for k in params})
    assert sum(g.abs().sum() for g in batched.grads.values()) > 0
    # the official loop, full-sequence logits, no KV cache: the same FOMAML gradient
    mp = lm(tiny, "prefix_first")
    ref = reference_meta_step(
        mp.loss_fn(full_logits=True),
        mp.mapper_params(),
        mp.task_set([support[0]]),
        mp.task_set([query[0]]),
        **kw,
    )
    fast = meta_step(
        mp.loss_fn(), mp.mapper_params(), mp.task_set([support[0]]), mp.task_set([query[0]]), 1, **kw
    )
    assert_same_grads(ref.grads, fast.grads)
    torch.testing.assert_close(
        ref.query_losses, fast.query_losses, **rounding_tolerance(fast.query_losses, 512)
    )
    assert all(p.grad is None for p in m.llm.parameters())


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_lm_query_pass_merged_with_the_next_support_pass_gives_the_same_step(tiny, dropout):
    """meta_step(query_then_support=...): the query loss after step k and the support loss of step k + 1
    in one pass (one backward, each through its own copy of the fast weights) give the two-pass step's
    losses and meta-gradient; the mapper's dropout draws come in the same order, so with dropout too."""
    m = lm(tiny, "question_first", dropout=dropout).train()
    support, query = lm_tasks(m, 1, 2), lm_tasks(m, 2, 2)
    params, kw = m.mapper_params(), dict(inner_steps=4, inner_lr=0.05, query_from_step=2)
    runs = []
    for merged in (False, True):
        torch.manual_seed(3)
        both = m.task_set(query + support) if merged else None
        runs.append(
            meta_step(
                m.loss_fn(), params, m.task_set(support), m.task_set(query), 2, **kw, query_then_support=both
            )
        )
    two, one = runs
    assert_same_grads(one.grads, two.grads)
    for a, b in ((one.support_losses, two.support_losses), (one.query_losses, two.query_losses)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **rounding_tolerance(b, 512))
    assert one.meta_loss == pytest.approx(
        two.meta_loss, abs=rounding_tolerance(two.query_losses, 512)["atol"]
    )
    # from the first step on (query_from_step=1) and with one inner step (nothing to merge) as well
    for steps, q_from in ((3, 1), (1, 1)):
        kw = dict(inner_steps=steps, inner_lr=0.05, query_from_step=q_from)
        torch.manual_seed(3)
        a = meta_step(m.loss_fn(), params, m.task_set(support), m.task_set(query), 2, **kw)
        torch.manual_seed(3)
        b = meta_step(m.loss_fn(), params, m.task_set(support), m.task_set(query), 2, **kw,
                      query_then_support=m.task_set(query + support))  # fmt: skip
        assert_same_grads(b.grads, a.grads)
        assert b.query_losses.shape == a.query_losses.shape == (steps - q_from + 1, 2)
    assert all(p.grad is None for p in m.llm.parameters())


def test_lm_second_order_task_batched_equals_sequential(tiny):
    """Full MAML through the frozen LLM (double backward): M tasks in lockstep from the same meta-parameters
    give the mean of the one-task meta-gradients, which differ from FOMAML's."""
    m = lm(tiny, "question_first")
    support, query = lm_tasks(m, 1, 2), lm_tasks(m, 2, 2)
    params, kw = m.mapper_params(), dict(inner_steps=3, inner_lr=0.5, query_from_step=2, first_order=False)
    batched = meta_step(m.loss_fn(), params, m.task_set(support), m.task_set(query), 2, **kw)
    singles = [
        meta_step(m.loss_fn(), params, m.task_set([support[i]]), m.task_set([query[i]]), 1, **kw)
        for i in range(2)
    ]
    assert_same_grads(batched.grads, {k: (singles[0].grads[k] + singles[1].grads[k]) / 2 for k in params})
    losses = torch.cat([s.support_losses for s in singles], 1)
    torch.testing.assert_close(batched.support_losses, losses, **rounding_tolerance(losses, 512))
    # and second order really is not FOMAML here: the two differ by far more than rounding
    first = meta_step(
        m.loss_fn(), params, m.task_set(support), m.task_set(query), 2, **{**kw, "first_order": True}
    )
    diff = max(float((first.grads[k] - batched.grads[k]).abs().max()) for k in params)
    assert diff > 100 * rounding_tolerance(batched.grads.values(), 512)["atol"]
    assert all(p.grad is None for p in m.llm.parameters())


def test_lm_meta_step_is_deterministic_for_a_seed(tiny):
    m = lm(tiny, "question_first", dropout=0.5).train()
    support, query = m.task_set(lm_tasks(m, 1, 2)), m.task_set(lm_tasks(m, 2, 2))
    cfg = MetaConfig(inner_steps=3, tasks_per_step=2)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(run_meta_step(m.loss_fn(), m.mapper_params(), support, query, cfg))
    for k in runs[0].grads:
        assert torch.equal(runs[0].grads[k], runs[1].grads[k])
    torch.manual_seed(8)  # dropout is live: another seed gives another gradient
    other = run_meta_step(m.loss_fn(), m.mapper_params(), support, query, cfg)
    assert not torch.equal(other.grads["q.weight"], runs[0].grads["q.weight"])
    with pytest.raises(ValueError, match="engine=reference"):
        run_meta_step(
            m.loss_fn(), m.mapper_params(), support, query, MetaConfig(engine="reference", tasks_per_step=2)
        )

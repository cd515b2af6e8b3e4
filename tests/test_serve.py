"""The QA service over real HTTP on 127.0.0.1 (Ray Serve, tiny-llama, tiny encoder): adapt then answer, the
adapter cache, batching across requests, 500+ malformed requests without a 5xx, 64 concurrent requests."""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from tolerances import rounding_tolerance

from ecgray.config import from_dict

pytestmark = pytest.mark.slow

QUESTION = "does this ecg show symptoms of baseline drift?"
LEADS = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]  # MIMIC order
TREE = {
    "seed": 0,
    "data": {"fs": 100, "window_s": 2.0},
    "encoder": {"d_enc": 32, "n_layers": 1, "n_heads": 2, "stem_channels": 8, "fs": 100},
    "model": {"llm": "tiny-llama"},
    "meta": {"inner_steps": 3, "inner_lr": 0.5},
}


def ecg(seed: int, fs: int = 100, t: int = 300) -> dict:
    rng = np.random.default_rng(seed)
    return {"fs": fs, "leads": LEADS, "signal": np.round(rng.normal(size=(12, t)), 4).tolist()}


def support_set(n: int = 6, offset: int = 0) -> list[dict]:
    return [
        {"ecg": ecg(100 + offset + i), "question": QUESTION, "answer": ["yes" if i % 2 else "no"]}
        for i in range(n)
    ]


def assert_scores_close(got, want) -> None:
    """Option scores (log-probabilities; floats, lists or {option: score}) of the same adapter and ECG:
    equal up to rounding, since batch composition and kernels change the order of the sums, the longest
    being tiny-llama's log-softmax over its 32,000-token vocabulary."""
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        got, want = [got[k] for k in want], list(want.values())
    want = torch.tensor(want, dtype=torch.float32)
    torch.testing.assert_close(
        torch.tensor(got, dtype=torch.float32), want, **rounding_tolerance(want, 32_000)
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(directory, tree: dict):
    """A seeded mapper for the tiny encoder (width 32) and tiny-llama (32) saved with `tree`'s config."""
    from ecgray.models.checkpoint import save_checkpoint
    from ecgray.models.fusion import build_mapper

    cfg = from_dict(tree)
    torch.manual_seed(0)
    mapper = build_mapper(cfg.model, 32, 32)
    return save_checkpoint(directory / "ckpt", mapper.state_dict(), cfg)


def running_service(cfg, name: str, timeout_s: float = 120):
    """Serve the app of ServeConfig `cfg` on 127.0.0.1:cfg.port; yields its base URL once /healthz answers
    200 (for a module fixture: `yield from`), then deletes the app and stops Serve."""
    from ray import serve

    from serve.app import ServeArgs, build_app

    serve.start(http_options={"host": "127.0.0.1", "port": cfg.port})
    serve.run(build_app(ServeArgs(serve=cfg)), name=name, route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{cfg.port}"
    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass  # not listening yet
        if time.time() > deadline:
            pytest.fail(f"the service did not come up within {timeout_s:.0f} s")
        time.sleep(0.5)
    yield base
    serve.delete(name)
    serve.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve"), TREE)


@pytest.fixture(scope="module")
def engine(checkpoint):
    """The same checkpoint loaded in this process: what the service must reproduce."""
    from serve.engine import load_engine

    return load_engine(checkpoint)


@pytest.fixture(scope="module")
def url(ray_session, checkpoint, tmp_path_factory):
    from ecgray.config import ServeConfig

    cfg = ServeConfig(checkpoint=str(checkpoint), port=free_port(), max_batch_size=8, batch_wait_timeout_s=0.05,
                      max_payload_mb=1.0, max_support=16, max_queries=4, max_duration_s=30.0,
                      adapter_store=str(tmp_path_factory.mktemp("adapters")))  # fmt: skip
    yield from running_service(cfg, "ecgray-test")


def post(url: str, path: str, body, **kw) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60, **kw)


def expected(engine, support: list[dict] | None, seeds: list[int], options):
    """The in-process reference: to_canonical -> adapt -> answer."""
    from ecgray.config import ServeConfig
    from serve.engine import Query
    from serve.payloads import AdaptRequest, ECGIn, canonical_ecg, canonical_support

    limits = ServeConfig(max_duration_s=30.0)
    fast = None
    if support is not None:
        items = canonical_support(
            AdaptRequest.model_validate({"support": support}).support, limits, engine.cfg.data
        )
        fast, _ = engine.adapt([(s.ecg, s.question, s.answer) for s in items])
    queries = [Query(canonical_ecg(ECGIn.model_validate(ecg(s)), "q", limits, engine.cfg.data), QUESTION, options, fast)
               for s in seeds]  # fmt: skip
    return engine.answer(queries)


def info(url: str) -> dict:
    return httpx.get(f"{url}/v1/info", timeout=30).json()


def test_a_grounded_mapper_checkpoint_serves_with_its_fixed_tensors(tmp_path):
    """model.mapper=grounded: the checkpoint's buffers (feature statistics, a 0-d token norm) load into the
    engine, count in its checkpoint id, and the engine adapts and answers with them."""
    from ecgray.models.checkpoint import save_checkpoint
    from ecgray.models.fusion import build_mapper
    from serve.engine import load_engine

    cfg = from_dict({**TREE, "model": {**TREE["model"], "mapper": "grounded", "mlp_hidden": 16}})
    stats = {"feature_mean": torch.zeros(32), "feature_std": torch.ones(32), "token_norm": torch.tensor(0.5)}
    ids = []
    for norm in (0.5, 0.7):
        torch.manual_seed(0)
        mapper = build_mapper(cfg.model, 32, 32, {**stats, "token_norm": torch.tensor(norm)})
        engine = load_engine(save_checkpoint(tmp_path / f"grounded-{norm}", mapper.state_dict(), cfg))
        assert float(engine.lm.mapper.token_norm) == pytest.approx(norm)
        ids.append(engine.checkpoint_id)
    assert ids[0] != ids[1]  # the buffers are part of what identifies the checkpoint
    answers = expected(engine, support_set(), [1, 2], ["yes", "no"])
    assert len(answers) == 2 and all(a["answer"] in ("yes", "no") for a in answers)


def test_adapt_then_answer_matches_the_library(url, engine):
    support = support_set()
    before = info(url)["adaptation_replica"]
    r = post(url, "/v1/adapt", {"support": support})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapted"] is True and body["support_size"] == 6 and body["adapter_id"].startswith("ad-")
    after = info(url)["adaptation_replica"]
    assert after["adaptations"] == before["adaptations"] + 1
    r = post(url, "/v1/answer", {"question": QUESTION, "ecgs": [ecg(1), ecg(2)], "adapter_id": body["adapter_id"],
                                 "options": ["yes", "no"]})  # fmt: skip
    assert r.status_code == 200, r.text
    out = r.json()
    assert (
        out["adapter_id"] == body["adapter_id"]
        and out["adapted"] is False
        and out["options_source"] == "request"
    )
    ref = expected(engine, support, [1, 2], ["yes", "no"])
    for got, want in zip(out["answers"], ref, strict=True):
        assert got["answer"] == want["answer"]
        for option in ("yes", "no"):
            assert_scores_close(got["scores"][option], want["scores"][option])
    # the adapted weights differ from the meta-learned ones: zero-shot scores are not the same numbers
    zero = post(
        url, "/v1/answer", {"question": QUESTION, "ecgs": [ecg(1)], "zero_shot": True, "template_id": 2}
    ).json()
    assert zero["adapter_id"] is None and zero["options_source"] == "template"
    assert set(zero["answers"][0]["scores"]) == {"no", "yes"}
    assert zero["answers"][0]["scores"]["yes"] != pytest.approx(out["answers"][0]["scores"]["yes"], abs=1e-6)
    info_body = info(url)
    assert info_body["llm"] == "tiny-llama" and info_body["serve"]["host"] == "127.0.0.1"
    assert "ray" in info_body["versions"] and info_body["meta"]["inner_steps"] == 3
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    assert {"/v1/adapt", "/v1/answer", "/v1/answer/upload", "/healthz", "/v1/info"} <= set(paths)


def test_cache_hit_skips_the_inner_loop(url):
    support = support_set(offset=50)
    first = post(url, "/v1/adapt", {"support": support}).json()
    counters = info(url)["adaptation_replica"]
    # the same support set in another order, inline with a question: same id, no inner loop
    r = post(url, "/v1/answer", {"question": QUESTION, "ecgs": [ecg(3)], "support": support[::-1]})
    assert r.status_code == 200, r.text
    assert r.json()["adapter_id"] == first["adapter_id"] and r.json()["adapted"] is False
    again = post(url, "/v1/adapt", {"support": support}).json()
    assert again == {**first, "adapted": False}
    now = info(url)["adaptation_replica"]
    assert now["adaptations"] == counters["adaptations"]
    assert now["store_hits"] == counters["store_hits"] + 2
    # one changed answer is another task
    changed = [dict(support[0], answer=["yes"])] + support[1:]
    assert post(url, "/v1/adapt", {"support": changed}).json()["adapted"] is True


def test_batching_returns_each_answer_to_its_own_request(url, engine):
    seeds = list(range(200, 216))
    ref = expected(engine, None, seeds, ["yes", "no"])

    def ask(seed):
        return post(url, "/v1/answer", {"question": QUESTION, "ecgs": [ecg(seed)], "zero_shot": True,
                                        "options": ["yes", "no"]})  # fmt: skip

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(ask, seeds))
    assert [r.status_code for r in responses] == [200] * len(seeds)
    for r, want in zip(responses, ref, strict=True):
        got = r.json()["answers"][0]
        assert_scores_close(
            [got["scores"][o] for o in ("yes", "no")], [want["scores"][o] for o in ("yes", "no")]
        )
    assert max(r.json()["answers"][0]["batch_size"] for r in responses) > 1
    assert info(url)["answer_replica"]["max_batch"] > 1


def test_wfdb_upload_and_errors(url, tmp_path):
    import wfdb

    x = np.asarray(ecg(7)["signal"])  # (12, T)
    wfdb.wrsamp(
        "rec",
        fs=100,
        units=["mV"] * 12,
        sig_name=LEADS,
        p_signal=x.T,
        fmt=["16"] * 12,
        write_dir=str(tmp_path),
    )
    hea, dat = (tmp_path / "rec.hea").read_bytes(), (tmp_path / "rec.dat").read_bytes()
    files = {"hea": ("rec.hea", hea), "dat": ("rec.dat", dat)}
    data = {"question": QUESTION, "zero_shot": "true", "options": ["yes", "no"]}  # a part per option
    r = httpx.post(f"{url}/v1/answer/upload", files=files, data=data, timeout=60)
    assert r.status_code == 200, r.text
    b64 = {"wfdb": {"header": hea.decode(), "dat": base64.b64encode(dat).decode()}}
    j = post(
        url, "/v1/answer", {"question": QUESTION, "ecgs": [b64], "zero_shot": True, "options": ["yes", "no"]}
    )
    assert j.json()["answers"][0]["scores"] == pytest.approx(r.json()["answers"][0]["scores"])
    r = httpx.post(f"{url}/v1/answer/upload", files={"hea": ("rec.hea", hea)}, data=data, timeout=60)
    assert r.status_code == 422 and r.json()["field"] == "dat"
    r = post(url, "/v1/answer", {"question": QUESTION, "ecgs": [ecg(1)], "adapter_id": "ad-unknown"})
    assert r.status_code == 422 and r.json()["field"] == "adapter_id"  # not an adapter id at all
    r = post(url, "/v1/answer", {"question": QUESTION, "ecgs": [ecg(1)], "adapter_id": "ad-" + "0" * 32})
    assert r.status_code == 404 and r.json()["field"] == "adapter_id" and "/v1/adapt" in r.json()["message"]
    big = b"[" + b"0," * 600_000 + b"0]"
    r = httpx.post(f"{url}/v1/adapt", content=big, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "max_payload_mb" in r.json()["message"]
    r = post(url, "/v1/adapt", {"support": support_set(17)})
    assert r.status_code == 413 and r.json()["field"] == "support"


def mutations(rng: random.Random, valid: dict) -> list[tuple[str, bytes | dict]]:
    """Malformed requests: broken JSON, wrong types, missing / unknown fields, bad ECGs."""
    out: list[tuple[str, bytes | dict]] = []
    raw = json.dumps(valid).encode()
    for _ in range(60):  # truncated / corrupted bytes
        cut = rng.randrange(1, len(raw) - 1)
        out.append(("/v1/answer", raw[:cut]))
        flipped = bytearray(raw[:2000])
        flipped[rng.randrange(len(flipped))] = rng.choice(b'{}[],:"\\x\x00\xff')
        out.append(("/v1/answer", bytes(flipped)))
    # no value here makes a valid request: no None (optional fields), no True, no plain question text
    junk = [0, -1, 1e308, "", [], {}, [[]], float("nan"), [1, "a"], {"a": 1}, 10**30]
    keys = ["question", "ecgs", "options", "template_id", "adapter_id", "support", "zero_shot"]
    for _ in range(150):  # top-level fields of the wrong type, missing, or unknown
        body = json.loads(json.dumps(valid))
        action = rng.choice(["type", "drop", "extra"])
        key = rng.choice(keys)
        if action == "type":
            body[key] = rng.choice(junk)
        elif action == "drop":
            body.pop("question" if key in ("options", "template_id") else key, None)
        else:
            body[f"x_{key}"] = 1
        if body != valid:
            out.append(("/v1/answer", body))
    ecg_faults = [
        lambda e: e.update(fs=rng.choice([0, -500, 1e12, "fast", None, float("inf")])),
        lambda e: e.update(leads=e["leads"][:-1]),
        lambda e: e.update(leads=["I"] * 12),
        lambda e: e.update(leads=["I", "II", "foo"] + e["leads"][3:]),
        lambda e: e.update(signal=e["signal"][:5]),
        lambda e: e.update(signal=[row[: rng.randrange(1, 50)] for row in e["signal"]]),
        lambda e: e.update(signal=[row[:-1] if i == 3 else row for i, row in enumerate(e["signal"])]),
        lambda e: e.update(signal=[[float("inf")] * len(r) for r in e["signal"]]),
        lambda e: e.update(signal=[[float("nan")] * len(r) for r in e["signal"]]),
        lambda e: e.update(signal="abc"),
        lambda e: e.update(data="AAAA", dtype="float32", shape=[12, 300]),
        lambda e: e.pop("signal"),
        lambda e: e.update(signal=[[0.0] * 4000] * 12),  # 40 s > max_duration_s
        lambda e: e.update(wfdb={"header": "rec 12 100 300", "dat": "!!"}),
        lambda e: (
            e.clear(),
            e.update(wfdb={"header": "x 1 100 10\nx.dat 16 200 16 0 0 0 0 I", "dat": "AAAA"}),
        ),
        lambda e: e.update(dtype="int8"),
        lambda e: e.update(shape=[-1, 3]),
    ]
    small = {"fs": 100, "leads": LEADS, "signal": [[0.1] * 300] * 12}
    for _ in range(260):
        e = json.loads(json.dumps(small))
        rng.choice(ecg_faults)(e)
        if rng.random() < 0.5:
            out.append(("/v1/answer", {"question": QUESTION, "ecgs": [e], "zero_shot": True}))
        else:
            out.append(("/v1/adapt", {"support": [{"ecg": e, "question": QUESTION, "answer": ["yes"]}]}))
    more = [
        ("/v1/answer", {"question": QUESTION, "ecgs": [small] * 5, "zero_shot": True}),  # > max_queries
        ("/v1/answer", {"question": QUESTION, "ecgs": [small], "zero_shot": True, "template_id": 999}),
        ("/v1/answer", {"question": QUESTION, "ecgs": [small], "zero_shot": True, "options": []}),
        ("/v1/answer", {"question": "", "ecgs": [small], "zero_shot": True}),
        ("/v1/adapt", {"support": []}),
        ("/v1/adapt", {"support": [{"ecg": small, "question": QUESTION, "answer": []}]}),
        ("/v1/adapt", [1, 2, 3]),
        ("/v1/adapt", b"\xff\xfe"),
        ("/v1/adapt", b""),
    ]
    return out + more * 3


def test_fuzz_no_5xx_and_still_answers(url):
    rng = random.Random(0)
    valid = {"question": QUESTION, "ecgs": [ecg(9)], "zero_shot": True, "options": ["yes", "no"]}
    good = post(url, "/v1/answer", valid)
    assert good.status_code == 200
    cases = mutations(rng, valid)
    assert len(cases) >= 500

    def send(case):
        path, body = case
        if isinstance(body, bytes):
            return httpx.post(
                f"{url}{path}", content=body, headers={"content-type": "application/json"}, timeout=60
            )
        return httpx.post(f"{url}{path}", content=json.dumps(body).encode(), headers={"content-type": "application/json"},
                          timeout=60)  # fmt: skip

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(send, cases))
    statuses = [r.status_code for r in responses]
    server_errors = [(c, r.text[:200]) for c, r in zip(cases, responses, strict=True) if r.status_code >= 500]
    assert not server_errors, server_errors[:3]
    bad = [(c, r.status_code) for c, r in zip(cases, responses, strict=True) if r.status_code == 200]
    assert not bad, [{k: v for k, v in c[1].items() if v != valid.get(k)} for c, _ in bad[:3]]  # all invalid
    for r in responses:
        body = r.json()
        assert body.get("field") and body.get("message"), (r.status_code, body)
    assert {400, 413, 422} <= set(statuses)
    again = post(url, "/v1/answer", valid)
    assert again.status_code == 200
    assert_scores_close(again.json()["answers"][0]["scores"], good.json()["answers"][0]["scores"])


def test_64_concurrent_requests(url):
    adapter = post(url, "/v1/adapt", {"support": support_set()}).json()["adapter_id"]

    def ask(i):
        body = {"question": QUESTION, "ecgs": [ecg(300 + i)], "options": ["yes", "no"]}
        body.update({"adapter_id": adapter} if i % 2 else {"zero_shot": True})
        return post(url, "/v1/answer", body)

    with ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(ask, range(64)))
    assert [r.status_code for r in responses] == [200] * 64, [
        r.text[:200] for r in responses if r.status_code != 200
    ]
    assert all(r.json()["answers"][0]["answer"] in ("yes", "no") for r in responses)


def test_ask_cli_and_client(url, tmp_path, capsys):
    import wfdb

    from ecgray.cli import main
    from serve.client import ECGQAClient, ServiceError, load_support, wfdb_payload

    items = []
    for i in range(4):
        x = np.asarray(ecg(400 + i)["signal"])
        wfdb.wrsamp(f"s{i}", fs=100, units=["mV"] * 12, sig_name=LEADS, p_signal=x.T, fmt=["16"] * 12,
                    write_dir=str(tmp_path))  # fmt: skip
        items.append({"ecg": f"s{i}.hea", "question": QUESTION, "answer": ["yes" if i % 2 else "no"]})
    (tmp_path / "support.json").write_text(json.dumps(items))
    query = tmp_path / "s0.hea"
    code = main(["ask", "--url", url, "--support", str(tmp_path / "support.json"), "--ecg", str(query),
                 "--question", QUESTION, "--options", "yes", "no"])  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    with ECGQAClient(url) as client:
        assert client.health()
        adapter = client.adapt(load_support(tmp_path / "support.json"))
        assert adapter == out["adapter_id"]
        again = client.answer([wfdb_payload(query)], QUESTION, adapter_id=adapter, options=["yes", "no"])
        assert_scores_close(again["answers"][0]["scores"], out["answers"][0]["scores"])
        with pytest.raises(ServiceError) as info:
            client.answer([wfdb_payload(query)], QUESTION, adapter_id="ad-" + "1" * 32)
        assert info.value.status == 404
    assert (
        main(["ask", "--url", url, "--adapter-id", "ad-" + "1" * 32, "--ecg", str(query), "--question", "q"])
        == 1
    )


def test_comparison_question_served_end_to_end(url, engine):
    """Two ECGs per item for a comparison question: adapt on pairs, answer pairs, the same numbers as the
    library; order matters; a one-ECG item for a comparison template and mixed support sets are 4xx."""
    from ecgray.config import ServeConfig
    from serve.app import comparison_templates
    from serve.engine import DEFAULT_TEMPLATE_ANSWERS, Query, read_template_answers
    from serve.payloads import AdaptRequest, AnswerRequest, canonical_item, canonical_support

    table = read_template_answers(DEFAULT_TEMPLATE_ANSWERS)
    tid = min(t for t in comparison_templates() if table[t] == ["no", "yes"])
    q2 = "did the second ecg newly show symptoms of baseline drift compared to the first?"
    support = [{"ecg_pair": [ecg(700 + 2 * i), ecg(701 + 2 * i)], "question": q2, "answer": ["yes" if i % 2 else "no"]}
               for i in range(4)]  # fmt: skip
    r = post(url, "/v1/adapt", {"support": support})
    assert r.status_code == 200, r.text
    key = r.json()["adapter_id"]
    pairs = [[ecg(1), ecg(2)], [ecg(2), ecg(1)]]
    r = post(url, "/v1/answer", {"question": q2, "ecg_pairs": pairs, "adapter_id": key, "template_id": tid})
    assert r.status_code == 200, r.text
    got = r.json()["answers"]
    limits = ServeConfig(max_duration_s=30.0)
    items = canonical_support(
        AdaptRequest.model_validate({"support": support}).support, limits, engine.cfg.data
    )
    fast, _ = engine.adapt([(s.ecg, s.question, s.answer) for s in items])
    req = AnswerRequest.model_validate({"question": q2, "ecg_pairs": pairs, "zero_shot": True})
    want = engine.answer([Query(canonical_item(p, "q", limits, engine.cfg.data), q2, ["no", "yes"], fast)
                          for p in req.ecg_pairs])  # fmt: skip
    assert [g["answer"] for g in got] == [w["answer"] for w in want]
    # the same math, batched differently: equal to rounding (the longest sum is the vocabulary's log-softmax)
    ref = torch.tensor([[w["scores"][o] for o in ("yes", "no")] for w in want])
    torch.testing.assert_close(torch.tensor([[g["scores"][o] for o in ("yes", "no")] for g in got]), ref,
                               **rounding_tolerance(ref, 32_000))  # fmt: skip
    assert got[0]["scores"] != got[1]["scores"]  # first / second are told apart
    r = post(url, "/v1/answer", {"question": q2, "ecgs": [ecg(1)], "zero_shot": True, "template_id": tid})
    assert r.status_code == 422 and r.json()["field"] == "ecgs" and "ecg_pairs" in r.json()["message"]
    r = post(url, "/v1/answer", {"question": q2, "ecgs": [ecg(1)], "support": support})
    assert r.status_code == 422 and r.json()["field"] == "ecgs"
    mixed = support[:2] + [{"ecg": ecg(9), "question": q2, "answer": ["no"]}]
    r = post(url, "/v1/adapt", {"support": mixed})
    assert r.status_code == 422 and r.json()["field"].startswith("support[")


def test_a_checkpoint_trained_with_support_centring_is_refused():
    from ecgray.config import Config, MetaConfig
    from serve.engine import QAEngine

    cfg = Config(meta=MetaConfig(support_centring=True))
    with pytest.raises(ValueError, match="meta.support_centring=true: the service does not centre"):
        QAEngine(cfg, {})

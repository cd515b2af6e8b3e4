"""Serve payloads without Ray: ECG forms -> the training path, every fault a PayloadError naming the field."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from ecgray.config import LEAD_NAMES, DataConfig, ServeConfig
from ecgray.data.signals import to_canonical
from serve.app import BodyLimit, _multipart, _validation_errors
from serve.engine import DEFAULT_TEMPLATE_ANSWERS, read_template_answers
from serve.payloads import (
    AdaptRequest,
    AnswerRequest,
    ECGIn,
    PayloadError,
    adapter_id,
    answer_mode,
    canonical_ecg,
    canonical_support,
    check_limits,
)

DATA = DataConfig(fs=100, window_s=2.0)
LIMITS = ServeConfig(max_support=4, max_queries=2, max_duration_s=10.0)
MIMIC_ORDER = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]


def record(seed: int = 0, t: int = 300) -> np.ndarray:
    """(C, T) float32: channel c = c + noise, so where each lead lands is visible."""
    rng = np.random.default_rng(seed)
    return (np.arange(12)[:, None] + 0.1 * rng.normal(size=(12, t))).astype(np.float32)


def json_ecg(x: np.ndarray, leads=MIMIC_ORDER, fs=100) -> dict:
    return {"fs": fs, "leads": list(leads), "signal": x.tolist()}


def b64_ecg(x: np.ndarray, leads=MIMIC_ORDER, fs=100, dtype="float32") -> dict:
    data = base64.b64encode(x.astype("<f4" if dtype == "float32" else "<f2").tobytes()).decode()
    return {"fs": fs, "leads": list(leads), "data": data, "dtype": dtype, "shape": list(x.shape)}


def wfdb_ecg(x: np.ndarray, tmp_path, leads=MIMIC_ORDER, fs=100, name="rec") -> dict:
    import wfdb

    wfdb.wrsamp(name, fs=fs, units=["mV"] * len(leads), sig_name=list(leads), p_signal=x.T.astype(np.float64),
                fmt=["16"] * len(leads), write_dir=str(tmp_path))  # fmt: skip
    header = (tmp_path / f"{name}.hea").read_text()
    dat = base64.b64encode((tmp_path / f"{name}.dat").read_bytes()).decode()
    return {"wfdb": {"header": header, "dat": dat}}


def canon(payload: dict, cfg=LIMITS):
    return canonical_ecg(ECGIn.model_validate(payload), "ecgs[0]", cfg, DATA)


def error(payload: dict, cfg=LIMITS) -> PayloadError:
    with pytest.raises(PayloadError) as info:
        canon(payload, cfg)
    return info.value


def test_three_forms_give_the_training_window(tmp_path):
    x = record()
    expected = to_canonical(x.T.astype(np.float64), MIMIC_ORDER, 100, DATA)
    for payload in (json_ecg(x), b64_ecg(x)):
        out = canon(payload)
        np.testing.assert_array_equal(out.signal, expected.signal)
        assert out.lead_mask.all()
    # leads are reordered by name: canonical aVL (index 4) holds the channel named aVL (position 5 = value 5)
    assert abs(float(canon(json_ecg(x)).signal[4].mean()) - 5.0) < 0.05
    # WFDB stores 16-bit digital values: equal up to the quantisation step
    out = canon(wfdb_ecg(x, tmp_path))
    np.testing.assert_allclose(out.signal, expected.signal, atol=2e-3)
    half = canon(b64_ecg(x, dtype="float16"))
    np.testing.assert_allclose(half.signal, expected.signal, atol=1e-2)


def test_resampled_and_windowed_like_training():
    x = np.random.default_rng(1).normal(size=(12, 1500)).astype(np.float32)  # 3 s at 500 Hz
    out = canon(json_ecg(x, LEAD_NAMES, fs=500))
    expected = to_canonical(x.T.astype(np.float64), LEAD_NAMES, 500, DATA)
    assert out.signal.shape == (12, 200)
    np.testing.assert_array_equal(out.signal, expected.signal)


def test_missing_leads_masked_and_nan_interpolated():
    x = record()[:3].copy()
    x[0, 10] = np.nan
    out = canon(json_ecg(x, ["I", "II", "V1"]))
    assert out.lead_mask.tolist() == [j in (0, 1, 6) for j in range(12)]
    assert out.nan_count == 1 and np.isfinite(out.signal).all()


@pytest.mark.parametrize(
    ("payload", "field", "words"),
    [
        (json_ecg(record()[:2], ["I", "foo"]), "ecgs[0].leads[1]", "unknown lead 'foo'"),
        (json_ecg(record()[:2], ["I", "i"]), "ecgs[0].leads", "appears twice"),
        (json_ecg(record()[:3], ["I", "II"]), "ecgs[0].signal", "3 rows but 2 leads"),
        (
            {"fs": 100, "leads": ["I", "II"], "signal": [[1.0] * 300, [1.0] * 299]},
            "ecgs[0].signal",
            "different lengths",
        ),
        (json_ecg(record()[:1], ["I"], fs=1e9), "ecgs[0].fs", "plausible range"),
        (json_ecg(record()[:1], ["I"], fs=float("nan")), "ecgs[0].fs", "plausible range"),
        (json_ecg(record(t=1200)[:1], ["I"], fs=100), "ecgs[0].signal", "max_duration_s"),
        (json_ecg(record(t=150)[:1], ["I"]), "ecgs[0]", "shorter than the 2 s window"),
        ({"fs": 100, "leads": ["I"], "signal": [[1.0] * 250 + [float("inf")] * 50]}, "ecgs[0]", "infinite"),
        ({**b64_ecg(record()[:1], ["I"]), "data": "@@@"}, "ecgs[0].data", "base64"),
        ({**b64_ecg(record()[:1], ["I"]), "shape": [1, 301]}, "ecgs[0].data", "1200 bytes"),
        ({**b64_ecg(record()[:1], ["I"]), "shape": [2, 300]}, "ecgs[0].shape", "expected [1 leads"),
        ({"fs": 100, "leads": ["I"], "signal": [[float("nan")] * 300]}, "ecgs[0]", "none of the leads"),
    ],
)
def test_bad_ecgs_name_the_field(payload, field, words):
    err = error(payload)
    assert err.field == field and words in err.message, (err.field, err.message)
    assert 400 <= err.status < 500


def test_wfdb_header_cannot_point_outside_its_temp_dir(tmp_path):
    payload = wfdb_ecg(record(), tmp_path)
    header = payload["wfdb"]["header"].replace("rec.dat", "../../etc/passwd")
    err = error({"wfdb": {"header": header, "dat": payload["wfdb"]["dat"]}})
    assert err.field == "ecgs[0].wfdb.header" and "plain-named" in err.message
    err = error({"wfdb": {"header": "garbage", "dat": payload["wfdb"]["dat"]}})
    assert err.field == "ecgs[0].wfdb.header"
    truncated = base64.b64encode(base64.b64decode(payload["wfdb"]["dat"])[:100]).decode()
    err = error({"wfdb": {"header": payload["wfdb"]["header"], "dat": truncated}})
    assert err.field.startswith("ecgs[0].wfdb")


def test_ecg_form_rules_are_schema_errors():
    for bad in ({}, {"fs": 100, "leads": ["I"]}, {"signal": [[1.0]]}, {"fs": 1, "leads": ["I"], "data": "AA=="},
                {"wfdb": {"header": "h", "dat": "AA=="}, "fs": 100}, {"fs": 1, "leads": ["I"], "signal": [["x"]]}):  # fmt: skip
        with pytest.raises(ValidationError) as info:
            ECGIn.model_validate(bad)
        _, errors = _validation_errors(info.value.errors())
        assert errors and all(e["field"] and e["message"] for e in errors)


def test_answer_request_modes_and_limits():
    ecg = json_ecg(record())
    base = {"question": "does this ecg show baseline drift?", "ecgs": [ecg]}
    key = "ad-" + "0" * 32
    for modes, header in (
        ({}, None),
        ({"adapter_id": key, "zero_shot": True}, None),
        ({"zero_shot": True}, key),
    ):
        with pytest.raises(PayloadError, match="exactly one of adapter_id, support or zero_shot"):
            answer_mode(AnswerRequest.model_validate({**base, **modes}), header)
    assert answer_mode(AnswerRequest.model_validate(base), key) == "adapter_id"  # the header alone
    assert answer_mode(AnswerRequest.model_validate({**base, "adapter_id": key}), key) == "adapter_id"
    with pytest.raises(PayloadError, match="header names") as info:
        answer_mode(AnswerRequest.model_validate({**base, "adapter_id": key}), "ad-" + "1" * 32)
    assert info.value.field == "adapter_id"
    with pytest.raises(PayloadError) as info:
        answer_mode(AnswerRequest.model_validate(base), "model-7")
    assert info.value.field == "serve_multiplexed_model_id"
    with pytest.raises(ValidationError, match="pattern"):
        AnswerRequest.model_validate({**base, "adapter_id": "ad-unknown"})
    req = AnswerRequest.model_validate({**base, "zero_shot": True, "ecgs": [ecg] * 3})
    with pytest.raises(PayloadError, match="at most serve.max_queries=2"):
        check_limits(req, LIMITS)
    req = AnswerRequest.model_validate({**base, "zero_shot": True, "options": ["yes", "Yes "]})
    with pytest.raises(PayloadError, match="duplicated options"):
        check_limits(req, LIMITS)
    item = {"ecg": ecg, "question": "q", "answer": ["yes"]}
    with pytest.raises(PayloadError, match="max_support=4") as info:
        check_limits(AdaptRequest.model_validate({"support": [item] * 5}), LIMITS)
    assert info.value.status == 413
    with pytest.raises(PayloadError) as info:
        check_limits(AdaptRequest.model_validate({"support": [{**item, "answer": [" "]}]}), LIMITS)
    assert info.value.field == "support[0].answer"
    _, errors = _validation_errors(
        pytest.raises(
            ValidationError, AnswerRequest.model_validate, {**base, "zero_shot": True, "extra": 1}
        ).value.errors()
    )
    assert errors == [{"field": "extra", "message": "unknown field"}]


def test_adapter_id_is_a_content_hash_of_the_support_set():
    items = [
        {"ecg": json_ecg(record(i)), "question": "Q?", "answer": a}
        for i, a in enumerate([["yes"], ["no"], ["no"]])
    ]
    support = canonical_support(AdaptRequest.model_validate({"support": items}).support, LIMITS, DATA)
    shuffled = canonical_support(AdaptRequest.model_validate({"support": items[::-1]}).support, LIMITS, DATA)
    assert adapter_id(support, "m1") == adapter_id(shuffled, "m1")  # a set: order does not matter
    assert adapter_id(support, "m1") != adapter_id(support, "m2")  # another checkpoint / inner loop
    flipped = [dict(items[0], answer=["no"])] + items[1:]
    other = canonical_support(AdaptRequest.model_validate({"support": flipped}).support, LIMITS, DATA)
    assert adapter_id(other, "m1") != adapter_id(support, "m1")
    # answers are sets: order and case do not matter
    a = canonical_support(
        AdaptRequest.model_validate({"support": [dict(items[0], answer=["I", "avr"])]}).support, LIMITS, DATA
    )
    b = canonical_support(
        AdaptRequest.model_validate({"support": [dict(items[0], answer=["aVR", "i"])]}).support, LIMITS, DATA
    )
    assert adapter_id(a, "m") == adapter_id(b, "m")


def test_adapter_store_round_trip_and_refusals(tmp_path):
    import pickle

    from serve.adapters import AdapterNotFound, AdapterStore

    key = "ad-" + "ab" * 16
    weights = {"mapper.w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "mapper.b": torch.ones(2)}
    for location in (str(tmp_path / "local"), f"file://{tmp_path}/uri"):
        store = AdapterStore(location)
        assert not store.exists(key)
        store.save(key, weights, "model-1")
        assert store.exists(key)
        loaded = store.load(key, "model-1")
        assert set(loaded) == set(weights) and all(torch.equal(loaded[k], weights[k]) for k in weights)
        assert not [p for p in Path(store.root).iterdir() if p.name.endswith(".tmp")]  # moved into place
        with pytest.raises(ValueError, match="adapted for model 'model-1'"):
            store.load(key, "model-2")
        with pytest.raises(AdapterNotFound):
            store.load("ad-" + "0" * 32, "model-1")
        for bad in ("../../etc/passwd", "ad-XYZ", "ad-" + "0" * 31 + "/"):
            with pytest.raises(ValueError, match="expected 'ad-' and 32 hex digits"):
                store.exists(bad)
    # safetensors on disk: no pickle anywhere
    raw = (tmp_path / "local" / f"{key}.safetensors").read_bytes()
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(raw)
    # a PayloadError raised in a replica crosses the process boundary intact
    err = pickle.loads(pickle.dumps(PayloadError("adapter_id", "unknown", 404)))
    assert (err.field, err.message, err.status) == ("adapter_id", "unknown", 404)


def test_adapters_per_replica_follow_the_memory_cap():
    from types import SimpleNamespace

    from serve.engine import adapters_per_replica

    engine = SimpleNamespace(adapter_bytes=2**20, cfg=SimpleNamespace(model=SimpleNamespace(llm="x")))
    assert adapters_per_replica(engine, ServeConfig(adapter_cache_mb=10.5)) == 10
    with pytest.raises(ValueError, match="cannot hold one adapter"):
        adapters_per_replica(engine, ServeConfig(adapter_cache_mb=0.5))


def test_template_answers_table():
    table = read_template_answers(DEFAULT_TEMPLATE_ANSWERS)
    assert table[2] == ["no", "yes"] and len(table) == 70


def test_multipart_parser():
    body = (b"--XX\r\nContent-Disposition: form-data; name=\"question\"\r\n\r\nwhat?\r\n"
            b"--XX\r\nContent-Disposition: form-data; name=\"dat\"; filename=\"r.dat\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n\x00\x01\xff\r\n--XX--\r\n")  # fmt: skip
    fields = _multipart("multipart/form-data; boundary=XX", body)
    assert fields == {"question": b"what?", "dat": b"\x00\x01\xff"}
    with pytest.raises(PayloadError) as info:
        _multipart("application/json", body)
    assert info.value.status == 415


def test_body_limit_refuses_before_parsing():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    app.add_middleware(BodyLimit)
    app.state.max_body_bytes = 100
    seen = []

    @app.post("/echo")
    async def echo(body: dict) -> dict:
        seen.append(body)
        return body

    client = TestClient(app)
    assert client.post("/echo", json={"a": 1}).json() == {"a": 1}
    r = client.post(
        "/echo", content=b'{"a": "' + b"x" * 200 + b'"}', headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["field"] == "body" and len(seen) == 1

    def chunks():  # no content-length: counted while streaming
        for _ in range(10):
            yield b"x" * 20

    r = client.post("/echo", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and len(seen) == 1


def test_client_payload_helpers(tmp_path):
    from serve.client import array_payload, load_support, wfdb_payload

    x = record()
    payload = wfdb_ecg(x, tmp_path, name="r1")
    assert wfdb_payload(tmp_path / "r1.hea") == payload
    np.testing.assert_array_equal(canon(array_payload(x, 100, MIMIC_ORDER)).signal, canon(json_ecg(x)).signal)
    np.testing.assert_array_equal(
        canon(array_payload(x, 100, MIMIC_ORDER, "json")).signal, canon(json_ecg(x)).signal
    )
    (tmp_path / "support.json").write_text('[{"ecg": "r1.hea", "question": "q?", "answer": ["yes"]}]')
    assert load_support(tmp_path / "support.json") == [{"ecg": payload, "question": "q?", "answer": ["yes"]}]
    with pytest.raises(FileNotFoundError, match="nope.hea"):
        wfdb_payload(tmp_path / "nope.hea")
    with pytest.raises(ValueError, match="expected \\(12 leads"):
        array_payload(x.T, 100, MIMIC_ORDER)


def test_serve_and_ask_help_and_config_yaml():
    import subprocess
    import sys

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve.app import ServeArgs

    for command in ("serve", "ask"):
        out = subprocess.run(
            [sys.executable, "-m", "ecgray.cli", command, "--help"], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert ("--checkpoint" if command == "serve" else "--support") in out.stdout
    deploy = yaml.safe_load(open("serve/config.yaml"))
    ServeDeploySchema.model_validate(deploy)
    app = deploy["applications"][0]
    assert app["import_path"] == "serve.app:build_app" and deploy["http_options"]["host"] == "127.0.0.1"
    args = ServeArgs.model_validate(app["args"])
    assert deploy["proxy_location"] == "EveryNode" and "deployments" not in app  # one place: ServeConfig
    assert args.serve.max_replicas > args.serve.min_replicas and args.serve.adapter_max_replicas >= 1
    with pytest.raises(ValidationError):
        ServeArgs.model_validate({"serve": {"max_batch": 3}})


def test_serve_cli_refuses_model_overrides_before_starting_ray(capsys, tmp_path, monkeypatch):
    from ecgray.cli import main

    monkeypatch.chdir(tmp_path)  # the command's log goes to the default run_dir (runs/default/logs)

    assert main(["serve", "--checkpoint", "ckpt", "--set", "model.llm=tiny-llama"]) == 2
    assert "only serve.* keys apply" in capsys.readouterr().err


def test_openapi_schema_states_what_validation_enforces(tmp_path):
    """Every body the schema admits here is served, and bodies validation refuses for a rule the schema can
    state (lead names, base64, sampling rate, one ECG form, one answer mode, the limits, template ids) are
    refused by the schema too: a schema-driven client generates only requests the service accepts."""
    import jsonschema

    from serve.app import openapi_with_limits

    templates = read_template_answers(DEFAULT_TEMPLATE_ANSWERS)
    schema = openapi_with_limits(LIMITS, list(templates))
    components = schema["components"]

    def validator(name: str):
        return jsonschema.Draft202012Validator(
            {"$ref": f"#/components/schemas/{name}", "components": components}
        )

    answer, adapt = validator("AnswerRequest"), validator("AdaptRequest")
    ecg = json_ecg(record())
    key = "ad-" + "0" * 32
    good = [
        {"question": "q?", "ecgs": [ecg], "zero_shot": True, "options": ["yes", "no"]},
        {"question": "q?", "ecgs": [b64_ecg(record())], "adapter_id": key, "template_id": 2},
        {"question": "q?", "ecgs": [wfdb_ecg(record(), tmp_path)], "support": [{"ecg": ecg, "question": "q?", "answer": "yes"}]},
        {"question": "q?", "ecgs": [json_ecg(record()[:2], ["i", "AVR"])], "zero_shot": True},
    ]  # fmt: skip
    for body in good:
        assert answer.is_valid(body), list(answer.iter_errors(body))[:2]
        req = AnswerRequest.model_validate(body)  # and the service takes it
        check_limits(req, LIMITS)
        answer_mode(req, None)
        for i, e in enumerate(req.ecgs):
            canonical_ecg(e, f"ecgs[{i}]", LIMITS, DATA)
    bad = [
        {"question": "q?", "ecgs": [json_ecg(record()[:2], ["I", "foo"])], "zero_shot": True},  # lead name
        {"question": "q?", "ecgs": [{**b64_ecg(record()), "data": "@@@"}], "zero_shot": True},  # base64
        {"question": "q?", "ecgs": [json_ecg(record(), fs=1e9)], "zero_shot": True},  # sampling rate
        {"question": "q?", "ecgs": [{**ecg, "dtype": "float32"}], "zero_shot": True},  # dtype with signal
        {"question": "q?", "ecgs": [{"fs": 100, "leads": ["I"]}], "zero_shot": True},  # no form
        {"question": "q?", "ecgs": [ecg], "zero_shot": True, "adapter_id": key},  # two modes
        {"question": "q?", "ecgs": [ecg]},  # no mode
        {"question": "q?", "ecgs": [ecg], "adapter_id": "ad-unknown"},  # not an adapter id
        {"question": "q?", "ecgs": [ecg] * 3, "zero_shot": True},  # > max_queries
        {"question": "q?", "ecgs": [ecg], "zero_shot": True, "template_id": 999},  # unknown template
        {"question": " ", "ecgs": [ecg], "zero_shot": True},  # blank question
        {"question": "q?", "ecgs": [ecg], "zero_shot": True, "options": []},
        {"question": "q?", "ecgs": [{**b64_ecg(record()), "shape": [12]}], "zero_shot": True},
    ]  # fmt: skip
    for body in bad:
        assert not answer.is_valid(body), body
        with pytest.raises((ValidationError, PayloadError)):
            req = AnswerRequest.model_validate(body)
            check_limits(req, LIMITS)
            answer_mode(req, None)
            if req.template_id is not None and req.template_id not in templates:  # the ingress's check
                raise PayloadError("template_id", "unknown template")
            for i, e in enumerate(req.ecgs):
                canonical_ecg(e, f"ecgs[{i}]", LIMITS, DATA)
    item = {"ecg": ecg, "question": "q?", "answer": ["yes"]}
    assert adapt.is_valid({"support": [item] * 4})
    for body in ({"support": [item] * 5}, {"support": []}, {"support": [{**item, "answer": [" "]}]}):
        assert not adapt.is_valid(body), body


def test_serve_cli_replica_flags_are_checked_before_starting_ray(capsys, tmp_path, monkeypatch):
    import argparse

    from ecgray.cli import main
    from serve.app import add_arguments, required_cpus, serve_config

    monkeypatch.chdir(tmp_path)  # the command's log goes to the default run_dir (runs/default/logs)

    assert main(["serve", "--checkpoint", "ckpt", "--replicas", "2", "--min-replicas", "1"]) == 2
    assert "--replicas N is a fixed count" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", "ckpt", "--min-replicas", "3", "--max-replicas", "2"]) == 2
    assert "expected 1 <= min <= max" in capsys.readouterr().err
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--checkpoint", "ck", "--replicas", "3", "--adapter-store", "s3://b/a",
                              "--replica-cpus", "0.5", "--gpu", "--set", "serve.adapter_max_replicas=2"])  # fmt: skip
    cfg = serve_config(args)
    assert (cfg.min_replicas, cfg.max_replicas, cfg.adapter_store, cfg.use_gpu) == (3, 3, "s3://b/a", True)
    assert required_cpus(cfg) == (3 + 2) * 0.5


def test_build_app_options(tmp_path):
    from serve.app import ServeArgs, build_app

    cfg = ServeConfig(checkpoint="ckpt", adapter_store="adapters", min_replicas=1, max_replicas=3,
                      use_gpu=True, replica_cpus=2, max_queued_requests=9, adapter_max_queued_requests=2)  # fmt: skip
    app = build_app(ServeArgs(serve=cfg))
    ingress = app._bound_deployment
    adaptation, answering = ingress.init_args[1], ingress.init_args[2]
    plain = ingress.init_args[0]["serve"]
    assert Path(plain["checkpoint"]).is_absolute() and Path(plain["adapter_store"]).is_absolute()
    a, b = answering._bound_deployment, adaptation._bound_deployment
    assert (a.name, b.name, ingress.name) == ("Answering", "Adaptation", "ECGQAService")
    assert a.ray_actor_options == {"num_cpus": 2, "num_gpus": 1} == b.ray_actor_options
    assert a._deployment_config.autoscaling_config.max_replicas == 3 and b.num_replicas == 1
    assert a.max_queued_requests == 9 and b.max_queued_requests == 2
    assert ingress.ray_actor_options["num_cpus"] == 0


def test_comparison_items_carry_two_ecgs_in_order():
    from serve.payloads import SupportItem, canonical_item, check_kinds

    a, b = json_ecg(record(1)), json_ecg(record(2))
    item = {"question": "q?", "answer": "yes"}
    with pytest.raises(ValidationError, match="exactly one of ecg or ecg_pair"):
        SupportItem.model_validate({**item, "ecg": a, "ecg_pair": [a, b]})
    with pytest.raises(ValidationError):
        SupportItem.model_validate({**item, "ecg_pair": [a]})
    pair = canonical_support(
        AdaptRequest.model_validate({"support": [{**item, "ecg_pair": [a, b]}]}).support, LIMITS, DATA
    )
    swapped = canonical_support(
        AdaptRequest.model_validate({"support": [{**item, "ecg_pair": [b, a]}]}).support, LIMITS, DATA
    )
    assert isinstance(pair[0].ecg, tuple) and len(pair[0].ecg) == 2
    assert adapter_id(pair, "m") != adapter_id(swapped, "m")  # first and second are not a set
    with pytest.raises(PayloadError) as info:
        canonical_item(
            [ECGIn.model_validate(a), ECGIn.model_validate({**b, "leads": ["foo"] * 12})],
            "ecg_pairs[0]",
            LIMITS,
            DATA,
        )
    assert info.value.field.startswith("ecg_pairs[0][1]")
    with pytest.raises(ValidationError, match="exactly one of ecgs or ecg_pairs"):
        AnswerRequest.model_validate(
            {"question": "q?", "ecgs": [a], "ecg_pairs": [[a, b]], "zero_shot": True}
        )
    comparison = {50}
    for body, field in (
        ({"question": "q?", "ecgs": [a], "zero_shot": True, "template_id": 50}, "ecgs"),
        ({"question": "q?", "ecg_pairs": [[a, b]], "zero_shot": True, "template_id": 2}, "ecg_pairs"),
        ({"question": "q?", "ecgs": [a], "support": [{**item, "ecg_pair": [a, b]}]}, "ecgs"),
        ({"question": "q?", "ecg_pairs": [[a, b]], "support": [{**item, "ecg_pair": [a, b]}, {**item, "ecg": a}]},
         "support[1]"),
    ):  # fmt: skip
        with pytest.raises(PayloadError) as info:
            check_kinds(AnswerRequest.model_validate(body), comparison)
        assert info.value.field == field, (body, info.value)
    check_kinds(AnswerRequest.model_validate({"question": "q?", "ecg_pairs": [[a, b]], "zero_shot": True,
                                              "template_id": 50}), comparison)  # fmt: skip

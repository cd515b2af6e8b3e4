"""The service's OpenAPI contract against the running app on 127.0.0.1 (Ray Serve, tiny-llama): Schemathesis
with every check, fed the app's own /openapi.json, finds nothing -- bodies the schema admits are served (the
model-backed 200s included), bodies it refuses are refused, every status is documented, an undeclared
method is a 405 naming the allowed ones, and nothing is a 5xx."""

from __future__ import annotations

import base64
import math

import httpx
import numpy as np
import pytest
from test_serve import LEADS, QUESTION, TREE, ecg, free_port, running_service, tiny_checkpoint

pytestmark = pytest.mark.slow

MAX_DURATION_S = 4.0  # the service's serve.max_duration_s; the model's window is TREE's data.window_s
MAX_EXAMPLES = 50  # per operation: bounds the run (about 1,900 requests)
MAX_FS = 250  # generated ECGs are resampled to at most this rate: a few MB per request at most


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("openapi"), TREE)


@pytest.fixture(scope="module")
def url(ray_session, checkpoint, tmp_path_factory):
    from ecgray.config import ServeConfig

    # small limits, so that generated bodies stay small and quick to answer
    cfg = ServeConfig(checkpoint=str(checkpoint), port=free_port(), max_batch_size=8, batch_wait_timeout_s=0.05,
                      max_payload_mb=8.0, max_support=3, max_queries=2, max_options=4,
                      max_duration_s=MAX_DURATION_S, adapter_store=str(tmp_path_factory.mktemp("adapters")))  # fmt: skip
    yield from running_service(cfg, "ecgray-openapi")


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> tuple[bytes, bytes]:
    """A WFDB pair (.hea, .dat) the service reads: 12 leads, 3 s at 100 Hz."""
    import wfdb

    out = tmp_path_factory.mktemp("wfdb")
    x = np.asarray(ecg(7)["signal"])  # (12, 300)
    wfdb.wrsamp("rec", fs=100, units=["mV"] * 12, sig_name=LEADS, p_signal=x.T, fmt=["16"] * 12,
                write_dir=str(out))  # fmt: skip
    return (out / "rec.hea").read_bytes(), (out / "rec.dat").read_bytes()


class Relations:
    """Schemathesis hooks. `fit` (map_case) makes the relations JSON Schema cannot state true in every request Schemathesis
    generates as valid (the schema's descriptions state them), and leaves everything the schema states as
    generated -- forms, nulls, lead names, dtypes, modes, templates, texts, counts. Without it hardly any
    generated ECG would be servable, and "valid data accepted" would test nothing but the relations.

    The relations: one signal row per lead, all of one length; data of shape[0] x shape[1] values of dtype;
    seconds = samples / fs between the model's window and serve.max_duration_s, fs a ratio of small
    integers; lead names and options distinct after stripping, letter case ignored; a WFDB pair that
    parses; the multiplexed-model header names the body's adapter_id when both are given."""

    def __init__(self, record: tuple[bytes, bytes], openapi: dict):
        import jsonschema

        self.hea, self.dat = record
        self.seconds = (TREE["data"]["window_s"] + MAX_DURATION_S) / 2
        self.openapi = openapi
        self.validator = jsonschema.Draft202012Validator

    def fit(self, case):
        from serve.payloads import MULTIPLEX_HEADER

        if case.meta is None or not case.meta.generation.mode.is_positive or not self.valid(case):
            return case
        body = case.body
        if "hea" in body:  # the upload: its one query ECG as a WFDB pair
            body["hea"], body["dat"] = self.hea, self.dat
        for item in body.get("support") or []:
            self.ecgs(item.get("ecg"), *(item.get("ecg_pair") or []))
        self.ecgs(*(body.get("ecgs") or []), *(e for pair in body.get("ecg_pairs") or [] for e in pair))
        if body.get("options"):
            body["options"] = distinct(body["options"])
        if case.headers and case.headers.get(MULTIPLEX_HEADER) not in (None, body.get("adapter_id")):
            del case.headers[MULTIPLEX_HEADER]
        assert self.valid(case), "the hook broke a schema rule"
        return case

    def ecgs(self, *ecgs) -> None:
        for e in ecgs:
            if e is None:
                continue
            if e.get("wfdb") is not None:
                e["wfdb"] = {"header": self.hea.decode(), "dat": base64.b64encode(self.dat).decode()}
                continue
            e["fs"] = float(min(round(e["fs"]), MAX_FS))
            n = math.ceil(self.seconds * e["fs"])
            if e.get("signal") is not None:
                rows = e["signal"][: len(distinct(e["leads"]))]
                e["signal"] = [(row * math.ceil(n / len(row)))[:n] for row in rows]
            else:
                rows = distinct(e["leads"])[: int(e["shape"][0])]
                zeros = np.zeros((len(rows), n), dtype={"float32": "<f4", "float16": "<f2"}[e["dtype"]])
                e["data"], e["shape"] = base64.b64encode(zeros.tobytes()).decode(), list(zeros.shape)
            e["leads"] = distinct(e["leads"])[: len(rows)]

    def checkable(self, case) -> bool:
        """Schemathesis cannot check a body with binary parts against the schema, and its coverage phase takes
        some such bodies for valid without checking (two answer modes, say): those are left out."""
        from schemathesis.transport.serialization import Binary

        if case.meta is None or not case.meta.generation.mode.is_positive or not isinstance(case.body, dict):
            return True
        return self.valid(case) or not any(isinstance(v, (bytes, Binary)) for v in case.body.values())

    def valid(self, case) -> bool:
        """Whether the body conforms to the schema (bytes stand for themselves: any bytes are binary)."""
        from schemathesis.transport.serialization import Binary

        if not isinstance(case.body, dict):
            return False
        operation = self.openapi["paths"][case.operation.path][case.method.lower()]
        body = operation["requestBody"]["content"][case.media_type]["schema"]
        plain = {k: "" if isinstance(v, (bytes, Binary)) else v for k, v in case.body.items()}
        return self.validator({**body, "components": self.openapi["components"]}).is_valid(plain)


def distinct(names: list[str]) -> list[str]:
    """The first of each name, compared as the service does (stripped, letter case ignored)."""
    seen, out = set(), []
    for name in names:
        if name.strip().lower() not in seen:
            seen.add(name.strip().lower())
            out.append(name)
    return out


def test_schemathesis_finds_nothing(url, record):
    import schemathesis
    from schemathesis.engine import events, from_schema

    config = schemathesis.Config.from_dict({
        "seed": 0,
        "workers": 1,
        "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
        # an invalid body gets one of the service's documented refusals: 413 (over a limit) among them
        "checks": {"negative_data_rejection": {"expected-statuses": [400, 404, 405, 413, 415, 422]}},
    })  # fmt: skip
    config.projects.override.checks.update(included_check_names=["all"])
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=config)
    relations = Relations(record, httpx.get(f"{url}/openapi.json").json())

    @schema.hook("filter_case")
    def checkable(context, case):
        return relations.checkable(case)

    @schema.hook("map_case")
    def fit(context, case):
        return relations.fit(case)

    findings, statuses, requests = [], {}, 0
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            for interaction in event.recorder.interactions.values():
                requests += 1
                if interaction.response is not None:
                    key = (interaction.request.method, httpx.URL(interaction.request.uri).path)
                    statuses.setdefault(key, set()).add(interaction.response.status_code)
            for case_id, checks in event.recorder.checks.items():
                for info in (c.failure_info for c in checks if c.failure_info is not None):
                    response = event.recorder.interactions[case_id].response
                    answer = (
                        f"{response.status_code} {response.content[:500]!r}" if response else "no response"
                    )
                    findings.append(f"{info.failure.operation} ({event.phase.value}): {info.failure.title}\n"
                                    f"{info.failure.message}\n{answer}\n{info.code_sample}")  # fmt: skip
        elif isinstance(event, events.NonFatalError):
            findings.append(event.info.format())
        elif isinstance(event, events.FatalError):
            raise event.exception
    assert not findings, f"{len(findings)} findings; the first:\n" + "\n\n".join(findings[:3])
    # the generated valid requests reached the model: every operation answered 200 at least once
    for op in (("GET", "/healthz"), ("GET", "/v1/info"), ("POST", "/v1/adapt"), ("POST", "/v1/answer"),
               ("POST", "/v1/answer/upload")):  # fmt: skip
        assert 200 in statuses.get(op, ()), (op, statuses.get(op))
    print(f"schemathesis: {requests} requests; statuses {sorted((*k, sorted(v)) for k, v in statuses.items())}")  # fmt: skip


def test_undeclared_method_names_the_allowed_ones(url):
    for method, path, allowed in (("TRACE", "/healthz", "GET"), ("DELETE", "/v1/answer", "POST"),
                                  ("GET", "/v1/adapt", "POST")):  # fmt: skip
        r = httpx.request(method, f"{url}{path}", timeout=30)
        assert r.status_code == 405 and r.headers["allow"] == allowed, (method, path, r.headers)
        assert r.json()["field"] == "method"


def test_null_means_absent_in_schema_and_service(url):
    """`"ecg": null` beside `ecg_pair`, `"dtype": null` on a signal: the schema admits what the service
    serves; `"ecg": null` alone and `"dtype": null` beside base64 data: both refuse."""
    import jsonschema

    openapi = httpx.get(f"{url}/openapi.json").json()

    def admits(name: str, body: dict) -> bool:
        schema = {"$ref": f"#/components/schemas/{name}", "components": openapi["components"]}
        return jsonschema.Draft202012Validator(schema).is_valid(body)

    one, pair = ecg(1), [ecg(2), ecg(3)]
    b64 = {"fs": 100, "leads": ["I"], "data": base64.b64encode(np.zeros(300, "<f4").tobytes()).decode(),
           "shape": [1, 300]}  # fmt: skip
    cases = [
        ("AdaptRequest", "/v1/adapt", {"support": [{"ecg": None, "ecg_pair": pair, "question": QUESTION, "answer": "no"}]}, 200),
        ("AdaptRequest", "/v1/adapt", {"support": [{"ecg": None, "question": QUESTION, "answer": "no"}]}, 422),
        ("AnswerRequest", "/v1/answer", {"question": QUESTION, "ecgs": [{**one, "dtype": None, "shape": None}], "zero_shot": True}, 200),
        ("AnswerRequest", "/v1/answer", {"question": QUESTION, "ecgs": [{**b64, "dtype": None}], "zero_shot": True}, 422),
        ("AnswerRequest", "/v1/answer", {"question": QUESTION, "ecgs": [{**b64, "dtype": "float32"}], "zero_shot": True,
                                         "adapter_id": None, "support": None, "options": None, "template_id": None}, 200),
    ]  # fmt: skip
    for name, path, body, status in cases:
        r = httpx.post(f"{url}{path}", json=body, timeout=120)
        assert r.status_code == status, (body, r.text[:300])
        assert admits(name, body) == (status == 200), body

"""`ecgray serve`: the few-shot ECG question-answering service on Ray Serve.

    POST /v1/adapt          support set -> adapter id (inner loop run once, fast weights in the adapter store)
    POST /v1/answer         query ECG(s) + question with adapter_id | inline support | zero_shot=true
    POST /v1/answer/upload  the same with one query ECG uploaded as a WFDB pair (multipart: hea, dat)
    GET  /healthz, /v1/info, /docs, /openapi.json

Three deployments composed with DeploymentHandles:
    ECGQAService  HTTP ingress (FastAPI): validation, limits, ECG decoding to the training window; no model
    Adaptation    the inner loop, apart from answering; writes the fast weights to serve.adapter_store
    Answering     batched answers (`@serve.batch`: one frozen-LLM pass for concurrent requests); adapters
                  loaded through Serve model multiplexing, so any replica can answer any adapter_id and
                  requests for one adapter go to replicas that hold it

Deploy: `ecgray serve --checkpoint DIR [--replicas N | --min-replicas A --max-replicas B]` (this module's
`run`), or `serve deploy serve/config.yaml` (import path `serve.app:build_app`, typed args `ServeArgs`).
A full queue is a 503 with Retry-After at once; bad input of any kind is a 4xx JSON error naming the field;
bodies above serve.max_payload_mb are refused before they are parsed.
"""

import argparse
import asyncio
import base64
import copy
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from email.parser import BytesParser
from email.policy import HTTP

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ecgray.config import ServeConfig
from ecgray.logs import say
from serve.payloads import (
    ADAPTER_ID_SCHEMA,
    MODES,
    MULTIPLEX_HEADER,
    AdaptRequest,
    AnswerRequest,
    PayloadError,
    adapter_id,
    answer_mode,
    canonical_item,
    canonical_support,
    check_kinds,
    check_limits,
    kind_schema,
    kinds_schema,
)


class ServeArgs(BaseModel):
    """Typed arguments of the application (`args:` in serve/config.yaml)."""

    model_config = ConfigDict(extra="forbid")
    serve: ServeConfig = Field(default_factory=ServeConfig)
    """Limits, host, port and the checkpoint (required)."""
    llm: str | None = None
    """Override of the checkpoint's model.llm (e.g. the same mapper on another copy of the LLM)."""


# ------------------------------------------------------------------------------------------- HTTP glue
class FieldError(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    """Every refusal: `error` is "field: message"; `errors` lists each fault of a body that has several."""

    error: str
    field: str
    message: str
    errors: list[FieldError] | None = None


_REFUSALS = {
    400: "Malformed JSON, or a Content-Length that is not a number",
    404: "Unknown adapter_id: never adapted by this service, or removed from its adapter store",
    413: "A body above serve.max_payload_mb, more support items or queries than the service takes, or an ECG "
    "longer than serve.max_duration_s",
    415: "Not multipart/form-data with a boundary",
    422: "A field breaks a rule: `field` names it, `message` says what was expected",
    503: "At capacity (a deployment's queue is full): retry after Retry-After seconds",
}


def _responses(*codes: int) -> dict:
    """The refusals of an operation, beside those of every request: 400 / 413 (BodyLimit, before routing)
    and 503 (a full queue behind the ingress)."""
    codes = sorted({400, 413, 503, *codes})
    out = {code: {"model": ErrorBody, "description": _REFUSALS[code]} for code in codes}
    out[503]["headers"] = {"Retry-After": {"description": "seconds", "required": True,
                                           "schema": {"type": "integer", "minimum": 1}}}  # fmt: skip
    return out


_MULTIPLEX_PARAMETER = {
    "name": MULTIPLEX_HEADER, "in": "header", "required": False, "schema": ADAPTER_ID_SCHEMA,
    "description": "the adapter id, instead of `adapter_id` in the body (then the body names no other mode: "
                   "no support, no zero_shot=true) or equal to it: Serve routes the request to replicas that "
                   "hold that adapter",
}  # fmt: skip
_UPLOAD_JSON_PARTS = ("support", "template_id", "zero_shot")
"""Parts of /v1/answer/upload read as JSON; question and adapter_id are text, options a text part per option
(multipart's form of an array of strings), hea and dat bytes."""
_UPLOAD_FIELDS = {"hea", "dat", "question", "adapter_id", "options", *_UPLOAD_JSON_PARTS}


def _error(status: int, field: str, message: str, errors: list | None = None) -> JSONResponse:
    body = {"error": f"{field}: {message}", "field": field, "message": message}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status)


class BodyLimit:
    """ASGI middleware: a body over `app.state.max_body_bytes` is refused (413) before anything parses it;
    the body is read here (bounded) and replayed to the app."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = scope["app"].state.max_body_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await _error(400, "content-length", f"{declared[:40]!r} is not an integer")(
                    scope, receive, send
                )
            if size > limit:
                return await _error(
                    413, "body", f"{size} bytes; at most serve.max_payload_mb ({limit} bytes)"
                )(scope, receive, send)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                return await _error(413, "body", f"more than serve.max_payload_mb ({limit} bytes)")(
                    scope, receive, send
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


api = FastAPI(
    title="ecgray few-shot ECG question answering",
    version="0.1.0",
    description=__doc__.split("\n\n")[1] if __doc__ else None,
)
api.add_middleware(BodyLimit)
api.state.max_body_bytes = int(ServeConfig().max_payload_mb * 2**20)


@api.exception_handler(PayloadError)
async def _payload_error(request: Request, err: PayloadError):
    return _error(err.status, err.field, err.message)


def _loc(loc) -> str:
    out = ""
    for part in loc:
        if part in ("body",) and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _validation_errors(errors: list) -> tuple[int, list[dict]]:
    out, status = [], 422
    for e in errors:
        if e.get("type") == "json_invalid":
            status = 400
            ctx = e.get("ctx") or {}
            out.append({"field": "body", "message": f"malformed JSON ({ctx.get('error', e.get('msg'))})"})
            continue
        field = _loc(e.get("loc", ()))
        if e.get("type") in ("extra_forbidden",):
            message = "unknown field"
        elif e.get("type") == "missing":
            message = "field required"
        else:
            message = str(e.get("msg"))
        out.append({"field": field, "message": message})
    return status, out


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException):
    # FastAPI's own refusals (undecodable body, unknown path, wrong method) in the same JSON shape
    field = {404: "path", 405: "method"}.get(err.status_code, "body")
    response = _error(err.status_code, field, str(err.detail))
    response.headers.update(err.headers or {})  # a 405 names the allowed methods (Allow), as RFC 9110 asks
    return response


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError):
    status, errors = _validation_errors(err.errors())
    first = errors[0] if errors else {"field": "body", "message": "invalid request"}
    return _error(status, first["field"], first["message"], errors)


def _multipart(
    content_type: str, body: bytes, repeated: tuple[str, ...] = ()
) -> dict[str, bytes | list[bytes]]:
    """multipart/form-data -> field name -> bytes, or the list of its parts for the names in `repeated` (the
    standard library's MIME parser; no extra dependency)."""
    if not content_type.lower().startswith("multipart/form-data") or "boundary=" not in content_type:
        raise PayloadError(
            "content-type", f"{content_type[:80]!r}: expected multipart/form-data with a boundary", 415
        )
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise PayloadError("body", "not a multipart/form-data body")
    fields: dict[str, bytes | list[bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise PayloadError("body", "a multipart part without a name")
        payload = part.get_payload(decode=True) or b""
        if name in repeated:
            fields.setdefault(str(name), []).append(payload)
        elif name in fields:
            raise PayloadError(str(name), "given twice")
        else:
            fields[str(name)] = payload
    return fields


def openapi_with_limits(cfg: ServeConfig, template_ids: list[int], data_cfg=None) -> dict:
    """The OpenAPI schema with this service's limits stated (max items of ecgs / support / options, the
    known template ids and which kind of query each takes, the window its model reads), so a schema-driven
    client generates only requests validation accepts. Relations JSON Schema cannot state (rows = leads,
    bytes = shape x dtype size, seconds = samples / fs, a WFDB pair that parses) are in the descriptions."""

    def array(prop: dict) -> dict:  # the array branch of `list | None`
        return next((b for b in prop.get("anyOf", [prop]) if b.get("type") == "array"), prop)

    schema = copy.deepcopy(FastAPI.openapi(api))  # FastAPI's own, not the api.openapi that serves this one
    models = schema["components"]["schemas"]
    answer, adapt = models["AnswerRequest"]["properties"], models["AdaptRequest"]["properties"]
    array(answer["ecgs"])["maxItems"] = cfg.max_queries
    array(answer["ecg_pairs"])["maxItems"] = cfg.max_queries
    array(answer["options"])["maxItems"] = cfg.max_options
    array(answer["support"])["maxItems"] = cfg.max_support
    adapt["support"]["maxItems"] = cfg.max_support
    integer = next(b for b in answer["template_id"]["anyOf"] if b.get("type") == "integer")
    integer["enum"] = sorted(template_ids)
    comparison = comparison_templates()
    models["AnswerRequest"]["allOf"].append(kinds_schema(template_ids, comparison))
    models["AnswerUpload"] = _upload_form(models["AnswerRequest"], template_ids, comparison)
    ecg = models["ECGIn"]
    ecg["description"] = ecg.get("description", "") + (
        f" Between the model's window and serve.max_duration_s={cfg.max_duration_s:g} s long"
        + (
            f" (the model reads {data_cfg.window_s:g} s at {data_cfg.fs} Hz)."
            if data_cfg is not None
            else "."
        )
    )
    return schema


def _upload_form(answer: dict, template_ids: list[int], comparison: set[int]) -> dict:
    """The multipart form of /v1/answer/upload: AnswerRequest's fields, with one query ECG uploaded as a WFDB
    pair (hea, dat) in place of ecgs / ecg_pairs; support, template_id and zero_shot are read as JSON, options
    are a part each."""
    form = copy.deepcopy(answer)
    props = form["properties"]
    del props["ecgs"], props["ecg_pairs"]
    for name in set(props) - set(_UPLOAD_JSON_PARTS):  # a text part has no null ("null" is text)
        props[name] = next((b for b in props[name].get("anyOf", []) if b.get("type") != "null"), props[name])
    props["hea"] = {"type": "string", "format": "binary", "description": "the record's .hea file (text)"}
    props["dat"] = {"type": "string", "format": "binary", "description": "the record's .dat file"}
    form["required"] = ["hea", "dat", *form["required"]]
    form["allOf"] = [MODES, kind_schema("single", template_ids, comparison)]  # its one query is one ECG
    form["title"] = "AnswerUpload"
    form.pop("description", None)
    return form


def comparison_templates() -> set[int]:
    """ECG-QA's comparison templates (two ECGs per sample): their queries are pairs."""
    from ecgray.config import COMPARISON_TYPES
    from ecgray.synth.ecgqa import TEMPLATES

    return {tid for tid, (qtype, _, _) in TEMPLATES.items() if qtype in COMPARISON_TYPES}


# ------------------------------------------------------------------------------------------ deployments
# NB: Serve serialises the classes when they are decorated: everything they use must be defined above them.
class Overloaded(Exception):
    """A deployment's queue is full (max_queued_requests): 503 with Retry-After, at once."""

    def __init__(self, what: str, retry_after_s: float):
        super().__init__(what, retry_after_s)
        self.what, self.retry_after_s = what, retry_after_s


@api.exception_handler(Overloaded)
async def _overloaded(request: Request, err: Overloaded):
    response = _error(503, err.what, f"at capacity; retry after {err.retry_after_s:g} s")
    response.headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
    return response


async def _remote(response, what: str, retry_after_s: float):
    """Await a DeploymentHandle call; a full queue becomes Overloaded, a PayloadError raised in the replica
    is re-raised here as itself (the 4xx it stands for)."""
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError

    try:
        return await response
    except BackPressureError:
        raise Overloaded(what, retry_after_s) from None
    except RayTaskError as err:
        if isinstance(err.cause, PayloadError):
            raise err.cause from None
        raise


def _engine(args: ServeArgs):
    """The checkpoint's engine on this replica's device: the GPU Ray assigned (`serve.use_gpu`; Ray sets
    CUDA_VISIBLE_DEVICES, so cuda:0 is that GPU), else the CPU even where a GPU is visible."""
    import torch

    from serve.engine import load_engine

    cfg = args.serve
    torch.set_num_threads(max(1, int(cfg.replica_cpus)))
    if cfg.use_gpu and not torch.cuda.is_available():
        raise RuntimeError("serve.use_gpu=true but this replica sees no CUDA device")
    return load_engine(cfg.checkpoint, args.llm, device="cuda" if cfg.use_gpu else "cpu")


def _replica_id() -> str:
    """This replica's full id, which is also its actor's name in Serve's namespace."""
    return serve.get_replica_context().replica_id.to_full_id_str()


@serve.deployment
class Adaptation:
    """Adaptation replicas: the inner loop on a support set (seconds of gradient steps), the fast weights
    written to the adapter store under their content-addressed id. Apart from answering, so adaptation never
    takes an answer replica's cores or its request budget."""

    def __init__(self, args: dict):
        from serve.adapters import AdapterStore

        self.args = ServeArgs.model_validate(args)
        self.engine = _engine(self.args)
        self.store = AdapterStore(self.args.serve.adapter_store)
        self._inflight: dict[str, asyncio.Future] = {}
        self._adapt_pool = ThreadPoolExecutor(1, thread_name_prefix="adapt")  # one inner loop at a time
        self._probe_pool = ThreadPoolExecutor(1, thread_name_prefix="probe")  # health: not behind it
        self.counters = {"adaptations": 0, "store_hits": 0, "shared_inflight": 0}

    async def adapt(self, support: list) -> dict:
        """Canonical support samples -> {adapter_id, adapted}; adapted False when the store has it already
        or the same support set is being adapted right now (that run is shared)."""
        key = adapter_id(support, self.engine.model_id)
        if key not in self._inflight and await asyncio.to_thread(self.store.exists, key):
            self.counters["store_hits"] += 1
            return {"adapter_id": key, "adapted": False}
        if key in self._inflight:  # checked again: another call may have started it meanwhile
            self.counters["shared_inflight"] += 1
            await asyncio.shield(self._inflight[key])
            return {"adapter_id": key, "adapted": False}
        self._inflight[key] = asyncio.ensure_future(self._adapt(key, support))
        await asyncio.shield(self._inflight[key])
        return {"adapter_id": key, "adapted": True}

    async def _adapt(self, key: str, support: list) -> None:
        try:
            loop = asyncio.get_running_loop()
            fast, _ = await loop.run_in_executor(
                self._adapt_pool, self.engine.adapt, [(s.ecg, s.question, s.answer) for s in support]
            )
            await asyncio.to_thread(self.store.save, key, fast, self.engine.model_id)
            self.counters["adaptations"] += 1
        finally:
            self._inflight.pop(key, None)

    async def check_health(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._probe_pool, self.engine.probe)

    async def info(self) -> dict:
        return {"replica": _replica_id(), **self.counters, "adapting_now": len(self._inflight),
                "adapter_store": self.store.location}  # fmt: skip


@serve.deployment
class Answering:
    """Answer replicas: each call is a batch of queries for one adapter (formed by the ingress), answered in
    one encoder + frozen-LLM pass. Adapters are loaded from the store through Serve model multiplexing (the
    adapter id is the model id), so calls for an adapter go to replicas that hold it, any replica can load
    it, and each replica keeps at most as many as fit serve.adapter_cache_mb (least recently used unloaded
    first)."""

    def __init__(self, args: dict):
        from serve.adapters import AdapterNotFound, AdapterStore
        from serve.engine import adapters_per_replica

        self.args = ServeArgs.model_validate(args)
        cfg = self.args.serve
        self.engine = _engine(self.args)
        self.store = AdapterStore(cfg.adapter_store)
        self._answer_pool = ThreadPoolExecutor(1, thread_name_prefix="answer")  # one pass at a time
        self.counters = {"queries": 0, "batches": 0, "max_batch": 0, "adapter_loads": 0}

        async def load_adapter(key: str) -> dict:
            self.counters["adapter_loads"] += 1
            try:
                weights = await asyncio.to_thread(self.store.load, key, self.engine.model_id)
            except AdapterNotFound:
                raise PayloadError(
                    "adapter_id",
                    f"unknown adapter {key!r} (never adapted by this service, or removed from "
                    f"{cfg.adapter_store}): POST /v1/adapt again or send the support set inline",
                    404,
                ) from None
            return {k: v.to(self.engine.device) for k, v in weights.items()}

        self.adapter = serve.multiplexed(max_num_models_per_replica=adapters_per_replica(self.engine, cfg))(
            load_adapter
        )

    async def answer(self, queries: list) -> dict:
        """Queries (canonical ECG, question, options) -> {answers: one each, replica}, with the adapter named
        by the multiplexed model id (none: the meta-learned weights)."""
        from serve.engine import Query

        key = serve.get_multiplexed_model_id()
        fast = await self.adapter(key) if key else None
        self.counters["queries"] += len(queries)
        self.counters["batches"] += 1
        self.counters["max_batch"] = max(self.counters["max_batch"], len(queries))
        batch = [Query(ecg, question, options, fast) for ecg, question, options in queries]
        answers = await asyncio.get_running_loop().run_in_executor(
            self._answer_pool, self.engine.answer, batch
        )
        return {"answers": answers, "replica": _replica_id()}

    async def probe(self) -> float:
        """Seconds a real probe forward takes (on the answering thread, between batches)."""
        return await asyncio.get_running_loop().run_in_executor(self._answer_pool, self.engine.probe)

    async def check_health(self) -> None:
        await self.probe()

    async def info(self) -> dict:
        return {**self.engine.info(), "replica": _replica_id(), "counters": self.counters}


@serve.deployment
@serve.ingress(api)
class ECGQAService:
    """The HTTP ingress: validation, limits and ECG decoding (to the canonical window, as in training), then
    DeploymentHandle calls to the adaptation and answer deployments. Holds no model.

    Batching happens here: query ECGs from concurrent requests are collected (`@serve.batch`, up to
    serve.max_batch_size, waiting at most serve.batch_wait_timeout_s) and sent as one call per adapter, so
    an answer replica receives whole batches -- a busy replica's event loop, which shares the interpreter
    with the forward pass, never has to gather them one request at a time."""

    def __init__(self, args: dict, adaptation, answering):
        from ecgray.models.checkpoint import load_checkpoint_config
        from serve.engine import DEFAULT_TEMPLATE_ANSWERS, read_template_answers

        self.args = ServeArgs.model_validate(args)
        cfg = self.args.serve
        self.cfg = cfg
        api.state.max_body_bytes = int(cfg.max_payload_mb * 2**20)
        self.data_cfg = load_checkpoint_config(cfg.checkpoint).data
        self.templates = read_template_answers(cfg.template_answers or DEFAULT_TEMPLATE_ANSWERS)
        self.comparison_templates = comparison_templates()
        self.adaptation, self.answering = adaptation, answering
        schema = openapi_with_limits(cfg, list(self.templates), self.data_cfg)
        # served as built: FastAPI would regenerate its own when Serve registers the routes on this replica
        api.openapi = lambda: schema
        # as many batches in flight as there can be answer replicas to take them
        self._answer_batch = serve.batch(
            max_batch_size=cfg.max_batch_size, batch_wait_timeout_s=cfg.batch_wait_timeout_s,
            max_concurrent_batches=cfg.max_replicas,
        )(self._run_batch)  # fmt: skip
        self.started = time.time()

    # -------------------------------------------------------------------------------------- helpers
    async def _canonical_queries(self, req: AnswerRequest) -> list:
        field = req.query_field
        return await asyncio.to_thread(
            lambda: [
                canonical_item(e, f"{field}[{i}]", self.cfg, self.data_cfg) for i, e in enumerate(req.queries)
            ]
        )

    async def _adapt(self, items, field: str = "support") -> tuple[dict, int]:
        support = await asyncio.to_thread(canonical_support, items, self.cfg, self.data_cfg, field)
        out = await _remote(self.adaptation.adapt.remote(support), "adaptation", self.cfg.retry_after_s)
        return out, len(support)

    def _options(self, req: AnswerRequest) -> tuple[list[str] | None, str | None]:
        if req.template_id is not None and req.template_id not in self.templates:
            raise PayloadError("template_id", f"{req.template_id} is not a known ECG-QA template")
        if req.options is not None:
            return [o.strip() for o in req.options], "request"
        if req.template_id is not None:
            return self.templates[req.template_id], "template"
        return None, None

    async def _run_batch(self, items: list[tuple]) -> list:
        """(adapter id or "", canonical ECG, question, options) items -> one answer dict each, or the
        PayloadError / Overloaded of its call: one call to the answer deployment per adapter."""
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item[0], []).append(i)
        out: list = [None] * len(items)

        async def run(key: str, index: list[int]) -> None:
            handle = self.answering.options(multiplexed_model_id=key)
            try:
                result = await _remote(
                    handle.answer.remote([items[i][1:] for i in index]), "answering", self.cfg.retry_after_s
                )
            except (PayloadError, Overloaded) as err:
                for i in index:
                    out[i] = err
                return
            for i, answer in zip(index, result["answers"], strict=True):
                out[i] = {**answer, "batch_size": len(items), "replica": result["replica"]}

        await asyncio.gather(*(run(key, index) for key, index in groups.items()))
        return out

    async def _answer(self, req: AnswerRequest) -> dict:
        check_limits(req, self.cfg)
        check_kinds(req, self.comparison_templates)
        mode = answer_mode(req, serve.get_multiplexed_model_id())
        options, source = self._options(req)
        adapted, key = False, req.adapter_id or serve.get_multiplexed_model_id() or None
        if mode == "support":
            out, _ = await self._adapt(req.support)
            key, adapted = out["adapter_id"], out["adapted"]
        queries = await self._canonical_queries(req)
        answers = await asyncio.gather(
            *(self._answer_batch((key or "", ecg, req.question, options)) for ecg in queries)
        )
        failed = next((a for a in answers if isinstance(a, Exception)), None)
        if failed is not None:
            raise failed
        return {
            "answers": answers,
            "adapter_id": key,
            "mode": mode,
            "adapted": adapted,
            "options_source": source,
        }

    # ------------------------------------------------------------------------------------- endpoints
    @api.get("/healthz", responses=_responses())
    async def healthz(self) -> dict:
        """A real probe forward on an answer replica (encoder, mapper, LLM option scoring)."""
        seconds = await _remote(self.answering.probe.remote(), "answering", self.cfg.retry_after_s)
        return {"status": "ok", "probe_ms": round(1000 * seconds, 1)}

    @api.get("/v1/info", responses=_responses())
    async def info(self) -> dict:
        """The model, the limits, and counters of one answer and one adaptation replica."""
        from ecgray.config import to_dict, versions

        answering = await _remote(self.answering.info.remote(), "answering", self.cfg.retry_after_s)
        adaptation = await _remote(self.adaptation.info.remote(), "adaptation", self.cfg.retry_after_s)
        return {**{k: v for k, v in answering.items() if k not in ("counters", "replica")},
                "serve": to_dict(self.cfg), "versions": versions(),
                "answer_replica": {"replica": answering["replica"], **answering["counters"]},
                "adaptation_replica": adaptation,
                "uptime_s": round(time.time() - self.started, 1)}  # fmt: skip

    @api.post("/v1/adapt", responses=_responses(422))
    async def adapt(self, req: AdaptRequest) -> dict:
        """Run the inner loop on a support set once; answer later with the returned adapter_id."""
        check_limits(req, self.cfg)
        check_kinds(req, self.comparison_templates)
        out, size = await self._adapt(req.support)
        return {**out, "support_size": size}

    @api.post(
        "/v1/answer", responses=_responses(404, 422), openapi_extra={"parameters": [_MULTIPLEX_PARAMETER]}
    )
    async def answer(self, req: AnswerRequest) -> dict:
        """Answer the question for each ECG in `ecgs`."""
        return await self._answer(req)

    @api.post(
        "/v1/answer/upload",
        responses=_responses(404, 415, 422),
        openapi_extra={"parameters": [_MULTIPLEX_PARAMETER], "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": {"$ref": "#/components/schemas/AnswerUpload"},
                                    "encoding": {"support": {"contentType": "application/json"}}}}}},
    )  # fmt: skip
    async def answer_upload(self, request: Request) -> dict:
        """One query ECG uploaded as a WFDB pair (multipart/form-data fields hea, dat) + the answer fields."""
        content_type = request.headers.get("content-type", "")
        fields = _multipart(content_type, await request.body(), repeated=("options",))
        unknown = sorted(set(fields) - _UPLOAD_FIELDS)
        if unknown:
            raise PayloadError(unknown[0], "unknown field")
        for name in ("hea", "dat"):
            if name not in fields:
                raise PayloadError(name, "missing: upload the record's .hea and .dat as multipart fields")
        try:
            header = fields["hea"].decode("utf-8")
        except UnicodeDecodeError:
            raise PayloadError("hea", "a WFDB header is text (UTF-8 / ASCII)") from None
        body: dict = {"ecgs": [{"wfdb": {"header": header, "dat": base64.b64encode(fields["dat"]).decode()}}]}
        for name in ("question", "adapter_id"):
            if name in fields:
                body[name] = fields[name].decode("utf-8", "replace")
        if "options" in fields:
            body["options"] = [part.decode("utf-8", "replace") for part in fields["options"]]
        for name in _UPLOAD_JSON_PARTS:
            if name in fields:
                try:
                    body[name] = json.loads(fields[name])
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise PayloadError(name, f"expected JSON ({err})") from None
        try:
            req = AnswerRequest.model_validate(body)
        except ValidationError as err:
            _, errors = _validation_errors(err.errors())
            raise PayloadError(errors[0]["field"], errors[0]["message"]) from None
        return await self._answer(req)


# ----------------------------------------------------------------------------------------- application
def _scaling(lo: int, hi: int, target: float, cfg: ServeConfig, what: str) -> dict:
    """Deployment options for a replica count: fixed where lo == hi, else autoscaling between them."""
    if not 1 <= lo <= hi:
        raise ValueError(f"serve.{what}: min {lo} / max {hi} replicas; expected 1 <= min <= max")
    if lo == hi:
        return {"num_replicas": lo}
    return {"autoscaling_config": {
        "min_replicas": lo, "max_replicas": hi, "target_ongoing_requests": target,
        "upscale_delay_s": cfg.upscale_delay_s, "downscale_delay_s": cfg.downscale_delay_s,
        "look_back_period_s": cfg.look_back_period_s, "metrics_interval_s": min(10.0, cfg.look_back_period_s / 2),
    }}  # fmt: skip


def required_cpus(cfg: ServeConfig) -> float:
    """Logical CPUs the application reserves at its largest (the ingress and the proxies reserve none)."""
    return (cfg.max_replicas + cfg.adapter_max_replicas) * cfg.replica_cpus


def build_app(args: ServeArgs) -> serve.Application:
    """The Serve application (`import_path: serve.app:build_app`): the ingress composed with the adaptation
    and answer deployments; args arrive validated as `ServeArgs`. Local paths resolve here, once."""
    from dataclasses import replace

    from ray.serve.config import BackpressureConfig

    from serve.adapters import resolve_location

    cfg = args.serve
    if cfg.checkpoint is None:
        raise ValueError("serve.checkpoint: required (a directory written by ecgray.models.checkpoint)")
    cfg = replace(cfg, checkpoint=resolve_location(cfg.checkpoint),
                  adapter_store=resolve_location(cfg.adapter_store))  # fmt: skip
    plain = args.model_copy(update={"serve": cfg}).model_dump(mode="json")
    backpressure = BackpressureConfig(status_code=503, retry_after_s=cfg.retry_after_s)
    overload = {"max_queued_requests": cfg.max_queued_requests, "backpressure_config": backpressure}
    replica = {"num_cpus": cfg.replica_cpus, **({"num_gpus": 1} if cfg.use_gpu else {})}  # fmt: skip
    answering = Answering.options(
        max_ongoing_requests=8,  # each request is a batch: a few queued per replica
        ray_actor_options=replica,
        health_check_period_s=cfg.health_check_period_s,
        **_scaling(cfg.min_replicas, cfg.max_replicas, cfg.target_ongoing_requests, cfg, "min/max_replicas"),
        **overload,
    ).bind(plain)
    adaptation = Adaptation.options(
        max_ongoing_requests=cfg.adapter_max_ongoing_requests,
        ray_actor_options=replica,
        health_check_period_s=cfg.health_check_period_s,
        **_scaling(cfg.adapter_min_replicas, cfg.adapter_max_replicas, 1.0, cfg, "adapter_min/max_replicas"),
        max_queued_requests=cfg.adapter_max_queued_requests,
        backpressure_config=backpressure,
    ).bind(plain)
    return ECGQAService.options(
        # Serve caps a batch at max_ongoing_requests: keep plenty of room above max_batch_size
        max_ongoing_requests=max(64, 4 * cfg.max_batch_size),
        ray_actor_options={"num_cpus": 0},
        **_scaling(1, cfg.max_replicas, 2.0 * cfg.max_batch_size, cfg, "min/max_replicas"),
        **overload,
    ).bind(plain, adaptation, answering)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ecgray.cli import add_config_arguments

    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint directory (mapper.safetensors + config.yaml)"
    )
    parser.add_argument("--llm", help="override the checkpoint's model.llm")
    parser.add_argument("--host", help="bind address (default serve.host = 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default serve.port = 8000)")
    parser.add_argument("--replicas", type=int, help="answer replicas, fixed (serve.min/max_replicas = N)")
    parser.add_argument("--min-replicas", type=int, help="autoscaling: answer replicas at least")
    parser.add_argument("--max-replicas", type=int, help="autoscaling: answer replicas at most")
    parser.add_argument("--adapter-store", help="directory or URI of the adapters (serve.adapter_store)")
    parser.add_argument("--replica-cpus", type=float, help="CPUs per replica (torch threads)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per replica (serve.use_gpu=true)")
    parser.add_argument(
        "--address", help="an existing Ray cluster (e.g. auto); default: start a local Ray here"
    )
    parser.add_argument("--num-cpus", type=int, help="logical CPUs of the local Ray started here")
    add_config_arguments(parser)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig of the command line: --config / --set serve.*, then the flags."""
    from ecgray.cli import config_from_args

    cfg = config_from_args(args).serve
    cfg.checkpoint = args.checkpoint
    flags = {"host": args.host, "port": args.port, "adapter_store": args.adapter_store,
             "replica_cpus": args.replica_cpus, "min_replicas": args.min_replicas,
             "max_replicas": args.max_replicas}  # fmt: skip
    if args.replicas is not None:
        if args.min_replicas is not None or args.max_replicas is not None:
            raise ValueError("--replicas N is a fixed count: give it or --min-replicas / --max-replicas")
        flags["min_replicas"] = flags["max_replicas"] = args.replicas
    for name, value in flags.items():
        if value is not None:
            setattr(cfg, name, value)
    if args.gpu:
        cfg.use_gpu = True
    return cfg


def log_location(args: argparse.Namespace) -> str:
    """The run directory whose logs/ holds the framework output (`ecgray.logs.console`): run_dir."""
    from ecgray.cli import config_from_args

    return config_from_args(args).run_dir


def run(args: argparse.Namespace) -> int:
    """Start (or join) Ray, deploy the app, serve until interrupted."""
    import os

    import ray

    outside = [o for o in args.overrides if not o.strip().startswith("serve.")]
    if outside:
        say(
            f"ecgray serve: only serve.* keys apply (the model comes from the checkpoint): {outside}",
            err=True,
        )
        return 2
    try:
        cfg = serve_config(args)
        sargs = ServeArgs(serve=cfg, llm=args.llm)
        app = build_app(sargs)
    except (ValueError, ValidationError) as err:
        say(f"ecgray serve: {err}", err=True)
        return 2
    if args.address:
        ray.init(address=args.address, include_dashboard=False)
    else:
        need = math.ceil(required_cpus(cfg))
        cpus = args.num_cpus or os.cpu_count() or 1
        if args.num_cpus is None and need > cpus:
            say(f"ecgray serve: the replicas reserve {need} CPUs; the local Ray gets {need} logical CPUs "
                  f"on {cpus} cores (replicas share them)")  # fmt: skip
            cpus = need
        ray.init(num_cpus=cpus, include_dashboard=False)
    serve.start(proxy_location="EveryNode", http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app, name="ecgray", route_prefix="/", blocking=False)
    say(f"ecgray serve: http://{cfg.host}:{cfg.port}/v1/info  (docs at /docs; Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0

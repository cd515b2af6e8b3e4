"""`ecgray serve`: the few-shot ECG question-answering service on Ray Serve (FastAPI ingress).

    POST /v1/adapt          support set -> adapter id (inner loop run once, fast weights cached per replica)
    POST /v1/answer         query ECG(s) + question with adapter_id | inline support | zero_shot=true
    POST /v1/answer/upload  the same with one query ECG uploaded as a WFDB pair (multipart: hea, dat)
    GET  /healthz, /v1/info, /docs, /openapi.json

Deploy: `ecgray serve --checkpoint DIR` (this module's `run`), or `serve deploy serve/config.yaml`
(import path `serve.app:build_app`, typed args `ServeArgs`).

Throughput: query ECGs from concurrent requests are batched by `@serve.batch` into one frozen-LLM pass;
adaptation runs on its own thread (and its own mapper copy), so answers for cached adapters keep flowing
while an inner loop runs. Bad input of any kind is a 4xx JSON error naming the field; bodies above
serve.max_payload_mb are refused before they are parsed.
"""

import argparse
import asyncio
import base64
import json
import sys
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
from serve.payloads import (
    AdaptRequest,
    AnswerRequest,
    PayloadError,
    adapter_id,
    canonical_ecg,
    canonical_support,
    check_limits,
)


class ServeArgs(BaseModel):
    """Typed arguments of the application (`args:` in serve/config.yaml)."""

    model_config = ConfigDict(extra="forbid")
    serve: ServeConfig = Field(default_factory=ServeConfig)
    """Limits, host, port and the checkpoint (required)."""
    llm: str | None = None
    """Override of the checkpoint's model.llm (e.g. the same mapper on another copy of the LLM)."""
    replica_cpus: float = Field(1.0, gt=0)
    """CPUs each replica reserves; torch uses that many threads."""


# ------------------------------------------------------------------------------------------- HTTP glue
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
    return _error(err.status_code, field, str(err.detail))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError):
    status, errors = _validation_errors(err.errors())
    first = errors[0] if errors else {"field": "body", "message": "invalid request"}
    return _error(status, first["field"], first["message"], errors)


def _multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    """multipart/form-data -> field name -> bytes (the standard library's MIME parser; no extra dependency)."""
    if not content_type.lower().startswith("multipart/form-data") or "boundary=" not in content_type:
        raise PayloadError(
            "content-type", f"{content_type[:80]!r}: expected multipart/form-data with a boundary", 415
        )
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise PayloadError("body", "not a multipart/form-data body")
    fields: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise PayloadError("body", "a multipart part without a name")
        if name in fields:
            raise PayloadError(str(name), "given twice")
        fields[str(name)] = part.get_payload(decode=True) or b""
    return fields


# ------------------------------------------------------------------------------------------ deployment
# NB: Serve serialises the class when it is decorated: everything it uses must be defined above it.
@serve.deployment(max_ongoing_requests=64)
@serve.ingress(api)
class ECGQAService:
    """One replica: the frozen models loaded once, an adapter LRU, a batching queue for answers."""

    def __init__(self, args: dict):
        import torch

        from serve.engine import (
            DEFAULT_TEMPLATE_ANSWERS,
            AdapterCache,
            load_engine,
            read_template_answers,
            serve_limits_check,
        )

        self.args = ServeArgs.model_validate(args)
        cfg = self.args.serve
        if cfg.checkpoint is None:
            raise ValueError("serve.checkpoint: required (a directory written by ecgray.models.checkpoint)")
        torch.set_num_threads(max(1, int(self.args.replica_cpus)))
        self.cfg = cfg
        api.state.max_body_bytes = int(cfg.max_payload_mb * 2**20)
        self.engine = load_engine(cfg.checkpoint, self.args.llm)
        serve_limits_check(self.engine, cfg)
        self.templates = read_template_answers(cfg.template_answers or DEFAULT_TEMPLATE_ANSWERS)
        self.cache = AdapterCache(int(cfg.adapter_cache_mb * 2**20))
        self._inflight: dict[str, asyncio.Future] = {}
        # one thread each: adaptation never queues behind answers and vice versa
        self._adapt_pool = ThreadPoolExecutor(1, thread_name_prefix="adapt")
        self._answer_pool = ThreadPoolExecutor(1, thread_name_prefix="answer")
        self.answer_batch.set_max_batch_size(cfg.max_batch_size)
        self.answer_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.counters = {
            "adaptations": 0,
            "adapter_cache_hits": 0,
            "queries": 0,
            "batches": 0,
            "max_batch": 0,
        }
        self.started = time.time()

    # -------------------------------------------------------------------------------------- helpers
    async def _canonical_support(self, items, field: str = "support"):
        return await asyncio.to_thread(canonical_support, items, self.cfg, self.engine.cfg.data, field)

    async def _adapter(self, support) -> tuple[str, dict, bool]:
        """(adapter id, fast weights, whether the inner loop ran for this call)."""
        key = adapter_id(support, self.engine.model_id)
        cached = self.cache.get(key)
        if cached is not None:
            self.counters["adapter_cache_hits"] += 1
            return key, cached, False
        if key in self._inflight:  # the same support set is being adapted right now: share that run
            self.counters["adapter_cache_hits"] += 1
            return key, await asyncio.shield(self._inflight[key]), False
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(
            self._adapt_pool, self.engine.adapt, [(s.ecg, s.question, s.answer) for s in support]
        )
        self._inflight[key] = asyncio.ensure_future(self._finish_adapt(key, future))
        return key, await asyncio.shield(self._inflight[key]), True

    async def _finish_adapt(self, key: str, future) -> dict:
        try:
            fast, _ = await future
            self.counters["adaptations"] += 1
            self.cache.put(key, fast)
            return fast
        finally:
            self._inflight.pop(key, None)

    def _options(self, req: AnswerRequest) -> tuple[list[str] | None, str | None]:
        if req.template_id is not None and req.template_id not in self.templates:
            raise PayloadError("template_id", f"{req.template_id} is not a known ECG-QA template")
        if req.options is not None:
            return [o.strip() for o in req.options], "request"
        if req.template_id is not None:
            return self.templates[req.template_id], "template"
        return None, None

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def answer_batch(self, queries: list) -> list[dict]:
        self.counters["batches"] += 1
        self.counters["max_batch"] = max(self.counters["max_batch"], len(queries))
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._answer_pool, self.engine.answer, queries)
        return [dict(r, batch_size=len(queries)) for r in results]

    async def _answer(self, req: AnswerRequest, ecgs) -> dict:
        from serve.engine import Query

        check_limits(req, self.cfg)
        options, source = self._options(req)
        if req.adapter_id is not None:
            fast = self.cache.get(req.adapter_id)
            if fast is None:
                raise PayloadError(
                    "adapter_id",
                    f"unknown adapter {req.adapter_id!r} on this replica (never adapted, evicted, or adapted on "
                    "another replica): POST /v1/adapt again or send the support set inline",
                    404,
                )
            self.counters["adapter_cache_hits"] += 1
            key, adapted = req.adapter_id, False
        elif req.support is not None:
            support = await self._canonical_support(req.support)
            key, fast, adapted = await self._adapter(support)
        else:
            key, fast, adapted = None, None, False
        queries = await ecgs()
        self.counters["queries"] += len(queries)
        results = await asyncio.gather(
            *(self.answer_batch(Query(ecg, req.question, options, fast)) for ecg in queries)
        )
        return {
            "answers": results,
            "adapter_id": key,
            "mode": "adapter_id" if req.adapter_id else "support" if req.support else "zero_shot",
            "adapted": adapted,
            "options_source": source,
        }

    # ------------------------------------------------------------------------------------- endpoints
    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/info")
    async def info(self) -> dict:
        from ecgray.config import to_dict, versions

        return {
            **self.engine.info(),
            "serve": to_dict(self.cfg),
            "versions": versions(),
            "counters": {**self.counters, "adapting_now": len(self._inflight)},
            "adapter_cache": {"entries": len(self.cache), "bytes": self.cache.bytes,
                              "max_bytes": self.cache.max_bytes, "evictions": self.cache.evictions},
            "uptime_s": round(time.time() - self.started, 1),
        }  # fmt: skip

    @api.post("/v1/adapt")
    async def adapt(self, req: AdaptRequest) -> dict:
        """Run the inner loop on a support set once; answer later with the returned adapter_id."""
        check_limits(req, self.cfg)
        support = await self._canonical_support(req.support)
        key, _, adapted = await self._adapter(support)
        return {"adapter_id": key, "adapted": adapted, "support_size": len(support)}

    @api.post("/v1/answer")
    async def answer(self, req: AnswerRequest) -> dict:
        """Answer the question for each ECG in `ecgs`."""

        async def ecgs():
            data = self.engine.cfg.data
            return await asyncio.to_thread(
                lambda: [canonical_ecg(e, f"ecgs[{i}]", self.cfg, data) for i, e in enumerate(req.ecgs)]
            )

        return await self._answer(req, ecgs)

    @api.post(
        "/v1/answer/upload",
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["hea", "dat", "question"],
            "properties": {"hea": {"type": "string", "format": "binary"}, "dat": {"type": "string", "format": "binary"},
                           "question": {"type": "string"}, "adapter_id": {"type": "string"},
                           "support": {"type": "string", "description": "JSON list of support items"},
                           "zero_shot": {"type": "boolean"}, "template_id": {"type": "integer"},
                           "options": {"type": "string", "description": "JSON list of options"}}}}}}},
    )  # fmt: skip
    async def answer_upload(self, request: Request) -> dict:
        """One query ECG uploaded as a WFDB pair (multipart/form-data fields hea, dat) + the answer fields."""
        fields = _multipart(request.headers.get("content-type", ""), await request.body())
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
        for name in ("support", "options", "template_id", "zero_shot"):
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

        async def ecgs():
            data = self.engine.cfg.data
            return await asyncio.to_thread(lambda: [canonical_ecg(req.ecgs[0], "ecgs[0]", self.cfg, data)])

        return await self._answer(req, ecgs)


# ----------------------------------------------------------------------------------------- application
def build_app(args: ServeArgs) -> serve.Application:
    """The Serve application (`import_path: serve.app:build_app`); args arrive validated as `ServeArgs`."""
    if args.serve.checkpoint is None:
        raise ValueError("serve.checkpoint: required (a directory written by ecgray.models.checkpoint)")
    cfg = args.serve
    deployment = ECGQAService.options(
        # Serve caps a batch at max_ongoing_requests: keep plenty of room above max_batch_size
        max_ongoing_requests=max(64, 4 * cfg.max_batch_size),
        ray_actor_options={"num_cpus": args.replica_cpus},
    )
    return deployment.bind(args.model_dump(mode="json"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ecgray.cli import add_config_arguments

    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint directory (mapper.safetensors + config.yaml)"
    )
    parser.add_argument("--llm", help="override the checkpoint's model.llm")
    parser.add_argument("--host", help="bind address (default serve.host = 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default serve.port = 8000)")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica (torch threads)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray started here (default: all)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Start a local Ray, deploy the app, serve until interrupted."""
    import ray

    from ecgray.cli import config_from_args

    outside = [o for o in args.overrides if not o.strip().startswith("serve.")]
    if outside:
        print(
            f"ecgray serve: only serve.* keys apply (the model comes from the checkpoint): {outside}",
            file=sys.stderr,
        )
        return 2
    cfg = config_from_args(args).serve
    cfg.checkpoint = args.checkpoint
    if args.host:
        cfg.host = args.host
    if args.port:
        cfg.port = args.port
    try:
        sargs = ServeArgs(serve=cfg, llm=args.llm, replica_cpus=args.replica_cpus)
    except ValidationError as err:
        print(f"ecgray serve: {err}", file=sys.stderr)
        return 2
    ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(sargs), name="ecgray", route_prefix="/", blocking=False)
    print(f"ecgray serve: http://{cfg.host}:{cfg.port}/v1/info  (docs at /docs; Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0

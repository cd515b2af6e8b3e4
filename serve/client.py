"""`ecgray ask` and `ECGQAClient`: a small httpx client of the few-shot QA service.

    ecgray ask --url http://127.0.0.1:8000 --support support.json --ecg record.hea --question "..."

support.json: a list of {"ecg": ..., "question": ..., "answer": [...]} where "ecg" is either an ECG payload
(serve/payloads.py) or the path of a WFDB header (.hea, relative to support.json), sent as a WFDB pair.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

import numpy as np


def wfdb_payload(header_path: str | Path) -> dict:
    """A WFDB record (its .hea and the .dat it names) as the service's `{"wfdb": ...}` ECG payload."""
    header_path = Path(header_path)
    if header_path.suffix != ".hea":
        header_path = header_path.with_suffix(".hea")
    if not header_path.is_file():
        raise FileNotFoundError(f"WFDB header {header_path}: not found")
    header = header_path.read_text()
    lines = [ln for ln in header.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    files = {ln.split()[0] for ln in lines[1:] if ln.split()}
    if len(files) != 1:
        raise ValueError(
            f"WFDB header {header_path}: expected one .dat file for all signals, got {sorted(files)}"
        )
    dat = header_path.parent / files.pop()
    if not dat.is_file():
        raise FileNotFoundError(f"WFDB record {header_path}: data file {dat.name} not found beside it")
    return {"wfdb": {"header": header, "dat": base64.b64encode(dat.read_bytes()).decode()}}


def array_payload(signal: np.ndarray, fs: float, leads: list[str], encoding: str = "float32") -> dict:
    """(leads, samples) array -> ECG payload: `json` numbers, or base64 little-endian float32 / float16."""
    signal = np.asarray(signal)
    if signal.ndim != 2 or signal.shape[0] != len(leads):
        raise ValueError(f"signal of shape {signal.shape}: expected ({len(leads)} leads, samples)")
    if encoding == "json":
        return {"fs": fs, "leads": list(leads), "signal": signal.tolist()}
    dtype = {"float32": "<f4", "float16": "<f2"}[encoding]
    data = base64.b64encode(np.ascontiguousarray(signal, dtype=dtype).tobytes()).decode()
    return {"fs": fs, "leads": list(leads), "data": data, "dtype": encoding, "shape": list(signal.shape)}


def load_support(path: str | Path) -> list[dict]:
    """support.json -> support items, with "ecg": "x.hea" paths turned into WFDB payloads."""
    path = Path(path)
    items = json.loads(path.read_text())
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a non-empty JSON list of support items")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "ecg" not in item:
            raise ValueError(f"{path}: item {i} must be an object with ecg, question, answer")
        ecg = item["ecg"]
        if isinstance(ecg, str):
            ecg = wfdb_payload(path.parent / ecg)
        out.append({**item, "ecg": ecg})
    return out


class ServiceError(RuntimeError):
    """A 4xx / 5xx answer of the service, with its JSON error."""

    def __init__(self, status: int, body: dict | str):
        self.status, self.body = status, body
        message = body.get("error", body) if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {message}")


class ECGQAClient:
    """Thin client: `adapt(support) -> adapter id`, `answer(...) -> response dict`, `info()`, `health()`."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 300.0):
        import httpx

        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ECGQAClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw) -> dict:
        r = self.http.request(method, path, **kw)
        try:
            body = r.json()
        except ValueError:
            body = r.text
        if r.status_code >= 400:
            raise ServiceError(r.status_code, body)
        return body

    def health(self) -> bool:
        return self._call("GET", "/healthz").get("status") == "ok"

    def info(self) -> dict:
        return self._call("GET", "/v1/info")

    def adapt(self, support: list[dict]) -> str:
        return self._call("POST", "/v1/adapt", json={"support": support})["adapter_id"]

    def answer(
        self,
        ecgs: list[dict],
        question: str,
        adapter_id: str | None = None,
        support: list[dict] | None = None,
        zero_shot: bool = False,
        options: list[str] | None = None,
        template_id: int | None = None,
    ) -> dict:
        body: dict = {"question": question, "ecgs": ecgs}
        for key, value in (("adapter_id", adapter_id), ("support", support), ("options", options),
                           ("template_id", template_id)):  # fmt: skip
            if value is not None:
                body[key] = value
        if zero_shot:
            body["zero_shot"] = True
        return self._call("POST", "/v1/answer", json=body)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="service address")
    parser.add_argument("--ecg", nargs="+", required=True, help="query record(s): WFDB .hea path(s)")
    parser.add_argument("--question", required=True)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--support", help="support.json (adapted once, then cached by the service)")
    mode.add_argument("--adapter-id", help="an id returned by an earlier adaptation")
    mode.add_argument("--zero-shot", action="store_true", help="the meta-learned weights, no adaptation")
    parser.add_argument("--options", nargs="+", help="admissible answers to score")
    parser.add_argument("--template-id", type=int, help="ECG-QA template whose admissible answers are scored")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")


def run(args: argparse.Namespace) -> int:
    try:
        ecgs = [wfdb_payload(p) for p in args.ecg]
        support = load_support(args.support) if args.support else None
    except (OSError, ValueError) as err:
        print(f"ecgray ask: {err}", file=sys.stderr)
        return 2
    import httpx

    try:
        with ECGQAClient(args.url, args.timeout) as client:
            out = client.answer(ecgs, args.question, adapter_id=args.adapter_id, support=support,
                                zero_shot=args.zero_shot, options=args.options, template_id=args.template_id)  # fmt: skip
    except ServiceError as err:
        print(f"ecgray ask: {err}", file=sys.stderr)
        return 1
    except httpx.HTTPError as err:
        print(f"ecgray ask: cannot reach {args.url} ({type(err).__name__}: {err})", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2))
    return 0

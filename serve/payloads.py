"""Request bodies of the QA service and their conversion into the encoder's input (no Ray, no torch).

An ECG arrives in one of three forms, each turned into the canonical (12, T) window by
`ecgray.data.signals.to_canonical` -- exactly the path `ecgray prepare` uses in training:

    {"fs": 500, "leads": ["I", ...], "signal": [[...], ...]}                      leads x samples, JSON numbers
    {"fs": 500, "leads": [...], "data": "<base64>", "dtype": "float32", "shape": [L, T]}   little-endian
    {"wfdb": {"header": "<.hea text>", "dat": "<base64 of the .dat>"}}            a WFDB record pair

Every fault is a `PayloadError` naming the field (`ecgs[1].signal`) and what was expected; the service
turns it into a 4xx JSON answer.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator

from ecgray.config import LEAD_NAMES, DataConfig, ServeConfig
from ecgray.data.signals import MAX_FS, MIN_FS, Canonical, SignalError, check_fs, lead_index, to_canonical

_FILE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_DTYPES = {"float32": "<f4", "float16": "<f2"}
MULTIPLEX_HEADER = "serve_multiplexed_model_id"
"""Ray Serve's multiplexed-model header: a client may name the adapter there instead of in the body."""
ADAPTER_ID_PATTERN = r"^ad-[0-9a-f]{32}$"
ADAPTER_ID_SCHEMA = {"type": "string", "pattern": ADAPTER_ID_PATTERN}
MAX_ABS_VALUE = 1e6
"""Largest sample magnitude taken (mV): far beyond any ECG, and far below what overflows the model's float32
arithmetic (values near 1e37 make non-finite scores)."""
# The schema states what validation enforces, so a schema-driven client generates only requests it accepts.
# Lead names, base64, sampling rates and blank strings are checked by the code below (with messages that
# name the field and the expectation); the schema states the same rules. Its patterns spell out their
# character classes: `\s` differs between Python, ECMA-262 and the regex engines of schema validators.
_SPACE = "".join(f"\\u{i:04x}" for i in range(0x10000) if chr(i).isspace())  # what str.strip() removes
_LEAD_NAME = "|".join(
    "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in n) for n in LEAD_NAMES
)
_LEAD_PATTERN = f"^[{_SPACE}]*({_LEAD_NAME})[{_SPACE}]*$"  # lead_index: stripped, any letter case
# exactly what base64.b64decode(validate=True) takes
_BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
_NOT_BLANK = f"[^{_SPACE}]"
_LEAD_HELP = "one of " + ", ".join(LEAD_NAMES) + " (any letter case)"
LeadName = Annotated[
    str, WithJsonSchema({"type": "string", "pattern": _LEAD_PATTERN, "description": _LEAD_HELP})
]
Text = Annotated[
    str,
    Field(min_length=1, max_length=1000),
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 1000, "pattern": _NOT_BLANK}),
]
Base64 = Annotated[
    str, Field(min_length=1), WithJsonSchema({"type": "string", "minLength": 1, "pattern": _BASE64_PATTERN})
]
# JSON Schema's integer: 1.0 is one (the models are strict: no "1", no true)
Integral = BeforeValidator(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v)
Hertz = Annotated[float, WithJsonSchema({"type": "number", "minimum": MIN_FS, "maximum": MAX_FS})]
# checked on the decoded array (decode_array), where the base64 and WFDB forms are checked too
Sample = Annotated[
    float, WithJsonSchema({"type": "number", "minimum": -MAX_ABS_VALUE, "maximum": MAX_ABS_VALUE})
]


class PayloadError(ValueError):
    """A request that cannot be served; `field` is the dotted path into the body, `status` the HTTP code."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status

    def to_json(self) -> dict:
        return {"error": f"{self.field}: {self.message}", "field": self.field, "message": self.message}

    def __reduce__(self):  # raised inside a replica, re-raised in the ingress: keep the three fields
        return (PayloadError, (self.field, self.message, self.status))


# ----------------------------------------------------------------------------------------- request models
_NOT_NULL = {"type": ["array", "boolean", "number", "object", "string"]}  # a `not` trips schema tools up


def presence(given=(), absent=()) -> dict:
    """JSON Schema of `value is not None` for the fields in `given` and `is None` for those in `absent`: an
    explicit null counts as absent, as in the validators."""
    out: dict = {"properties": {**{n: _NOT_NULL for n in given}, **{n: {"type": "null"} for n in absent}}}
    if given:
        out["required"] = list(given)
    return out


def one_of(*names: str) -> dict:
    """JSON Schema of `_exactly_one`: exactly one of the fields is given (not null)."""
    return {"oneOf": [presence(given=[n]) for n in names]}


def _exactly_one(model: BaseModel, names: tuple[str, ...], what: str) -> str:
    given = [n for n in names if getattr(model, n) is not None]
    if len(given) != 1:
        raise ValueError(f"expected exactly one of {what}, got {given or 'none'}")
    return given[0]


class _Strict(BaseModel):
    # strict: JSON types as the schema states them (no "100" for a number, no 1 or "yes" for true)
    model_config = ConfigDict(extra="forbid", strict=True)


class WFDBIn(_Strict):
    header: str = Field(min_length=1, max_length=65536, description="text of the .hea file")
    dat: Base64 = Field(description="base64 of the .dat file")


_ECG_FORMS = {"signal": ("fs", "leads"), "data": ("fs", "leads", "dtype", "shape"), "wfdb": ()}
"""Each ECG form and the fields it needs; every other field of the ECG must be absent (or null)."""
_NEEDS = {"fs": "fs (Hz)", "leads": "leads (one name per row)", "dtype": "dtype (float32 | float16)",
          "shape": "shape [leads, samples]"}  # fmt: skip


def _ecg_form_schema() -> dict:
    fields = [*_ECG_FORMS, *_NEEDS]
    return {"oneOf": [presence(given=[form, *needs], absent=[n for n in fields if n not in (form, *needs)])
                      for form, needs in _ECG_FORMS.items()]}  # fmt: skip


class ECGIn(_Strict):
    """One ECG: exactly one of `signal`, `data` (+ dtype, shape) or `wfdb`. Each lead name at most once
    (letter case ignored); `signal` has one row per lead, all of one length; `data` holds exactly
    shape[0] x shape[1] values of dtype; at most serve.max_duration_s seconds at fs; |values| <= 1e6."""

    model_config = ConfigDict(json_schema_extra=_ecg_form_schema())
    fs: Hertz | None = Field(
        None,
        description="sampling rate in Hz (signal / data forms), a ratio of small integers (e.g. 500, 1000/3)",
    )
    leads: list[LeadName] | None = Field(
        None, min_length=1, max_length=12, json_schema_extra={"uniqueItems": True},
        description="lead name of each row, e.g. I, II, aVR, V1",
    )  # fmt: skip
    signal: list[Annotated[list[Sample], Field(min_length=1)]] | None = Field(
        None, min_length=1, max_length=12, description="leads x samples, mV: one row per entry of `leads`"
    )
    data: Base64 | None = Field(
        None,
        description="base64 of a little-endian (leads, samples) array: shape[0] x shape[1] x 4 (float32) or "
        "x 2 (float16) bytes",
    )  # fmt: skip
    dtype: Literal["float32", "float16"] | None = None
    shape: list[Annotated[int, Field(ge=1), Integral]] | None = Field(
        None, min_length=2, max_length=2, description="[leads, samples] of `data`; leads = len(leads)"
    )
    wfdb: WFDBIn | None = None

    @model_validator(mode="after")
    def _one_form(self) -> ECGIn:
        form = _exactly_one(self, tuple(_ECG_FORMS), "signal, data or wfdb")
        needs = _ECG_FORMS[form]
        missing = [_NEEDS[n] for n in needs if getattr(self, n) is None]
        if missing:
            raise ValueError(f"{form} needs {' and '.join(missing)}")
        extra = [n for n in _NEEDS if n not in needs and getattr(self, n) is not None]
        if extra:
            raise ValueError(f"{extra}: not allowed with {form} (only {', '.join(needs) or 'the header'})")
        return self


Pair = Annotated[list[ECGIn], Field(min_length=2, max_length=2, description="first ECG, then second")]


class SupportItem(_Strict):
    """One labelled example: `ecg`, or `ecg_pair` (first, second) for a comparison question."""

    model_config = ConfigDict(json_schema_extra=one_of("ecg", "ecg_pair"))
    ecg: ECGIn | None = None
    ecg_pair: Pair | None = None
    question: Text
    answer: Annotated[list[Text], Field(min_length=1)] | Text = Field(
        description="ECG-QA answer: a set of strings, or one string"
    )

    @model_validator(mode="after")
    def _one_form(self) -> SupportItem:
        _exactly_one(self, ("ecg", "ecg_pair"), "ecg or ecg_pair (two ECGs: a comparison question)")
        return self


_KINDS = {"single": ("ecgs", "ecg"), "pair": ("ecg_pairs", "ecg_pair")}
"""The two kinds of request (check_kinds): the field of their queries and of their support items' ECGs."""


def _alike(kind: str) -> dict:  # JSON Schema: a support set of one kind
    return {"items": presence(given=[_KINDS[kind][1]])}


class AdaptRequest(_Strict):
    """A support set: all `ecg` items or all `ecg_pair` items."""

    support: list[SupportItem] = Field(
        min_length=1, json_schema_extra={"anyOf": [_alike(kind) for kind in _KINDS]}
    )


MODES = {"oneOf": [
    presence(given=["adapter_id"]),
    presence(given=["support"]),
    {"required": ["zero_shot"], "properties": {"zero_shot": {"const": True}}},
]}  # fmt: skip
"""answer_mode's rule: exactly one of adapter_id, support or zero_shot=true (or the header, see below)."""


class AnswerRequest(_Strict):
    """Query ECG(s) + one question, answered with exactly one of adapter_id, support or zero_shot (or the
    adapter named in the serve_multiplexed_model_id header). Options are distinct (letter case ignored)."""

    model_config = ConfigDict(json_schema_extra={"allOf": [MODES, one_of("ecgs", "ecg_pairs")]})
    question: Text
    ecgs: list[ECGIn] | None = Field(None, min_length=1, description="query ECGs, one answer each")
    ecg_pairs: list[Pair] | None = Field(
        None, min_length=1, description="a comparison question's queries: two ECGs each (first, second)"
    )
    options: list[Text] | None = Field(
        None, min_length=1, json_schema_extra={"uniqueItems": True},
        description="admissible answers, scored one by one; distinct after stripping, letter case ignored",
    )  # fmt: skip
    template_id: Annotated[int, Integral] | None = Field(
        None, description="ECG-QA template: its admissible answers are scored"
    )
    adapter_id: str | None = Field(None, pattern=ADAPTER_ID_PATTERN, description="returned by /v1/adapt")
    support: list[SupportItem] | None = Field(None, min_length=1)
    zero_shot: bool = Field(False, description="answer with the meta-learned weights, no adaptation")

    @model_validator(mode="after")
    def _one_query_form(self) -> AnswerRequest:
        _exactly_one(self, ("ecgs", "ecg_pairs"), "ecgs or ecg_pairs (two ECGs each: a comparison question)")
        return self

    @property
    def queries(self) -> list:
        """The query items: ECGs, or pairs of them."""
        return self.ecgs if self.ecgs is not None else self.ecg_pairs

    @property
    def query_field(self) -> str:
        return "ecgs" if self.ecgs is not None else "ecg_pairs"


def check_kinds(req: AdaptRequest | AnswerRequest, comparison_templates: set[int]) -> None:
    """One ECG per item or two (a comparison question), alike across a request: its support items, its
    queries, and its template (a comparison template needs pairs)."""
    support = req.support or []
    kinds = {"pair" if item.ecg_pair is not None else "single" for item in support}
    if len(kinds) > 1:
        first = next(
            i
            for i, item in enumerate(support)
            if (item.ecg_pair is not None) != (support[0].ecg_pair is not None)
        )
        raise PayloadError(f"support[{first}]", "a support set is all `ecg` items or all `ecg_pair` items")
    if not isinstance(req, AnswerRequest):
        return
    pair = req.ecg_pairs is not None
    if req.template_id in comparison_templates and not pair:
        raise PayloadError(
            "ecgs", f"template {req.template_id} is a comparison question: send `ecg_pairs`, two ECGs per "
            "query (first, second)",
        )  # fmt: skip
    if req.template_id is not None and req.template_id not in comparison_templates and pair:
        raise PayloadError("ecg_pairs", f"template {req.template_id} asks about one ECG: send `ecgs`")
    if kinds and (kinds == {"pair"}) != pair:
        raise PayloadError(
            req.query_field, f"the support items have {'two ECGs' if kinds == {'pair'} else 'one ECG'} each; "
            f"the queries must too ({'ecg_pairs' if kinds == {'pair'} else 'ecgs'})",
        )  # fmt: skip


def kind_schema(kind: str, template_ids: list[int], comparison_templates: set[int]) -> dict:
    """check_kinds as JSON Schema for a request of one kind: its support items and its templates."""
    ids = sorted(t for t in template_ids if (t in comparison_templates) == (kind == "pair"))
    return {"properties": {"support": _alike(kind), "template_id": {"enum": [*ids, None]}}}


def kinds_schema(template_ids: list[int], comparison_templates: set[int]) -> dict:
    """check_kinds as JSON Schema for an AnswerRequest: a branch per kind, named by its queries' field."""
    return {"anyOf": [{"allOf": [presence(given=[queries]), kind_schema(kind, template_ids, comparison_templates)]}
                      for kind, (queries, _) in _KINDS.items()]}  # fmt: skip


def answer_mode(req: AnswerRequest, header_id: str | None) -> str:
    """adapter_id | support | zero_shot: exactly one, the adapter named in the body or the multiplexed-model
    header (both: the same id)."""
    if header_id:
        if not re.match(ADAPTER_ID_PATTERN, header_id):
            raise PayloadError(MULTIPLEX_HEADER, f"{header_id[:80]!r}: expected 'ad-' and 32 hex digits")
        if req.adapter_id is not None and req.adapter_id != header_id:
            raise PayloadError(
                "adapter_id", f"{req.adapter_id} but the {MULTIPLEX_HEADER} header names {header_id}"
            )
    modes = [m for m, on in (("adapter_id", req.adapter_id is not None or bool(header_id)),
                             ("support", req.support is not None),
                             ("zero_shot", req.zero_shot)) if on]  # fmt: skip
    if len(modes) != 1:
        raise PayloadError(
            "body", f"expected exactly one of adapter_id, support or zero_shot=true, got {modes or 'none'}"
        )
    return modes[0]


# --------------------------------------------------------------------------------------- size limits
def check_limits(req: AdaptRequest | AnswerRequest, cfg: ServeConfig) -> None:
    """Counts the configured limits allow (support size, queries, options)."""
    support = req.support or []
    if isinstance(req, AnswerRequest) and not req.question.strip():
        raise PayloadError("question", "blank; expected the question text")
    if len(support) > cfg.max_support:
        raise PayloadError(
            "support", f"{len(support)} items; at most serve.max_support={cfg.max_support}", 413
        )
    if isinstance(req, AnswerRequest):
        if len(req.queries) > cfg.max_queries:
            raise PayloadError(
                req.query_field,
                f"{len(req.queries)} queries; at most serve.max_queries={cfg.max_queries}",
                413,
            )
        if req.options is not None:
            if not 1 <= len(req.options) <= cfg.max_options:
                raise PayloadError("options", f"{len(req.options)} options; expected 1..{cfg.max_options}")
            clean = [o.strip().lower() for o in req.options]
            if any(not o for o in clean):
                raise PayloadError("options", "empty option string")
            if len(set(clean)) != len(clean):
                raise PayloadError("options", f"duplicated options in {req.options}")
    for i, item in enumerate(support):
        answers = [item.answer] if isinstance(item.answer, str) else item.answer
        if not answers or any(not a.strip() for a in answers):
            raise PayloadError(
                f"support[{i}].answer", "expected a non-empty string or list of non-empty strings"
            )


# ---------------------------------------------------------------------------------------- ECG decoding
def _check_leads(leads: list[str], where: str) -> None:
    seen: dict[int, str] = {}
    for k, name in enumerate(leads):
        j = lead_index(name)
        if j is None:
            raise PayloadError(f"{where}.leads[{k}]", f"unknown lead {name!r}; expected one of {LEAD_NAMES}")
        if j in seen:
            raise PayloadError(
                f"{where}.leads", f"lead {LEAD_NAMES[j]} appears twice ({seen[j]!r}, {name!r})"
            )
        seen[j] = name


def _check_duration(n_samples: int, fs: float, where: str, cfg: ServeConfig) -> None:
    if n_samples / fs > cfg.max_duration_s:
        raise PayloadError(
            where, f"{n_samples} samples at {fs:g} Hz = {n_samples / fs:.1f} s; at most serve.max_duration_s="
            f"{cfg.max_duration_s:g} s", 413,
        )  # fmt: skip


def _check_values(x: np.ndarray, where: str) -> None:
    """Finite values are at most MAX_ABS_VALUE in magnitude (NaN and Inf are to_canonical's: nan_policy, a
    refusal naming the leads)."""
    with np.errstate(invalid="ignore"):
        big = np.isfinite(x) & (np.abs(x) > MAX_ABS_VALUE)
    if big.any():
        raise PayloadError(
            where, f"{int(big.sum())} values beyond +-{MAX_ABS_VALUE:g} (mV expected; larger values overflow "
            "the model's arithmetic)",
        )  # fmt: skip


def _fs(ecg: ECGIn, where: str) -> float:
    try:
        return check_fs(ecg.fs)
    except SignalError as err:
        raise PayloadError(f"{where}.fs", str(err).removeprefix("ECG: ")) from None


def _b64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise PayloadError(where, f"not valid base64 ({err})") from None


def decode_array(ecg: ECGIn, where: str, cfg: ServeConfig) -> tuple[np.ndarray, list[str], float]:
    """signal / data forms -> ((T, C) float64, channel names, fs), after the lead, shape and size checks."""
    fs = _fs(ecg, where)
    leads = list(ecg.leads or [])
    if not leads:
        raise PayloadError(f"{where}.leads", "expected at least one lead name")
    _check_leads(leads, where)
    if ecg.signal is not None:
        rows = ecg.signal
        if len(rows) != len(leads):
            raise PayloadError(
                f"{where}.signal", f"{len(rows)} rows but {len(leads)} leads; expected leads x samples"
            )
        lengths = {len(r) for r in rows}
        if len(lengths) != 1:
            raise PayloadError(f"{where}.signal", f"rows of different lengths {sorted(lengths)}")
        _check_duration(lengths.pop(), fs, f"{where}.signal", cfg)
        x = np.asarray(rows, dtype=np.float64)  # (C, T)
        _check_values(x, f"{where}.signal")
    else:
        shape = ecg.shape or []
        if len(shape) != 2 or shape[0] != len(leads) or shape[1] < 1:
            raise PayloadError(f"{where}.shape", f"{shape}: expected [{len(leads)} leads, samples >= 1]")
        _check_duration(shape[1], fs, f"{where}.shape", cfg)
        raw = _b64(ecg.data or "", f"{where}.data")
        dtype = np.dtype(_DTYPES[ecg.dtype or "float32"])
        expected = shape[0] * shape[1] * dtype.itemsize
        if len(raw) != expected:
            raise PayloadError(
                f"{where}.data", f"{len(raw)} bytes; shape {shape} of {ecg.dtype} needs {expected}"
            )
        x = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(np.float64)  # (C, T)
        _check_values(x, f"{where}.data")
    return x.T, leads, fs


def _read_wfdb(wf: WFDBIn, where: str, cfg: ServeConfig) -> tuple[np.ndarray, list[str], float]:
    """Write the pair into a private temp dir and read it with the training reader (wfdb)."""
    import wfdb

    from ecgray.data.ptbxl import RecordError, read_record

    dat = _b64(wf.dat, f"{where}.wfdb.dat")
    lines = [ln for ln in wf.header.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    try:
        head = lines[0].split()
        name, n_sig = head[0].split("/")[0], int(head[1])
        signal_lines = [ln.split() for ln in lines[1 : 1 + n_sig]]
        files = {s[0] for s in signal_lines}
    except (IndexError, ValueError):
        raise PayloadError(
            f"{where}.wfdb.header", "expected a WFDB header: 'name n_sig fs n_samples' + one line per signal"
        ) from None
    if not _FILE_NAME.match(name) or not 1 <= n_sig <= 64 or len(signal_lines) != n_sig:
        raise PayloadError(
            f"{where}.wfdb.header", f"record line {lines[0][:80]!r}: expected a plain name and 1-64 signals "
            f"with one line each (got {len(signal_lines)} signal lines)",
        )  # fmt: skip
    if len(files) != 1 or not _FILE_NAME.match(next(iter(files))):
        raise PayloadError(
            f"{where}.wfdb.header",
            f"signals must all be stored in one plain-named .dat file, got {sorted(files)}",
        )
    with tempfile.TemporaryDirectory(prefix="ecgray-wfdb-") as tmp:
        (Path(tmp) / f"{name}.hea").write_text(wf.header)
        (Path(tmp) / next(iter(files))).write_bytes(dat)
        try:
            header = wfdb.rdheader(str(Path(tmp) / name))
            fs = check_fs(header.fs)
            if header.sig_len is None:
                raise PayloadError(f"{where}.wfdb.header", "no sample count on the record line")
            _check_duration(int(header.sig_len), fs, f"{where}.wfdb.header", cfg)
            record = read_record(Path(tmp) / name)
        except PayloadError:
            raise
        except (RecordError, SignalError) as err:
            raise PayloadError(f"{where}.wfdb", str(err).replace(str(Path(tmp)) + "/", "")) from None
        except Exception as err:  # wfdb's header parser raises bare ValueError / IndexError / TypeError
            raise PayloadError(
                f"{where}.wfdb.header", f"wfdb could not parse it ({type(err).__name__}: {err})"
            ) from None
    if record.signal.shape[0] == 0:
        raise PayloadError(f"{where}.wfdb.dat", "the record has no samples")
    _check_values(record.signal, f"{where}.wfdb")
    return record.signal, record.sig_names, record.fs


def canonical_ecg(ecg: ECGIn, where: str, cfg: ServeConfig, data_cfg: DataConfig) -> Canonical:
    """One ECG payload -> the canonical window, through `to_canonical` exactly as in training."""
    if ecg.wfdb is not None:
        x, names, fs = _read_wfdb(ecg.wfdb, where, cfg)
    else:
        x, names, fs = decode_array(ecg, where, cfg)
    try:
        out = to_canonical(x, names, fs, data_cfg, record=None)
    except SignalError as err:
        raise PayloadError(where, str(err).removeprefix("ECG: ")) from None
    if not out.lead_mask.any():
        raise PayloadError(
            where, f"none of the leads the model reads ({data_cfg.leads}) is present and finite"
        )
    return out


# ------------------------------------------------------------------------------------- support digests
def normalise_answer(answer: list[str] | str) -> list[str]:
    """ECG-QA answers are unordered sets: lowercased, stripped, sorted."""
    answers = [answer] if isinstance(answer, str) else answer
    return sorted(a.strip().lower() for a in answers)


@dataclass
class SupportSample:
    """One canonicalised support item."""

    ecg: Canonical | tuple[Canonical, Canonical]
    """One ECG, or a comparison question's pair (first, second)."""
    question: str
    answer: list[str]

    def digest(self) -> str:
        h = hashlib.sha256()
        for ecg in self.ecg if isinstance(self.ecg, tuple) else (self.ecg,):  # a pair: both, in order
            h.update(np.ascontiguousarray(ecg.signal, dtype="<f4").tobytes())
            h.update(ecg.lead_mask.astype(np.uint8).tobytes())
        h.update(self.question.strip().lower().encode())
        h.update(b"\0" + "\x1f".join(self.answer).encode())
        return h.hexdigest()


def canonical_support(
    items: list[SupportItem], cfg: ServeConfig, data_cfg: DataConfig, field: str = "support"
) -> list[SupportSample]:
    """Canonicalise and sort by content (the support set is a set: its order never changes the adapter)."""
    out = [
        SupportSample(canonical_item(item.ecg if item.ecg is not None else item.ecg_pair,
                                     f"{field}[{i}].{'ecg' if item.ecg is not None else 'ecg_pair'}", cfg, data_cfg),
                      item.question, normalise_answer(item.answer))
        for i, item in enumerate(items)
    ]  # fmt: skip
    return sorted(out, key=SupportSample.digest)


def canonical_item(item: ECGIn | list[ECGIn], where: str, cfg: ServeConfig, data_cfg: DataConfig):
    """One ECG -> Canonical; a pair -> (first, second) Canonicals, each named by its index."""
    if isinstance(item, list):
        return tuple(canonical_ecg(e, f"{where}[{j}]", cfg, data_cfg) for j, e in enumerate(item))
    return canonical_ecg(item, where, cfg, data_cfg)


def adapter_id(support: list[SupportSample], model_id: str) -> str:
    """Content hash of the canonical support set + the model (checkpoint and inner-loop settings)."""
    h = hashlib.sha256(model_id.encode())
    for sample in support:
        h.update(sample.digest().encode())
    return "ad-" + h.hexdigest()[:32]

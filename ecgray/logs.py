"""What a person reads on the console, and where framework output goes instead.

The console (`console()`, entered by every `ecgray` command and job that names a run directory):
  - fd 1 and fd 2 of the process point at `<run dir>/logs/<command>.log` for the whole command, so whatever
    a framework writes there (Python prints and logging, C++ glog lines, pip's output, the lines Ray
    forwards from its workers: Ray Train's reports, DeepSpeed's op builds, transformers' loading bars,
    Serve's access lines) lands in that file, never on the terminal;
  - ecgray writes what a person reads to the terminal through `say()` (stage lines, results, where they
    were written, errors in one line) and `progress()` (one bar per long step);
  - Ray workers have no console of their own: `say()` / `progress()` there print lines tagged `TAG` /
    `PROGRESS_TAG`, which Ray forwards to the driver, where `console()` shows them (the bar of a worker's
    progress drawn by the driver) and the log file keeps them as well.
The console names the log file once, when it opens; a command that fails says so in one line naming the
file that holds the traceback. A Python warning raised from ecgray's own code (e.g. a random-init encoder)
is one `warning: ...` line on the console as well (`show_own_warnings`); the frameworks' warnings stay in
the log.

Quiet Ray Data (`quiet_frameworks()`): Ray Data's per-dataset chatter and progress bars off, also in
processes that have no console (tests, library use): `RAY_DATA_LOGGING_CONFIG` (read at `import ray.data`)
holds its default config with the console handler at WARNING, and every worker of a job runs
`quiet_frameworks()` at start (Ray's `worker_process_setup_hook`, `runtime_env()`). No framework is
imported here at module level (a Ray worker runs this before anything else).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

SETUP_HOOK = "ecgray.logs.quiet_frameworks"
"""Dotted path of the function every Ray worker process of a job runs at start (see `runtime_env`)."""

CONSOLE_LEVEL = "WARNING"

# Ray Data's default logging config (ray/data/_internal/logging.py, Ray 2.60) with the console handler at
# WARNING and our notice filter; the file handler still records from DEBUG up.
_RAY_DATA_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"ray": {"format": "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}},
    "filters": {
        "console_filter": {"()": "ray.data._internal.logging.HiddenRecordFilter"},
        "own_choice_filter": {"()": "ecgray.logs.OwnChoiceNotices"},
    },
    "handlers": {
        "file": {
            "class": "ray.data._internal.logging.SessionFileHandler",
            "formatter": "ray",
            "filename": "ray-data.log",
        },
        "console": {
            "class": "ray._private.log.PlainRayHandler",
            "formatter": "ray",
            "level": CONSOLE_LEVEL,
            "filters": ["console_filter", "own_choice_filter"],
        },
    },
    "loggers": {"ray.data": {"level": "DEBUG", "handlers": ["file", "console"], "propagate": False}},
}


class OwnChoiceNotices(logging.Filter):
    """Drops Ray Data's warnings that only restate what `quiet_frameworks` chose (progress bars off)."""

    PREFIXES = ("Progress bars disabled", "Progress bars for operators disabled")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.PREFIXES)


def worker_env() -> dict[str, str]:
    """Environment variables that quiet Ray Data in a process that never calls `quiet_frameworks()`
    (a runtime_env's env_vars): no progress bars. The console threshold needs the setup hook
    (`runtime_env()`): a logging config file path would not exist on the other nodes."""
    return {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


def runtime_env() -> dict:
    """A runtime_env for `ray.init(runtime_env=...)` (or a task / actor / trainer): every worker process of
    the job runs `quiet_frameworks()` first, and gets `worker_env()`. Ray merges it with a submitted job's
    own runtime_env (working_dir etc.); the same env var set in both is a conflict Ray reports."""
    return {"worker_process_setup_hook": SETUP_HOOK, "env_vars": worker_env()}


def quiet_frameworks() -> None:
    """Silence Ray Data's execution summaries and progress bars on the console of this process (and of the
    processes it starts); warnings and errors stay visible. Idempotent; call it first thing in a driver,
    and in a Ray worker / actor that was not started with `runtime_env()`."""
    for key, value in worker_env().items():
        os.environ.setdefault(key, value)
    # an explicit RAY_DATA_LOGGING_CONFIG of the user's wins
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(_ray_data_logging_file()))
    show_own_warnings()  # in a Ray worker: ecgray's warnings reach the driver's console
    if "ray.data" in sys.modules:
        _quiet_imported_ray_data()


def _ray_data_logging_file() -> Path:
    """The logging config above as a file (Ray Data reads a path), written once per content and machine."""
    # JSON is YAML: ray.data reads the file with yaml.safe_load
    text = json.dumps(_RAY_DATA_LOGGING, indent=1, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"ecgray-ray-data-logging-{digest}.yaml"
    if not path.is_file():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # atomic: concurrent workers write identical content
    return path


def _quiet_imported_ray_data() -> None:
    """ray.data configured its logger at import: set the console handler and the current DataContext now."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":  # ray.data names its handlers after the config's keys
            handler.setLevel(CONSOLE_LEVEL)
            if not any(isinstance(f, OwnChoiceNotices) for f in handler.filters):
                handler.addFilter(OwnChoiceNotices())


# ------------------------------------------------------------------------------------------ the console

TAG = "ecgray| "
"""Prefix of a line a Ray worker writes for the driver's console (`say` in a worker)."""

PROGRESS_TAG = "ecgray|progress "
"""Prefix of a worker's progress record (JSON: desc, n, total, unit, postfix) for a bar on the console."""


class Console:
    """The terminal as it was when the command started (duplicated fds), and the log file fd 1 / 2 now
    write to. One per process at a time (`console()`)."""

    def __init__(self, log_file: Path, out, err):
        self.log_file = log_file
        self.out, self.err = out, err  # text streams on the terminal's stdout / stderr
        self.bars: dict[str, object] = {}  # a worker's progress (by id) -> its tqdm on the console
        self.finished: set[str] = set()  # ids of closed bars (records can arrive after the last one)

    def show_worker_lines(self, data: dict) -> None:
        """Ray's log stream handler (the driver receives every worker's lines): tagged ones to the console.
        Ray's own handler still writes every line, tagged or not, to fd 1 / 2: the log file."""
        for line in data.get("lines", ()):
            if line.startswith(PROGRESS_TAG):
                self._worker_progress(json.loads(line[len(PROGRESS_TAG) :]))
            elif line.startswith(TAG):
                print(line[len(TAG) :], file=self.err if data.get("is_err") else self.out, flush=True)

    def _worker_progress(self, record: dict) -> None:
        from tqdm import tqdm

        key = record["id"]
        if key in self.finished:
            return
        bar = self.bars.get(key)
        if bar is None:
            bar = self.bars[key] = tqdm(
                total=record["total"], desc=record["desc"], unit=record["unit"], file=self.err
            )
        bar.n = record["n"]
        bar.set_postfix_str(record["postfix"], refresh=False)
        bar.refresh()
        if record["last"]:
            bar.close()
            del self.bars[key]
            self.finished.add(key)


_console: Console | None = None
"""The console of this process while a command runs (`console()`), else None."""


def log_file_for(run_dir: str, command: str) -> Path:
    """`<run_dir>/logs/<command>.log` for a local run directory; a run directory that is a URI (object
    storage) gets a local file under the system's temp dir, copied to `<run_dir>/logs/` at the end."""
    from ecgray import storage

    name = command.replace(" ", "_").replace("/", "_") + ".log"
    if storage.is_uri(run_dir):
        return Path(tempfile.mkdtemp(prefix="ecgray-logs-")) / name
    return Path(run_dir) / "logs" / name


@contextlib.contextmanager
def console(run_dir: str, command: str):
    """Run the body with fd 1 / 2 on the command's log file and ecgray's own lines on the terminal (see the
    module's docstring). Nested use is a no-op (a command inside another keeps the outer log)."""
    global _console
    if _console is not None:
        yield _console
        return
    log_file = log_file_for(run_dir, command)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    out, err = _terminal(sys.stdout, 1, saved[0]), _terminal(sys.stderr, 2, saved[1])
    print(f"{command}: framework logs go to {log_file}", file=err, flush=True)
    with open(log_file, "a", buffering=1, encoding="utf-8") as log:
        print(f"===== {command} {time.strftime('%Y-%m-%d %H:%M:%S')} =====", file=log)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        # Python-level writes too, whatever sys.stdout / sys.stderr were (a wrapper of the caller's)
        streams = sys.stdout, sys.stderr
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        _console = Console(log_file, out, err)
        show_own_warnings()
        dispatcher = _ray_log_dispatcher()
        if dispatcher is not None:
            dispatcher.add_handler("ecgray_console", _console.show_worker_lines)
        try:
            yield _console
        finally:
            if dispatcher is not None:
                dispatcher.remove_handler("ecgray_console")
            for bar in list(_console.bars.values()):
                bar.close()
            sys.stdout.close()
            sys.stderr.close()
            sys.stdout, sys.stderr = streams
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            _console = None
            for stream, given in ((out, streams[0]), (err, streams[1])):
                if stream is not given:
                    stream.close()
    from ecgray import storage

    if storage.is_uri(run_dir):
        storage.write_bytes(storage.join(run_dir, "logs", log_file.name), log_file.read_bytes())


def _terminal(stream, fd: int, saved_fd: int):
    """Where the console's lines for fd 1 / 2 go: a new stream on the saved terminal fd when `stream` (the
    caller's sys.stdout / sys.stderr) writes to that fd, else `stream` itself (a caller's capture, e.g. a
    test's or a notebook's, keeps receiving them)."""
    try:
        on_fd = stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: an in-memory stream
        on_fd = False
    if not on_fd:
        return stream
    return open(os.dup(saved_fd), "w", buffering=1, encoding="utf-8", errors="replace")


def _ray_log_dispatcher():
    """Ray's dispatcher of the worker lines a driver receives (one handler prints them to fd 1 / 2); None
    when Ray is not installed. Handlers added before `ray.init` apply once it connects."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher
    except ImportError:
        return None
    return global_worker_stdstream_dispatcher


def _in_ray_worker() -> bool:
    """True in a Ray worker process (a task, an actor, a Train worker): its stdout goes to the driver."""
    worker = sys.modules.get("ray._private.worker")
    return worker is not None and getattr(worker.global_worker, "mode", None) == worker.WORKER_MODE


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_plain_showwarning = warnings.showwarning


def show_own_warnings() -> None:
    """Python warnings raised from ecgray's own code are also one console line (`say`: "warning: ...")
    under `console()` and in a Ray worker, where the warning itself goes to the log file with the
    frameworks' warnings. Idempotent; elsewhere warnings show as usual."""
    global _plain_showwarning
    if warnings.showwarning is not _show_warning:
        _plain_showwarning = warnings.showwarning
        warnings.showwarning = _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _plain_showwarning(message, category, filename, lineno, file, line)  # the log, with its place
    own = os.path.abspath(filename).startswith(_PACKAGE_DIR)
    if own and (_console is not None or _in_ray_worker()):
        say(f"warning: {message}", err=True)


def _worker_line(line: str, stream) -> None:
    """One line from a Ray worker to the driver: written to the stream, not with print(), which Ray Train
    patches in its workers to log every printed line a second time (both copies reach the driver)."""
    stream.write(line + "\n")
    stream.flush()


def say(message: str, err: bool = False) -> None:
    """One line for the person at the console: on the terminal under `console()`, tagged for the driver's
    console in a Ray worker, plain stdout / stderr otherwise."""
    if _console is not None:
        print(message, file=_console.err if err else _console.out, flush=True)
        print(message, flush=True)  # the log file too, in its place among the frameworks' lines
    elif _in_ray_worker():
        _worker_line(TAG + message, sys.stderr if err else sys.stdout)
    else:
        print(message, file=sys.stderr if err else sys.stdout, flush=True)


def progress(
    iterable=None, total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False, **kw
):
    """A progress bar for a long step (tqdm's arguments): on the console's terminal (or stderr without a
    console); in a Ray worker, progress records that the driver's console draws as a bar."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if _in_ray_worker() and _console is None and not disable:
        return WorkerProgress(total or 0, desc, unit, kw.get("initial", 0), iterable=iterable)
    from tqdm import tqdm

    file = _console.err if _console is not None else sys.stderr
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=file, **kw)


class WorkerProgress:
    """The part of tqdm's interface ecgray uses, for a Ray worker: prints `PROGRESS_TAG` records (at most
    one every `every_s` seconds, and the last, on close), which the driver's console draws."""

    made = 0  # bars made in this process: with the pid, each bar's id on the driver

    def __init__(
        self, total: int, desc: str, unit: str, initial: int = 0, every_s: float = 1.0, iterable=None
    ):
        self.total, self.desc, self.unit, self.n, self.iterable = total, desc, unit, initial, iterable
        self.every_s, self._last, self._postfix, self._closed = every_s, 0.0, "", False
        WorkerProgress.made += 1
        self.id = f"{os.getpid()}-{WorkerProgress.made}"
        self._emit(force=True)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._emit()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self._postfix = text

    def set_postfix(self, **values) -> None:
        self._postfix = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._emit(force=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _emit(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        record = {"id": self.id, "desc": self.desc, "n": self.n, "total": self.total, "unit": self.unit,
                  "postfix": self._postfix, "last": self._closed}  # fmt: skip
        _worker_line(PROGRESS_TAG + json.dumps(record), sys.stdout)


@contextlib.contextmanager
def command_console(module, args, prog: str):
    """The console of an `ecgray <command>` module (or the job wrapping it): its `log_location(args)` names
    the run directory; no console when it has none or returns None. A failure that escapes the body is one
    line on the console and its traceback in the log file, and exits 1."""
    where = getattr(module, "log_location", None)
    run_dir = where(args) if where is not None else None
    if run_dir is None:
        yield None
        return
    with console(str(run_dir), prog) as con:
        try:
            yield con
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception as err:  # named on the console, the traceback kept in the log
            traceback.print_exc()
            say(f"{prog}: failed: {type(err).__name__}: {err} (traceback in {con.log_file})", err=True)
            raise SystemExit(1) from None


def run_command(module, args, prog: str) -> int:
    """`module.run(args)` inside its console (`command_console`) -> the exit code."""
    with command_console(module, args, prog):
        return int(module.run(args) or 0)

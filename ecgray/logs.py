"""Quiet framework logs: Ray Data's per-dataset chatter off the console, warnings and errors kept.

Every Ray Data execution logs "Starting execution of Dataset ...", "Execution plan of Dataset ...", and
"Dataset ... execution finished in ... seconds" at INFO from whichever process iterates the dataset (the
driver, every Ray Train worker), and draws operator progress bars (tqdm in a terminal, "... row/s"
progress lines otherwise, forwarded from Ray workers to the driver). `quiet_frameworks()` turns the bars
off and raises the console threshold of the `ray.data` logger to WARNING; Ray Data's own log file
(`<session>/logs/ray-data/ray-data.log`) keeps every record. It works in a process whether or not
`ray.data` is imported yet:
  - not yet: it points `RAY_DATA_LOGGING_CONFIG` (read by `import ray.data`) at a logging config that is
    Ray Data's default with the console handler at WARNING, and sets `RAY_DATA_DISABLE_PROGRESS_BARS=1`;
    processes this one starts (a local `ray.init()`'s workers) inherit both;
  - already: it changes the live `ray.data` console handler and `DataContext.get_current()` in place.
Ray workers on other nodes inherit nothing from the driver: `runtime_env()` makes every worker process
of the job run `quiet_frameworks()` at start (Ray's `worker_process_setup_hook`), and `worker_env()`
holds the plain environment variables for a runtime_env's env_vars.

No framework is imported here (a Ray worker runs this before anything else).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
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

"""ecgray.logs: Ray Data's execution chatter off the console (driver and workers), warnings still shown."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ecgray import logs

RAY_DATA_ENV = ("RAY_DATA_LOGGING_CONFIG", "RAY_DATA_DISABLE_PROGRESS_BARS")
CHATTER = ("Starting execution of Dataset", "Execution plan of Dataset", "execution finished", "row/s",
           "Running Dataset", "Progress bars disabled")  # fmt: skip


@pytest.fixture
def clean_env(monkeypatch):
    for key in RAY_DATA_ENV:
        monkeypatch.delenv(key, raising=False)  # restored after the test
    return monkeypatch


def test_quiet_frameworks_points_ray_data_at_a_warning_console(clean_env):
    logs.quiet_frameworks()
    assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
    config = yaml.safe_load(Path(os.environ["RAY_DATA_LOGGING_CONFIG"]).read_text())
    handlers = config["handlers"]
    assert handlers["console"]["level"] == "WARNING"
    # the file handler keeps every record (Ray Data's own log file), the logger itself stays at DEBUG
    assert "level" not in handlers["file"] and config["loggers"]["ray.data"]["level"] == "DEBUG"
    assert config["loggers"]["ray.data"]["handlers"] == ["file", "console"]
    first = os.environ["RAY_DATA_LOGGING_CONFIG"]
    logs.quiet_frameworks()  # idempotent: same file, nothing appended
    assert os.environ["RAY_DATA_LOGGING_CONFIG"] == first


def test_a_users_own_ray_data_logging_config_wins(clean_env, tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("version: 1\n")
    clean_env.setenv("RAY_DATA_LOGGING_CONFIG", str(own))
    logs.quiet_frameworks()
    assert os.environ["RAY_DATA_LOGGING_CONFIG"] == str(own)


def test_own_choice_notices_are_dropped_other_warnings_kept():
    keep = logs.OwnChoiceNotices()

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("ray.data", logging.WARNING, __file__, 1, message, None, None)

    assert not keep.filter(record("Progress bars disabled. To enable, set ..."))
    assert not keep.filter(record("Progress bars for operators disabled. To enable, ..."))
    assert keep.filter(record("Dataset read failed: no such file s3://bucket/x"))


def test_runtime_env_runs_the_hook_in_every_worker():
    env = logs.runtime_env()
    assert env["worker_process_setup_hook"] == "ecgray.logs.quiet_frameworks"
    # the hook's dotted path resolves to the function (Ray imports it in each worker)
    module, name = env["worker_process_setup_hook"].rsplit(".", 1)
    assert getattr(sys.modules[module], name) is logs.quiet_frameworks
    # no driver-local file path in what travels to other nodes
    assert env["env_vars"] == {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    json.dumps(env)


def test_quiet_frameworks_after_ray_data_is_imported(clean_env):
    """ray.data configured its logger at import: the console handler and DataContext change in place."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    handlers = logging.getLogger("ray.data").handlers
    saved = (
        ctx.enable_progress_bars,
        ctx.enable_operator_progress_bars,
        [(h, h.level, list(h.filters)) for h in handlers],
    )
    try:
        logs.quiet_frameworks()
        logs.quiet_frameworks()
        assert not ctx.enable_progress_bars and not ctx.enable_operator_progress_bars
        console = [h for h in handlers if h.name == "console"]
        assert console and all(h.level == logging.WARNING for h in console)
        assert all(sum(isinstance(f, logs.OwnChoiceNotices) for f in h.filters) == 1 for h in console)
        assert all(h.level < logging.INFO for h in handlers if h.name == "file")
    finally:
        ctx.enable_progress_bars, ctx.enable_operator_progress_bars, levels = saved
        for handler, level, filters in levels:
            handler.setLevel(level)
            handler.filters[:] = filters


PIPELINE = textwrap.dedent(
    """
    import logging, time
    import ray, ray.data  # imported (and Ray Data's logging configured) before quiet_frameworks: the in-place path
    from ecgray.logs import quiet_frameworks, runtime_env

    # the workers start with this ray.init, before quiet_frameworks touched this process's environment:
    # only the setup hook in runtime_env() can quiet them (as on another node)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=runtime_env())
    quiet_frameworks()
    rows = ray.data.range(20, override_num_blocks=2).map_batches(lambda b: {"id": b["id"] * 2}).take_all()
    print("driver rows", len(rows), flush=True)

    @ray.remote(num_cpus=0)
    def in_worker():  # like a Ray Train worker iterating its dataset shard
        rows = ray.data.range(10, override_num_blocks=1).map(lambda r: r).take_all()
        logging.getLogger("ray.data").warning("ecgray-probe worker warning")
        return len(rows)

    print("worker rows", ray.get(in_worker.remote()), flush=True)
    logging.getLogger("ray.data").warning("ecgray-probe driver warning")
    print("session", ray._private.worker._global_node.get_session_dir_path(), flush=True)
    time.sleep(3)  # let the log monitor forward the worker's lines
    ray.shutdown()
    """
)


@pytest.mark.slow
def test_ray_data_pipeline_is_quiet_on_driver_and_worker_consoles(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (*RAY_DATA_ENV, "RAY_ADDRESS")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    # its own Ray, stopped by its own ray.shutdown(); on a timeout only its process group is killed
    proc = subprocess.Popen(
        [sys.executable, "-c", PIPELINE], cwd=tmp_path, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"pipeline did not finish in 400 s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    assert "driver rows 20" in out and "worker rows 10" in out
    noisy = [line for line in out.splitlines() if any(c in line for c in CHATTER)]
    assert not noisy, "\n".join(noisy)
    # warnings still reach the console, from the driver and from the worker
    assert "ecgray-probe driver warning" in out and "ecgray-probe worker warning" in out
    # the executions did run and were logged: to Ray Data's file, not the console
    session = next(line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("session "))
    log_file = Path(session) / "logs" / "ray-data" / "ray-data.log"
    assert log_file.read_text().count("Starting execution of Dataset") >= 2

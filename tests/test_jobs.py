"""Job entrypoints and configs: every job's --help, every config loads and names its command, and a real
`ray job submit` of meta-training against a local head this test starts and stops."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ecgray.config import load_config
from ecgray.train.toy import toy_overrides, write_toy_prepared
from jobs._entry import main

REPO = Path(__file__).resolve().parents[1]
JOBS = {
    "meta_train": "--config",
    "sweep": "--config",
    "evaluate": "--checkpoint",
    "pretrain_encoder": "--data",
    "prepare_data": "--ptbxl",
}


@pytest.mark.parametrize("job", sorted(JOBS))
def test_job_help(job, capsys):
    module = {
        "meta_train": "ecgray.train.meta_train",
        "sweep": "ecgray.train.tune",
        "evaluate": "ecgray.eval.cli",
        "pretrain_encoder": "ecgray.train.pretrain_encoder",
        "prepare_data": "ecgray.data.prepare",
    }[job]
    text = (REPO / "jobs" / f"{job}.py").read_text()
    assert f'main("{module}", "jobs.{job}"' in text  # the job runs the CLI module's own code
    with pytest.raises(SystemExit) as exit_info:
        main(module, f"jobs.{job}", "help test", ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"python -m jobs.{job}" in out and JOBS[job] in out


def test_job_help_as_a_process():
    out = subprocess.run(
        [sys.executable, "-m", "jobs.meta_train", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "--set" in out.stdout


CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_names_its_command(path):
    cfg = load_config(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path.name}: first line must be the command that runs it"
    command = first[2:]
    assert f"configs/{path.name}" in command
    assert command.startswith(
        ("ecgray ", "ray job submit --working-dir . -- python -m jobs.", "python -m jobs.")
    )
    assert cfg.meta.tasks_per_step % cfg.train.num_workers == 0
    if "llama8b" in path.stem:
        assert cfg.train.zero_stage == 3 and cfg.model.llm == "meta-llama/Llama-3.1-8B"
    if path.stem.startswith("paper_"):
        way = int(path.stem.split("_")[-1].removesuffix("way"))
        assert cfg.episodes.n_way == way and cfg.episodes.k_shot == 5 and cfg.train.use_gpu


def test_paper_configs_cover_the_grid():
    names = {p.stem for p in CONFIGS}
    for llm in ("llama8b", "llama1b", "gemma2b"):
        for qt in ("verify", "choose", "query"):
            for way in (2, 5):
                assert f"paper_{llm}_{qt}_{way}way" in names


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_head():
    """A Ray head of its own (ports, temp dir, token auth off), run with --block in a new session so the
    test stops exactly its processes (SIGTERM, then SIGKILL, to that process group), never `ray stop`."""
    ray_bin = Path(sys.executable).parent / "ray"
    temp_dir = tempfile.mkdtemp(prefix="/tmp/ecgr")
    dash = _free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(ray_bin), "start", "--head", "--block", f"--port={_free_port()}", "--num-cpus=2",
        f"--temp-dir={temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}", f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats",
    ]  # fmt: skip
    head = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if head.poll() is not None:
                pytest.fail(f"ray start exited: {head.stderr.read().decode()[-2000:]}")
            try:
                import urllib.request

                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("the local Ray head's job server did not come up in 120 s")
        yield address, env
    finally:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        time.sleep(1)
        try:  # raylet workers stay in the head's process group; make sure none is left
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_ray_job_submit_meta_train(local_head, tmp_path):
    address, env = local_head
    prepared = write_toy_prepared(tmp_path / "prepared")
    storage = tmp_path / "runs"
    # the CLI quotes each argument after `--` itself (the YAML value of min_class_size holds spaces)
    entrypoint = (
        [
            "python", "-m", "jobs.meta_train", "--config", "configs/smoke.yaml", "--set", *toy_overrides(prepared),
            "meta.outer_steps=2", "meta.eval_every=2", "meta.checkpoint_every=2", f"train.storage_path={storage}",
            "train.name=job",
        ]
    )  # fmt: skip
    ray_bin = Path(sys.executable).parent / "ray"
    out = subprocess.run(
        [str(ray_bin), "job", "submit", f"--address={address}", f"--working-dir={REPO}", "--", *entrypoint],
        env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in (out.stdout + out.stderr).lower()
    states = [json.loads(p.read_text()) for p in (storage / "job").glob("checkpoint_*/train_state.json")]
    assert [s["step"] for s in states] == [2]
    assert list((storage / "job").glob("checkpoint_*/mapper.safetensors"))

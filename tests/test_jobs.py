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
    "features": "--config",
    "meta_train": "--config",
    "sweep": "--config",
    "evaluate": "--checkpoint",
    "pretrain_encoder": "--data",
    "prepare_data": "--ptbxl",
}


@pytest.mark.parametrize("job", sorted(JOBS))
def test_job_help(job, capsys):
    module = {
        "features": "ecgray.features",
        "meta_train": "ecgray.train.meta_train",
        "sweep": "ecgray.train.tune",
        "evaluate": "ecgray.eval.cli",
        "pretrain_encoder": "ecgray.train.pretrain_encoder",
        "prepare_data": "ecgray.data.prepare",
    }[job]
    text = (REPO / "jobs" / f"{job}.py").read_text()
    assert f'main("{module}", "jobs.{job}"' in text  # the job runs the CLI module's own code
    if (
        "jobs._placement import main" in text
    ):  # evaluate / pretrain_encoder: placed on a GPU when there is one
        from jobs._placement import main as placed

        with pytest.raises(SystemExit) as exit_info:
            placed(module, f"jobs.{job}", "help test", ["--help"])
        assert exit_info.value.code == 0 and "--run-on" in capsys.readouterr().out
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
        # the frozen 8B LLM is replicated (one bf16 copy per GPU), not partitioned
        assert cfg.train.zero_stage == 0 and cfg.model.llm == "meta-llama/Llama-3.1-8B"
    if "llama70b" in path.stem:
        # the frozen 70B LLM fits no GPU: partitioned across the workers (ZeRO-3)
        assert cfg.train.zero_stage == 3 and cfg.model.llm == "meta-llama/Llama-3.1-70B"
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


def start_head(auth: str, home: Path | None = None):
    """A Ray head of its own (ports, temp dir, token auth `auth`, HOME `home` where the token lives), run
    with --block in a new session so the caller stops exactly its processes (`stop_head`), never `ray stop`.
    Started from the venv (its bin first on PATH), as the README says: jobs' `python` is then the venv's."""
    ray_bin = Path(sys.executable).parent / "ray"
    temp_dir = tempfile.mkdtemp(prefix="/tmp/ecgr")
    dash = _free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": auth,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    if home is not None:
        env["HOME"] = str(home)
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
    deadline = time.time() + 120
    while time.time() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited: {head.stderr.read().decode()[-2000:]}")
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # it answers (401 without the token): it is up
            break
        except OSError:
            time.sleep(1)
    else:
        stop_head(head)
        pytest.fail("the local Ray head's job server did not come up in 120 s")
    return head, address, env


def stop_head(head) -> None:
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


@pytest.fixture
def local_head():
    head, address, env = start_head("disabled")
    try:
        yield address, env
    finally:
        stop_head(head)


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


def readme_jobs() -> tuple[list[str], list[tuple[str, str]]]:
    """The README's jobs section: (the commands that make its data, [(job, local Ray cluster command)])."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Jobs:") :]
    section = section[: section.index("\n## ", 1)]
    setup = [line.strip()[3:-1] for line in section.splitlines() if line.strip().startswith("- `ecgray ")]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[2].startswith("`ray job submit"):
            rows.append((cells[0], cells[2].strip("`")))
    return setup, rows


def test_readme_jobs_table_names_every_job():
    setup, rows = readme_jobs()
    assert setup and all(cmd.startswith("ecgray ") for cmd in setup)
    jobs = {cmd.split("python -m jobs.")[1].split()[0] for _, cmd in rows}
    assert jobs == {p.stem for p in (REPO / "jobs").glob("*.py") if not p.stem.startswith("_")}


@pytest.mark.slow
def test_readme_jobs_table_runs_as_written_on_a_local_head(tmp_path):
    """A fresh copy of the tree (what a clone holds: no data/, runs/), a local `ray start --head` from the
        venv with Ray 2.60's token authentication (RAY_AUTH_MODE=token, the token generated as the README says,
    under this test's HOME), and
        every `ray job submit` command of the README's jobs table, in order, exactly as written (bash expands
        its $PWD): each job succeeds and leaves its output where the next one reads it."""
    import shutil

    tree = tmp_path / "ecgray"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(
        ".venv", ".cache", "runs", "data", ".git", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache",
    ))  # fmt: skip
    home = tmp_path / "home"
    home.mkdir()
    setup, rows = readme_jobs()
    generate = "ray get-auth-token --generate"
    assert generate in (REPO / "README.md").read_text()
    token_env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token"}
    ray_bin = Path(sys.executable).parent / "ray"
    subprocess.run([str(ray_bin), *generate.split()[1:]], env=token_env, check=True, capture_output=True)
    head, address, env = start_head("token", home)
    env = {**env, "RAY_ADDRESS": address}
    try:
        assert (home / ".ray" / "auth_token").is_file()  # the token the head and the clients read
        for cmd in setup:
            out = subprocess.run(["bash", "-c", cmd], cwd=tree, env=env, capture_output=True, text=True,
                                 timeout=900)  # fmt: skip
            assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        for job, cmd in rows:
            out = subprocess.run(["bash", "-c", cmd], cwd=tree, env=env, capture_output=True, text=True,
                                 timeout=1500)  # fmt: skip
            log = out.stdout + out.stderr
            assert out.returncode == 0, f"{job}: {cmd}\n{log[-5000:]}"
            assert "succeeded" in log.lower(), f"{job}: {log[-3000:]}"
    finally:
        stop_head(head)
    assert (tree / "data/prepared/report.json").is_file()
    assert (tree / "runs/encoder/encoder.safetensors").is_file()
    assert list((tree / "data/prepared/features").glob("*/features.json"))
    assert list((tree / "runs/smoke").glob("checkpoint_*/mapper.safetensors"))
    assert (tree / "runs/eval/results.json").is_file()

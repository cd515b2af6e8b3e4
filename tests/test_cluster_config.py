"""cluster.yaml: valid for the installed Ray's cluster launcher, every node installs the project, token auth
generated on the head and given to every worker, a pinned image, sane resources; and the GPU jobs' placement."""

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

REPO = Path(__file__).resolve().parents[1]


def _schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_yaml_validates_against_ray_schema():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(config, _schema())
    assert config["head_node_type"] in config["available_node_types"]
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t["max_workers"] >= t.get("min_workers", 0) for t in gpu_types)
    # sized for 8B and larger: at least one type with 8 GPUs
    assert max(t["resources"]["GPU"] for t in gpu_types) >= 8


def test_schema_check_is_not_vacuous():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["available_node_types"]["head_cpu"].pop("node_config")
    try:
        jsonschema.validate(config, _schema())
    except jsonschema.ValidationError as err:
        assert "node_config" in str(err)
    else:
        raise AssertionError("a node type without node_config must not validate")


def test_every_config_file_starts_with_its_command():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and ("ecgray" in first or "python -m" in first or "ray " in first), path


# ------------------------------------------------------------------------------------ what `ray up` runs

RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)-(?P<platform>cu\d+|cpu)$")
# (vCPUs, GPUs, GB per GPU) of the EC2 instance types cluster.yaml uses
INSTANCES = {
    "m6i.2xlarge": (8, 0, 0), "m6i.4xlarge": (16, 0, 0), "g5.12xlarge": (48, 4, 24),
    "p4d.24xlarge": (96, 8, 40), "p5.48xlarge": (192, 8, 80),
}  # fmt: skip


def _config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _node_setup(config: dict) -> dict[str, list[str]]:
    """node type -> the setup commands Ray runs on it (Ray's own merge; a node type may override its own)."""
    from ray.autoscaler._private.util import merge_setup_commands

    merged = merge_setup_commands(dict(config))
    out = {}
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            out[name] = merged["head_setup_commands"]
        elif "worker_setup_commands" in node_type:
            out[name] = config["setup_commands"] + node_type["worker_setup_commands"]
        else:
            out[name] = merged["worker_setup_commands"]
    return out


def test_every_node_type_installs_the_project_pinned():
    for name, commands in _node_setup(_config()).items():
        text = "\n".join(commands)
        # the project itself, editable from the file mount, with CI's pins and the CUDA build of the same torch
        assert "cd ~/ecgray && pip install" in text and " -e ." in text, name
        assert "-c /tmp/constraints-gpu.txt" in text and "grep -v '^torch==' constraints.txt" in text, name
        torch_pin = next(
            line for line in (REPO / "constraints.txt").read_text().splitlines() if line.startswith("torch==")
        )
        assert f"torch=={torch_pin.split('==')[1].split('+')[0]}" in text, name
        assert "import ecgray, ray" in text, name


def test_token_is_generated_on_the_head_and_every_worker_gets_it(tmp_path):
    """Run the cluster's token commands for real: the head's setup (the installed `ray get-auth-token`),
    the autoscaler's copy of the file mounts to a worker (rsync_exclude respected), the worker's setup."""
    config = _config()
    head_cmds = [c for c in config["head_setup_commands"] if "auth_token" in c]
    worker_cmds = [c for c in config["worker_setup_commands"] if "auth_token" in c]
    assert any("ray get-auth-token --generate" in c for c in head_cmds)
    assert not any("get-auth-token" in c for c in worker_cmds)  # generated once, on the head only
    (mount,) = config["file_mounts"]  # ~/ecgray: the only mount, copied head -> worker by the autoscaler
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    head, worker = tmp_path / "head", tmp_path / "worker"
    for home in (head, worker):
        (home / mount.removeprefix("~/")).mkdir(parents=True)

    def run(commands: list[str], home: Path) -> None:
        for command in commands:
            out = subprocess.run(["bash", "-c", command], env={**env, "HOME": str(home)},
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
            assert out.returncode == 0, f"{command}\n{out.stderr[-2000:]}"

    run(head_cmds, head)
    run(head_cmds, head)  # `ray up` again keeps the token
    token = (head / ".ray" / "auth_token").read_text()
    assert len(token) >= 32 and (head / ".ray" / "auth_token").stat().st_mode & 0o077 == 0
    excludes = config["rsync_exclude"]
    shutil.copytree(
        head / mount.removeprefix("~/"), worker / mount.removeprefix("~/"), dirs_exist_ok=True,
        ignore=lambda d, names: [n for n in names if any(fnmatch.fnmatch(n, e.removeprefix("**/")) for e in excludes)],
    )  # fmt: skip
    run(worker_cmds, worker)
    installed = worker / ".ray" / "auth_token"
    assert installed.read_text() == token and installed.stat().st_mode & 0o077 == 0
    # a worker without the token fails its setup loudly instead of starting a Ray that cannot join
    empty = tmp_path / "empty"
    (empty / mount.removeprefix("~/")).mkdir(parents=True)
    out = subprocess.run(
        ["bash", "-c", worker_cmds[0]], env={**env, "HOME": str(empty)}, capture_output=True, text=True
    )
    assert out.returncode != 0 and "no Ray auth token" in out.stderr


def test_every_node_starts_ray_with_token_auth():
    config = _config()
    from ray.scripts.scripts import get_auth_token, start

    start_flags = {o for p in start.params for o in p.opts}
    assert "--generate" in {o for p in get_auth_token.params for o in p.opts}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start_cmd,) = [c for c in config[key] if "ray start" in c]
        assert "RAY_AUTH_MODE=token ray start" in start_cmd, key
        used = set(re.findall(r"(--[a-z-]+)", start_cmd.split("ray start", 1)[1]))
        assert used <= start_flags, f"{key}: unknown ray start flags {used - start_flags}"
    # shells on every node (ray exec, job drivers' children) see the same mode
    assert any("export RAY_AUTH_MODE=token" in c for c in config["setup_commands"])


def test_image_tag_is_pinned_to_the_installed_ray():
    config = _config()
    images = [config["docker"].get(k) for k in ("image", "head_image", "worker_image")]
    images += [t.get("docker", {}).get("worker_image") for t in config["available_node_types"].values()]
    for image in filter(None, images):
        match = RAY_IMAGE.match(image)
        assert match, (
            f"{image}: expected rayproject/ray:<x.y.z>-py3xx-cuXXX (no latest / nightly / -gpu alias)"
        )
        assert match["ray"] == ray.__version__, (
            f"{image}: the image's Ray must match the pinned ray {ray.__version__}"
        )
        assert match["py"] == f"{sys.version_info.major}{sys.version_info.minor}"
        assert match["platform"].startswith("cu")  # GPU workers need the CUDA image


def test_resources_match_the_instances_and_the_head_runs_no_work():
    config = _config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0
    assert head.get("max_workers", 0) == 0  # never a second head-type node as a worker
    for name, node_type in types.items():
        vcpus, gpus, _ = INSTANCES[node_type["node_config"]["InstanceType"]]
        res = node_type["resources"]
        assert res.get("GPU", 0) == gpus, (
            f"{name}: declares {res.get('GPU', 0)} GPUs, the instance has {gpus}"
        )
        if name != config["head_node_type"]:
            assert 0 < res["CPU"] <= vcpus, f"{name}: declares {res['CPU']} CPUs of {vcpus}"
            assert node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]
        # data and checkpoints on the user's bucket through an instance role, no keys on the nodes
        assert node_type["node_config"]["IamInstanceProfile"]["Name"].startswith("ecgray-"), name
        assert node_type["node_config"]["ImageId"].startswith(("ami-", "resolve:ssm:")), name
    assert any(t["resources"].get("GPU", 0) == 0 for n, t in types.items() if n != config["head_node_type"])
    region = config["provider"]["region"]
    assert any(f"AWS_DEFAULT_REGION={region}" in c for c in config["setup_commands"])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("paper_*.yaml")), ids=lambda p: p.stem)
def test_every_paper_config_fits_one_gpu_node_type(path):
    from ecgray.config import load_config

    cfg = load_config(path)
    # bf16 8B ~16 GB + activations; 70B at ZeRO-3 ~66 GB per GPU (BENCHMARKS.md); the others fit an A10G
    need_gb = 80 if "llama70b" in path.stem else 40 if "llama8b" in path.stem else 24
    fits = [
        name for name, t in _config()["available_node_types"].items()
        if t["resources"].get("GPU", 0) >= cfg.train.num_workers
        and t["resources"]["CPU"] >= cfg.train.num_workers * cfg.train.cpus_per_worker
        and INSTANCES[t["node_config"]["InstanceType"]][2] >= need_gb
    ]  # fmt: skip
    assert fits, f"{path.name}: no node type holds {cfg.train.num_workers} workers with {need_gb} GB GPUs"


# ------------------------------------------------------------------ jobs: the work goes where a GPU is


def test_placement_uses_a_gpu_when_the_cluster_has_or_can_add_one():
    from jobs._placement import placement

    gpu_types = {"gpu_a10g_x4": {"resources": {"CPU": 48, "GPU": 4}, "max_workers": 4}}
    none_up = {"CPU": 0.0, "memory": 1e10}  # head only (CPU 0), every worker scaled to zero
    assert placement("auto", {"CPU": 48.0, "GPU": 4.0}, {}, 4).num_gpus == 1
    assert placement("auto", none_up, gpu_types, 4).device == "cuda"
    never_started = {"gpu_off": {"resources": {"CPU": 96, "GPU": 8}, "max_workers": 0}}
    assert placement("auto", none_up, never_started, 4).device == "cpu"
    cpu_only = placement("auto", {"CPU": 16.0}, {"cpu": {"resources": {"CPU": 16}, "max_workers": 4}}, 4)
    assert (cpu_only.num_gpus, cpu_only.device, cpu_only.num_cpus) == (0, "cpu", 4)
    assert "no GPU" in cpu_only.reason and "--run-on gpu" in cpu_only.reason
    # the flags win over detection
    assert placement("cpu", {"CPU": 48.0, "GPU": 4.0}, gpu_types, 2).device == "cpu"
    assert placement("gpu", {"CPU": 16.0}, {}, 2).num_gpus == 1
    with pytest.raises(ValueError, match="--task-cpus=0"):
        placement("auto", {}, {}, 0)


def test_autoscaler_node_types_come_from_the_bootstrap_config(tmp_path):
    from jobs._placement import autoscaler_node_types, placement

    assert autoscaler_node_types(tmp_path / "missing.yaml") == {}
    # what `ray up` writes on the head: this cluster.yaml, as JSON
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text(json.dumps(_config()))
    types = autoscaler_node_types(bootstrap)
    assert set(types) == set(_config()["available_node_types"])
    assert placement("auto", {"CPU": 0.0}, types, 4).device == "cuda"


FAKE_JOB = """
import argparse, pathlib

def add_arguments(parser):
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", dest="overrides", nargs="*", default=[])

def run(args):
    out = pathlib.Path(args.out)
    (out / "sub").mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(" ".join(args.overrides))
    (out / "sub" / "weights.bin").write_bytes(bytes(range(5)))
    return 3
"""


@pytest.fixture
def fake_job(tmp_path, monkeypatch):
    for key in ("RAY_DATA_LOGGING_CONFIG", "RAY_DATA_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(key, raising=False)  # run_in_task quiets logs in this process
    (tmp_path / "fake_job_module.py").write_text(FAKE_JOB)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "prepared"
    data.mkdir()
    return argparse.Namespace(data=str(data), out=str(tmp_path / "out"), overrides=["seed=1"])


def test_task_on_the_drivers_node_writes_in_place(fake_job):
    from jobs._placement import run_in_task

    code, files = run_in_task("fake_job_module", fake_job, "cuda", driver_node="n1", this_node="n1")
    assert (code, files) == (3, None)
    assert (Path(fake_job.out) / "result.json").read_text() == "seed=1 device=cuda"


def test_task_on_another_node_sends_its_files_back(fake_job, tmp_path):
    from jobs._placement import run_in_task, write_back

    code, files = run_in_task("fake_job_module", fake_job, "cpu", driver_node="head", this_node="gpu-node")
    assert code == 3 and set(files) == {"result.json", "sub/weights.bin"}
    driver_out = tmp_path / "driver_side"
    write_back(str(driver_out), files)
    assert (driver_out / "result.json").read_text() == "seed=1 device=cpu"
    assert (driver_out / "sub" / "weights.bin").read_bytes() == bytes(range(5))


def test_task_names_an_input_its_node_cannot_read(fake_job, capsys):
    from jobs._placement import run_in_task

    fake_job.data = "/nonexistent/prepared"
    assert run_in_task("fake_job_module", fake_job, "cuda", "head", "gpu-node") == (2, None)
    err = capsys.readouterr().err
    assert "--data /nonexistent/prepared: not found on node gpu-node" in err and "s3://" in err
    assert not Path(fake_job.out).exists()


@pytest.mark.parametrize("job", ["evaluate", "pretrain_encoder"])
def test_gpu_jobs_offer_the_placement_flags(job, capsys):
    from jobs._placement import main

    text = (REPO / "jobs" / f"{job}.py").read_text()
    assert "from jobs._placement import main" in text
    module = {"evaluate": "ecgray.eval.cli", "pretrain_encoder": "ecgray.train.pretrain_encoder"}[job]
    with pytest.raises(SystemExit) as exit_info:
        main(module, f"jobs.{job}", "help test", ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--run-on {auto,gpu,cpu}" in out and "--task-cpus" in out and "--data" in out

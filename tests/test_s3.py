"""prepare -> features -> train -> eval with every location on an S3-compatible server (moto's server mode on
127.0.0.1, started by the test and stopped after it): prepared shards, the encoder checkpoint, the features,
the run's checkpoints and the eval results live in the bucket; the commands run as a user runs them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUCKET = "ecgray-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(tmp_path):
    """moto's S3 server in its own process; -> the environment that points pyarrow (and so Ray, Ray Train
    and every ecgray process) at it, with the bucket created."""
    pytest.importorskip("moto.server", reason="moto[server] is a dev dependency (pyproject.toml)")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("RAY_ADDRESS", None)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail("moto's S3 server did not come up")
                time.sleep(0.3)
        subprocess.run(
            # from_uri reads AWS_ENDPOINT_URL (pyarrow's S3FileSystem() constructor does not)
            [sys.executable, "-c", "import pyarrow.fs as f; "
             f"f.FileSystem.from_uri('s3://{BUCKET}?allow_bucket_creation=true')[0].create_dir('{BUCKET}')"],
            env=env, check=True, timeout=60,
        )  # fmt: skip
        yield env
    finally:
        server.terminate()
        server.wait(timeout=10)


def ecgray(env: dict, *args: str, timeout: int = 900) -> str:
    """Run `ecgray ARGS` as a user would; -> its stdout (a failure shows the tail of both streams)."""
    proc = subprocess.run(
        [sys.executable, "-m", "ecgray.cli", *args], env=env, cwd=REPO, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, (
        f"ecgray {args[0]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    )
    return proc.stdout


def listing(env: dict, prefix: str) -> list[str]:
    code = (
        f"import json, pyarrow.fs as f; fs = f.FileSystem.from_uri('s3://{BUCKET}')[0]; "
        f"print(json.dumps([i.path for i in fs.get_file_info(f.FileSelector('{prefix}', recursive=True))]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.slow
def test_prepare_features_train_eval_on_object_storage(s3_server, tmp_path):
    env = s3_server
    s3 = f"s3://{BUCKET}"
    ecgray(env, "synth", "--out", str(tmp_path / "synth"), "--patients", "500", "--quiet")
    ecgray(env, "prepare", "--ptbxl", str(tmp_path / "synth/ptbxl"), "--ecgqa", str(tmp_path / "synth/ecgqa"),
           "--out", f"{s3}/prepared")  # fmt: skip
    assert f"{BUCKET}/prepared/report.json" in listing(env, f"{BUCKET}/prepared")

    # a frozen encoder checkpoint in the bucket (random weights: this test is about where things live)
    make_encoder = (
        "from ecgray.config import load_config; from ecgray.models.encoder import build_encoder, save_encoder; "
        "from ecgray import storage; import sys; "
        "cfg = load_config('configs/smoke.yaml'); "
        f"save_encoder(build_encoder(cfg.encoder), '{tmp_path}/encoder.safetensors'); "
        f"storage.write_bytes('{s3}/models/encoder.safetensors', open('{tmp_path}/encoder.safetensors', 'rb').read())"
    )
    subprocess.run([sys.executable, "-c", make_encoder], env=env, cwd=REPO, check=True, timeout=120)

    common = [f"data.prepared_dir={s3}/prepared", f"encoder.checkpoint={s3}/models/encoder.safetensors",
              "encoder.random_init=false"]  # fmt: skip
    ecgray(env, "features", "--config", "configs/smoke.yaml", "--set", *common)
    features = [p for p in listing(env, f"{BUCKET}/prepared/features") if p.endswith(".parquet")]
    assert features, "no features written to the bucket"

    out = ecgray(env, "train", "--config", "configs/smoke.yaml", "--set", *common,
                 f"train.storage_path={s3}/runs", "train.name=s3run", "meta.outer_steps=2",
                 "meta.eval_every=2", "meta.checkpoint_every=2", "meta.eval_episodes=2")  # fmt: skip
    checkpoint = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("checkpoint: "))
    assert checkpoint.startswith(f"{s3}/runs/s3run/"), checkpoint
    objects = listing(env, f"{BUCKET}/runs/s3run")
    assert any(p.endswith("mapper.safetensors") for p in objects), objects

    ecgray(env, "eval", "--checkpoint", checkpoint, "--data", f"{s3}/prepared", "--out", f"{s3}/eval",
           "--no-progress", "--set", "eval.episodes=2", "eval.baselines=[text_lookup]", "eval.lead_subsets={}")  # fmt: skip
    results = listing(env, f"{BUCKET}/eval")
    assert f"{BUCKET}/eval/results.json" in results and f"{BUCKET}/eval/accuracy_vs_step.png" in results
    nothing_local = [p for p in ("data", "runs") if (tmp_path / p).exists()]
    assert not nothing_local

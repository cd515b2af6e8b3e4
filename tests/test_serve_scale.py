"""The service scaled out, over real HTTP on 127.0.0.1 (Ray Serve, tiny-llama): adapters any replica can
use, a killed replica replaced without failed answers afterwards, autoscaling up under load and down when
idle, adaptation apart from answering, overload answered at once with 503 + Retry-After, and
`ecgray serve --replicas 2` end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from test_serve import QUESTION, TREE, ecg, free_port, support_set, tiny_checkpoint
from tolerances import rounding_tolerance

pytestmark = pytest.mark.slow

# enough inner steps that one adaptation takes a while: answers must not wait for it
SCALE_TREE = {**TREE, "meta": {"inner_steps": 250, "inner_lr": 0.5}}
MAX_ADAPTATIONS = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("scale"), SCALE_TREE)


@pytest.fixture(scope="module")
def proxy(ray_session):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def wait_healthy(url: str, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not become healthy within {timeout_s} s")


def deploy(proxy: str, name: str, checkpoint, store, **serve_fields) -> str:
    import ray
    from ray import serve

    from ecgray.config import ServeConfig
    from serve.app import ServeArgs, build_app, required_cpus

    # half a CPU per replica: the apps of this module fit the session's 4 logical CPUs side by side
    cfg = ServeConfig(checkpoint=str(checkpoint), adapter_store=str(store), max_duration_s=30.0,
                      health_check_period_s=2.0, replica_cpus=0.5, **serve_fields)  # fmt: skip
    free = ray.available_resources().get("CPU", 0.0)
    if required_cpus(cfg) > free:  # serve.run would wait for them forever
        pytest.fail(f"app {name} needs {required_cpus(cfg)} CPUs; the test Ray has {free} free")
    serve.run(build_app(ServeArgs(serve=cfg)), name=name, route_prefix=f"/{name}", blocking=False)
    url = f"{proxy}/{name}"
    wait_healthy(url)
    return url


def running(name: str, deployment: str = "Answering") -> int:
    from ray import serve

    states = serve.status().applications[name].deployments[deployment].replica_states
    return int(states.get("RUNNING", 0))


def wait_for(predicate, timeout_s: float, what: str, step: float = 0.5) -> float:
    start = time.time()
    while not predicate():
        if time.time() - start > timeout_s:
            pytest.fail(f"{what}: not within {timeout_s} s")
        time.sleep(step)
    return time.time() - start


def answer(url: str, adapter: str, seed: int = 1, header: bool = False) -> httpx.Response:
    body = {"question": QUESTION, "ecgs": [ecg(seed)], "options": ["yes", "no"]}
    headers = {"serve_multiplexed_model_id": adapter} if header else {}
    if not header:
        body["adapter_id"] = adapter
    return httpx.post(f"{url}/v1/answer", json=body, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def two(proxy, checkpoint, tmp_path_factory):
    """A 2-replica service and one adapter made on it."""
    url = deploy(proxy, "two", checkpoint, tmp_path_factory.mktemp("store"), min_replicas=2, max_replicas=2)
    assert running("two") == 2
    r = httpx.post(f"{url}/v1/adapt", json={"support": support_set()}, timeout=300)
    assert r.status_code == 200 and r.json()["adapted"], r.text
    yield url, r.json()["adapter_id"]
    from ray import serve

    serve.delete("two")


def test_two_replicas_answer_every_adapter_id_request_alike(two):
    url, adapter = two
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: answer(url, adapter, header=i % 2 == 1), range(40)))
    assert [r.status_code for r in responses] == [200] * 40, [
        r.text[:200] for r in responses if r.status_code != 200
    ]
    # identical answers whichever replica and batch served them; scores equal to rounding (batch
    # composition changes the order of the sums; the longest is the vocabulary's log-softmax)
    assert {r.json()["answers"][0]["answer"] for r in responses} == {
        responses[0].json()["answers"][0]["answer"]
    }
    scores = torch.tensor([[r.json()["answers"][0]["scores"][o] for o in ("yes", "no")] for r in responses])
    torch.testing.assert_close(scores, scores[:1].expand_as(scores), **rounding_tolerance(scores, 32_000))
    assert {r.json()["adapter_id"] for r in responses} == {adapter}
    # the header and the body must agree where both are given
    r = httpx.post(f"{url}/v1/answer", json={"question": QUESTION, "ecgs": [ecg(1)], "adapter_id": adapter},
                   headers={"serve_multiplexed_model_id": "ad-" + "0" * 32}, timeout=60)  # fmt: skip
    assert r.status_code == 422 and r.json()["field"] == "adapter_id"


def test_a_killed_replica_is_replaced_and_answers_keep_succeeding(two):
    import ray

    url, adapter = two
    before = answer(url, adapter)
    assert before.status_code == 200
    victim = before.json()["answers"][0]["replica"]  # the replica holding the adapter
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    # the other replica loads the adapter from the store; Serve starts a replacement
    wait_for(lambda: answer(url, adapter).status_code == 200, 60, "an answer after the kill")
    wait_for(lambda: running("two") == 2, 180, "Serve replacing the killed replica")
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda i: answer(url, adapter), range(20)))
    assert [r.status_code for r in responses] == [200] * 20
    assert victim not in {r.json()["answers"][0]["replica"] for r in responses}
    scores = torch.tensor([[r.json()["answers"][0]["scores"][o] for o in ("yes", "no")] for r in responses])
    ref = torch.tensor([[before.json()["answers"][0]["scores"][o] for o in ("yes", "no")]]).expand_as(scores)
    torch.testing.assert_close(scores, ref, **rounding_tolerance(ref, 32_000))


def test_adaptation_in_flight_does_not_delay_cached_answers(two):
    """While the adaptation deployment runs its inner loops, cached-adapter answers keep completing: at least
    3 answers are sent after an adaptation began and come back before it ends. An answer that waited behind
    the inner loop could not fit inside it, so the assertion is on ordering, never on a number of seconds.
    Adaptations of distinct support sets run back to back until that happens, so a faster machine (shorter
    inner loops) runs more of them instead of failing; MAX_ADAPTATIONS only bounds a broken service."""
    url, adapter = two
    adaptations, answers = [], []  # (sent, received) of each request, on one perf_counter clock
    enough = threading.Event()

    def adapt_back_to_back() -> None:
        with httpx.Client(timeout=600) as client:
            for k in range(MAX_ADAPTATIONS):
                sent = time.perf_counter()
                r = client.post(f"{url}/v1/adapt", json={"support": support_set(offset=70 + 10 * k)})
                adaptations.append((sent, time.perf_counter()))
                assert r.status_code == 200 and r.json()["adapted"], r.text
                if enough.is_set():
                    return

    def inside_one_adaptation() -> int:
        return max(
            (sum(s0 <= a0 and a1 <= s1 for a0, a1 in answers) for s0, s1 in list(adaptations)), default=0
        )

    with ThreadPoolExecutor(1) as pool:
        adapting = pool.submit(adapt_back_to_back)
        while not adapting.done():
            sent = time.perf_counter()
            assert answer(url, adapter, seed=600 + len(answers)).status_code == 200
            answers.append((sent, time.perf_counter()))
            if inside_one_adaptation() >= 3:
                enough.set()
        adapting.result()
    assert inside_one_adaptation() >= 3, (
        f"{len(answers)} answers over {len(adaptations)} adaptations, at most {inside_one_adaptation()} "
        "inside one: answers wait for the inner loop"
    )


def test_overload_is_a_fast_503_with_retry_after(proxy, checkpoint, tmp_path_factory):
    from ray import serve

    url = deploy(proxy, "busy", checkpoint, tmp_path_factory.mktemp("store"), adapter_max_ongoing_requests=1,
                 adapter_max_queued_requests=1, retry_after_s=7)  # fmt: skip

    def adapt(k):
        t = time.perf_counter()
        r = httpx.post(f"{url}/v1/adapt", json={"support": support_set(offset=200 + 10 * k)}, timeout=600)
        return r, time.perf_counter() - t

    try:
        with ThreadPoolExecutor(5) as pool:
            results = list(pool.map(adapt, range(5)))
    finally:
        serve.delete("busy")
    statuses = [r.status_code for r, _ in results]
    assert statuses.count(200) >= 1 and set(statuses) <= {200, 503}, statuses
    rejected = [(r, s) for r, s in results if r.status_code == 503]
    assert rejected, statuses
    for r, seconds in rejected:
        assert r.headers["retry-after"] == "7" and r.json()["field"] == "adaptation"
        assert seconds < min(s for q, s in results if q.status_code == 200)  # refused, not queued


def test_autoscaling_adds_a_replica_under_load_and_removes_it_when_idle(proxy, checkpoint, tmp_path_factory):
    from ray import serve

    name = "auto"
    url = deploy(proxy, name, checkpoint, tmp_path_factory.mktemp("store"), min_replicas=1, max_replicas=2,
                 target_ongoing_requests=1, upscale_delay_s=1, downscale_delay_s=4,
                 look_back_period_s=2, max_batch_size=1)  # fmt: skip
    try:
        assert running(name) == 1
        stop = False

        def client(k: int) -> int:
            n = 0
            with httpx.Client(timeout=120) as c:
                while not stop:
                    body = {
                        "question": QUESTION,
                        "ecgs": [ecg(900 + k)],
                        "zero_shot": True,
                        "options": ["yes", "no"],
                    }
                    assert c.post(f"{url}/v1/answer", json=body).status_code == 200
                    n += 1
            return n

        with ThreadPoolExecutor(6) as pool:
            clients = [pool.submit(client, k) for k in range(6)]
            try:
                up = wait_for(lambda: running(name) == 2, 120, "a second replica under load")
            finally:
                stop = True
            assert sum(c.result() for c in clients) > 0
        down = wait_for(lambda: running(name) == 1, 120, "back to one replica when idle")
        print(f"autoscaling: up after {up:.1f} s of load, down after {down:.1f} s idle")
    finally:
        serve.delete(name)


def test_ecgray_serve_replicas_2_from_the_command_line(checkpoint, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ecgray.cli", "serve", "--checkpoint", str(checkpoint), "--replicas", "2",
         "--port", str(port), "--adapter-store", str(tmp_path / "adapters")],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"ecgray serve did not come up:\n{(tmp_path / 'serve.log').read_text()[-3000:]}")
            time.sleep(1)
        info = httpx.get(f"{url}/v1/info", timeout=30).json()
        assert info["serve"]["min_replicas"] == info["serve"]["max_replicas"] == 2
        r = httpx.post(f"{url}/v1/adapt", json={"support": support_set()}, timeout=300)
        assert r.status_code == 200, r.text
        adapter = r.json()["adapter_id"]
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda i: answer(url, adapter, seed=i % 4), range(40)))
        assert [r.status_code for r in responses] == [200] * 40
        assert (tmp_path / "adapters" / f"{adapter}.safetensors").is_file()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

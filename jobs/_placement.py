"""A job whose work wants a GPU (evaluate, pretrain_encoder): the `ecgray <command>` module's arguments and
`run`, executed as one Ray task on a GPU when the connected cluster has one (or can add one), else on CPU.

Under `ray job submit` the driver runs on the head, which runs no work (`resources: {CPU: 0}` in
cluster.yaml); it only decides where the work goes and submits it as a task:
  --run-on auto (default)  one GPU when the cluster has one now (`ray.cluster_resources()`), or when the
                           autoscaler can start a node type with GPUs (cluster.yaml's node types, which
                           `ray up` leaves on the head in ~/ray_bootstrap_config.yaml); otherwise CPU
  --run-on gpu             always one GPU (waits for the autoscaler to add a GPU node)
  --run-on cpu             CPU only, even on a GPU cluster
The task's module gets `--set device=cuda` or `device=cpu` to match what Ray reserved for it.

Files: a local `--out` is written on the task's node; when that is not the driver's node, its files come
back to the same path on the driver's node. Inputs (--data, --checkpoint) must be readable from the task's
node: on a multi-node cluster give object-storage locations (s3://...).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")
"""Where `ray up` leaves the cluster config on the head (JSON), for the autoscaler it starts there."""

INPUT_FLAGS = ("data", "checkpoint")
"""Module arguments naming inputs that the task's node must be able to read."""


@dataclass(frozen=True)
class Placement:
    """Where a job's task runs: Ray resources to reserve and the torch device that matches them."""

    num_gpus: int
    num_cpus: int
    device: str  # "cuda" | "cpu": the module's `device` config key
    reason: str


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run-on", choices=("auto", "gpu", "cpu"), default="auto",
        help="auto (default): a GPU when the Ray cluster has or can add one, else CPU; gpu: always ask for a "
             "GPU (the autoscaler adds a GPU node); cpu: CPU only",
    )  # fmt: skip
    parser.add_argument(
        "--task-cpus", type=int, default=4, help="CPUs the task reserves (torch threads), default 4"
    )


def scalable_gpus(node_types: dict) -> int:
    """GPUs per node of the largest autoscaler node type that may start (max_workers > 0)."""
    return max(
        (
            int(t.get("resources", {}).get("GPU", 0))
            for t in node_types.values()
            if t.get("max_workers", 0) > 0
        ),
        default=0,
    )


def placement(run_on: str, resources: dict, node_types: dict, cpus: int) -> Placement:
    """Decide from `ray.cluster_resources()` (live nodes) and the autoscaler's node types ({} without one)."""
    if cpus < 1:
        raise ValueError(f"--task-cpus={cpus}: must be >= 1")
    live = resources.get("GPU", 0)
    if run_on == "cpu":
        return Placement(0, cpus, "cpu", "--run-on cpu")
    if run_on == "gpu":
        return Placement(1, cpus, "cuda", f"--run-on gpu (the cluster has {live:g} GPUs now)")
    if run_on != "auto":
        raise ValueError(f"--run-on {run_on!r}: expected auto, gpu or cpu")
    if live >= 1:
        return Placement(1, cpus, "cuda", f"the cluster has {live:g} GPUs")
    if scalable_gpus(node_types) >= 1:
        return Placement(1, cpus, "cuda", "no GPU node is up, the autoscaler will start one")
    return Placement(0, cpus, "cpu", "the cluster has no GPU (--run-on gpu waits for one)")


def autoscaler_node_types(path: Path = BOOTSTRAP_CONFIG) -> dict:
    """The node types of the cluster-launcher config on this (head) node; {} elsewhere."""
    path = path.expanduser()
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get("available_node_types", {})


def run_in_task(module_name: str, args: argparse.Namespace, device: str, driver_node: str, this_node: str):
    """The task body: quiet logs, check inputs, run the module with `device` -> (exit code, files of a local
    --out when this is not the driver's node, else None)."""
    from ecgray import storage
    from ecgray.logs import quiet_frameworks, say

    quiet_frameworks()
    for flag in INPUT_FLAGS:
        location = getattr(args, flag, None)
        if location and not storage.is_uri(location) and not Path(location).exists():
            where = "" if this_node == driver_node else f" on node {this_node}, where the job's task runs"
            say(
                f"{module_name}: --{flag} {location}: not found{where}. On a multi-node cluster give object "
                "storage (s3://<your-bucket>/...) or a filesystem every node mounts.",
                err=True,
            )
            return 2, None
    args.overrides = [*args.overrides, f"device={device}"]
    code = int(importlib.import_module(module_name).run(args) or 0)
    out = getattr(args, "out", None)
    if this_node == driver_node or not out or storage.is_uri(out) or not Path(out).is_dir():
        return code, None
    root = Path(out)
    return code, {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_back(out: str, files: dict[str, bytes]) -> None:
    """Put the task's output files under `out` on this (the driver's) node."""
    root = Path(out)
    for name, data in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def main(module_name: str, prog: str, description: str, argv: list[str] | None = None) -> int:
    """`python -m jobs.<prog>`: parse the module's arguments (+ --run-on, --task-cpus), place, run, return
    the module's exit code."""
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=description)
    module.add_arguments(parser)
    add_placement_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from ecgray import storage
    from ecgray.logs import command_console

    out = getattr(args, "out", None)
    if out and not storage.is_uri(out):
        args.out = storage.resolve(out)  # the same absolute path on the task's node and back here
    with command_console(module, args, prog):
        return place_and_run(module, module_name, args, prog)


def place_and_run(module, module_name: str, args: argparse.Namespace, prog: str) -> int:
    """Connect to Ray, decide where the work runs, run it there -> the module's exit code."""
    import ray

    from ecgray.logs import quiet_frameworks, runtime_env, say

    quiet_frameworks()
    if not ray.is_initialized():
        ray.init(runtime_env=runtime_env())  # merged with a submitted job's own runtime_env
    where = placement(args.run_on, ray.cluster_resources(), autoscaler_node_types(), args.task_cpus)
    say(f"{prog}: running on {where.device} ({where.reason})", err=True)
    driver_node = ray.get_runtime_context().get_node_id()
    if where.num_gpus == 0:
        # CPU: here, in the driver, which reserves nothing, so the module's own Ray work (the features
        # stage's actors) gets the cluster's CPUs; a task holding them would wait on itself
        return run_in_task(module_name, args, "cpu", driver_node, driver_node)[0]
    before = getattr(module, "before_task", None)
    if before is not None:  # e.g. eval's features: a Ray Data job that must not wait for the task's GPU
        before(args)
    task = ray.remote(_task).options(
        num_gpus=where.num_gpus, num_cpus=where.num_cpus, name=f"{prog}[{where.device}]"
    )
    code, files = ray.get(task.remote(module_name, args, where.device, driver_node))
    if files:
        write_back(args.out, files)
        say(f"{prog}: copied {len(files)} files from the task's node to {args.out}", err=True)
    return code


def _task(module_name: str, args: argparse.Namespace, device: str, driver_node: str):
    import ray  # Ray sets OMP_NUM_THREADS to the task's num_cpus

    return run_in_task(module_name, args, device, driver_node, ray.get_runtime_context().get_node_id())

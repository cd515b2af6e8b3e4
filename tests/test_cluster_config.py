"""cluster.yaml must validate against the cluster-config schema that ships inside the ray package."""

import json
from pathlib import Path

import jsonschema
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

"""`ecgray features`: the frozen encoder's outputs computed once with Ray Data, keyed, committed last, read lazily."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tolerances import rounding_tolerance

from ecgray import features as F
from ecgray.config import load_config
from ecgray.train.toy import toy_overrides, write_toy_prepared

pytestmark = pytest.mark.filterwarnings("ignore:encoder.checkpoint is None")


def split_shards(prepared: Path, n: int = 2) -> Path:
    """Rewrite the toy's one ecgs/ shard as n shards (the job and the reader then see several files)."""
    shard = prepared / "ecgs" / "part-00000.parquet"
    table = pq.read_table(shard)
    shard.unlink()
    step = -(-table.num_rows // n)
    for i in range(n):
        pq.write_table(table.slice(i * step, step), prepared / "ecgs" / f"part-{i:05d}.parquet")
    return prepared


def toy_config(prepared, *extra: str):
    return load_config(None, [*toy_overrides(prepared), *extra])


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return split_shards(write_toy_prepared(tmp_path_factory.mktemp("prepared")))


def direct(cfg, ecg_ids):
    """The frozen encoder applied as the model applies it (ECGLanguageModel.encode), all ECGs in one batch."""
    from ecgray.data.shards import ECGStore
    from ecgray.models.ecg_lm import build_model

    store = ECGStore.open(cfg.data.prepared_dir)
    lm = build_model(cfg, "cpu")
    signals = torch.from_numpy(np.array(store.signals(ecg_ids)))  # (B, 12, T), a writable copy
    return lm.encode(signals, torch.from_numpy(store.lead_mask(ecg_ids)))


def tolerance(cfg, reference):
    # fp32; the ray batches differ from the one reference batch, so sums run in other orders. The longest
    # reduction on the way: the patchifying conv (stem_channels * patch terms).
    return rounding_tolerance(reference, reduction=cfg.encoder.stem_channels * cfg.encoder.patch)


# ----------------------------------------------------------------------------------------- without Ray


def test_actor_plan_from_cluster_resources():
    assert F.actor_plan({"CPU": 2.0}, gpu=False) == F.ActorPlan(1, 1.0, 0.0, "cpu", 1, 32)
    assert F.actor_plan({"CPU": 16.0}, gpu=False) == F.ActorPlan(3, 5.0, 0.0, "cpu", 5, 32)
    assert F.actor_plan({"CPU": 64.0}, gpu=False).actors == 15
    # more actors than free CPUs share them
    assert F.actor_plan({"CPU": 4.0}, gpu=False, actors=6).num_cpus == pytest.approx(0.5)
    assert F.actor_plan({"CPU": 16.0, "GPU": 4.0}, gpu=True) == F.ActorPlan(4, 1.0, 1.0, "cuda", 1, 256)
    assert F.actor_plan({"CPU": 16.0, "GPU": 2.0}, gpu=True, actors=4, batch_size=64).num_gpus == 0.5
    with pytest.raises(ValueError, match="the Ray cluster has no GPU"):
        F.actor_plan({"CPU": 8.0}, gpu=True)
    with pytest.raises(ValueError, match="--actors 0: expected >= 1"):
        F.actor_plan({"CPU": 8.0}, gpu=False, actors=0)


def test_gpu_actors_when_the_run_or_the_cluster_has_gpus(toy):
    assert F._gpu_wanted(toy_config(toy), {"CPU": 4.0}) is False
    assert F._gpu_wanted(toy_config(toy), {"CPU": 4.0, "GPU": 1.0}) is True
    assert F._gpu_wanted(toy_config(toy, "train.use_gpu=true"), {"CPU": 4.0}) is True
    assert F._gpu_wanted(toy_config(toy, "device=cpu"), {"CPU": 4.0, "GPU": 1.0}) is False


def test_key_follows_the_encoder_weights_the_data_and_tokens(toy, tmp_path):
    from ecgray.models.encoder import build_encoder, save_encoder

    cfg = toy_config(toy)
    key = F.feature_key(cfg)
    assert len(key) == 16 and key == F.feature_key(cfg)  # deterministic
    assert F.feature_key(toy_config(toy, "seed=1")) != key  # another random encoder
    assert F.feature_key(toy_config(toy, "encoder.normalize=lead")) != key  # another input step
    assert F.feature_key(cfg, tokens=True) != key
    assert F.feature_key(toy_config(toy, "model.mapper=qformer")) == F.feature_key(cfg, tokens=True)
    # the data's identity is its shards' content, not their location: a copy has the same key
    copy = Path(shutil.copytree(toy, tmp_path / "copy", ignore=shutil.ignore_patterns("features")))
    assert F.feature_key(toy_config(copy)) == key
    write_toy_prepared(copy, seed=1)  # other signals, same names and shapes
    split_shards(copy)
    assert F.feature_key(toy_config(copy)) != key
    # a checkpoint: its bytes decide; the same file elsewhere gives the same key
    torch.manual_seed(0)
    a = save_encoder(build_encoder(cfg.encoder), tmp_path / "a" / "encoder.safetensors")
    b = save_encoder(build_encoder(cfg.encoder), tmp_path / "b" / "encoder.safetensors")
    shutil.copy(a, tmp_path / "a2.safetensors")
    key_a = F.feature_key(toy_config(toy, f"encoder.checkpoint={a}"))
    assert key_a == F.feature_key(toy_config(toy, f"encoder.checkpoint={tmp_path / 'a2.safetensors'}"))
    assert key_a != F.feature_key(toy_config(toy, f"encoder.checkpoint={b}"))
    assert key_a != key


def test_no_weights_no_data_are_refused(tmp_path, toy):
    with pytest.raises(ValueError, match="encoder.random_init=true"):
        F.feature_key(load_config(None, [*toy_overrides(toy), "encoder.random_init=false"]))
    with pytest.raises(FileNotFoundError, match="run `ecgray prepare`"):
        F.feature_key(toy_config(tmp_path / "empty"))


def test_half_written_folder_is_not_complete(toy, tmp_path):
    cfg = toy_config(toy)
    location = Path(F.features_folder(cfg, F.feature_key(cfg)))
    location.mkdir(parents=True)
    try:
        shutil.copy(toy / "ecgs" / "part-00000.parquet", location / "part-x.parquet")  # parts, no meta
        assert F.read_meta(str(location)) is None
        with pytest.raises(FileNotFoundError, match=r"half-written \(no features.json\)"):
            F.FeatureStore.open(str(location))
        with pytest.raises(FileNotFoundError, match="ecgray features --config"):
            F.open_features(cfg)
        with pytest.raises(FileNotFoundError, match=r"half-written .*compute them with `ecgray features"):
            F.features_location(cfg)
        assert not F.features_complete(cfg)
    finally:
        shutil.rmtree(location)


def test_cli_help(capsys):
    from ecgray.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["features", "--help"])
    assert exit_.value.code == 0
    assert "--actors" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ on Ray


@pytest.mark.slow
def test_features_equal_the_encoder_and_are_computed_once(toy, ray_session, capsys, monkeypatch):
    from ecgray.cli import main

    monkeypatch.setattr(F, "MAX_GROUP_ROWS", 16)  # 120 ECGs -> several row groups: reads can be partial
    cfg = toy_config(toy)
    report = F.compute_features(cfg, progress=False)
    assert report["computed"] and report["location"] == F.features_folder(cfg, F.feature_key(cfg))
    location = Path(report["location"])
    ids = pq.read_table(sorted((toy / "ecgs").glob("*.parquet")), columns=["ecg_id"])["ecg_id"].to_numpy()
    store = F.FeatureStore.open(str(location), key=report["key"])
    # every ECG once, pooled only (the attention mapper reads no tokens)
    assert len(store) == len(ids) == report["n_ecgs"] == 120
    assert np.array_equal(np.sort(store.ecg_ids), np.sort(ids))
    assert store.d_enc == 16 and store.n_tokens == 4 and not store.has_tokens and store.key == report["key"]
    assert ids[0] in store and 10_000 not in store
    assert pq.read_schema(next(location.glob("part-*.parquet"))).names == ["ecg_id", "pooled"]

    order = [int(i) for i in ids[::-1]]
    tokens, pooled = store.features(order)
    assert tokens is None and pooled.dtype == torch.float32 and pooled.shape == (120, 16)
    _, ref = direct(cfg, order)
    torch.testing.assert_close(pooled, ref, **tolerance(cfg, ref))
    assert float(ref.abs().max()) > 0.1  # not all zeros
    one_tokens, one = store.features([order[5]])
    torch.testing.assert_close(one[0], pooled[5], rtol=0, atol=0)
    with pytest.raises(KeyError, match="ecg_id 10000 is not in"):
        store.features([order[0], 10_000])

    # a reader opened afresh decodes only the row group of the ECG asked for
    fresh = F.FeatureStore.open(str(location))
    fresh.features([order[0]])
    groups = sum(pq.ParquetFile(p).num_row_groups for p in location.glob("part-*.parquet"))
    assert report["row_group_rows"] == 16 and groups >= 120 // 16
    assert fresh.rows.groups_read == 1

    # the second call (and ensure_features, and the CLI) reuse them: nothing is rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in location.iterdir()}
    again = F.compute_features(cfg, progress=False)
    assert not again["computed"] and again["created"] == report["created"]
    assert F.ensure_features(cfg, progress=False) == str(location)
    assert main(["features", "--no-progress", "--set", *toy_overrides(toy)]) == 0
    assert "already complete, reused" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in location.iterdir()} == mtimes
    assert F.open_features(cfg).key == report["key"]
    assert F.features_location(cfg) == str(location) and F.features_complete(cfg)


@pytest.mark.slow
def test_tokens_are_stored_when_the_mapper_reads_them(toy, ray_session):
    cfg = toy_config(toy, "model.mapper=qformer", "model.qformer_width=16", "model.qformer_layers=1")
    report = F.compute_features(cfg, progress=False)
    assert report["tokens"] and report["key"] == F.feature_key(cfg, tokens=True)
    store = F.open_features(cfg)
    assert store.has_tokens
    ids = [int(i) for i in store.ecg_ids[:40]]
    tokens, pooled = store.features(ids)
    ref_tokens, ref_pooled = direct(cfg, ids)
    assert tokens.shape == (40, 4, 16) == ref_tokens.shape
    torch.testing.assert_close(tokens, ref_tokens, **tolerance(cfg, ref_tokens))
    torch.testing.assert_close(pooled, ref_pooled, **tolerance(cfg, ref_pooled))
    # tokens=False: the same folder read for pooled vectors only
    no_tokens, same = F.FeatureStore.open(report["location"], tokens=False).features(ids)
    assert no_tokens is None and torch.equal(same, pooled)


@pytest.mark.slow
def test_a_new_encoder_is_a_new_key_and_old_features_are_refused(toy, ray_session):
    old_cfg, new_cfg = toy_config(toy), toy_config(toy, "seed=1")
    old = F.compute_features(old_cfg, progress=False)
    new_key = F.feature_key(new_cfg)
    assert new_key != old["key"]
    with pytest.raises(F.StaleFeaturesError) as err:
        F.FeatureStore.open(old["location"], key=new_key)
    message = str(err.value)
    assert old["key"] in message and new_key in message and "ecgray features --config" in message
    # a features folder copied under another key's name says what changed
    impostor = Path(F.features_folder(new_cfg, new_key))
    shutil.copytree(old["location"], impostor)
    with pytest.raises(F.StaleFeaturesError, match=r"what changed: weights\)"):
        F.features_location(new_cfg)
    with pytest.raises(F.StaleFeaturesError, match=old["key"]):
        F.compute_features(new_cfg, progress=False)
    shutil.rmtree(impostor)
    # a half-written folder under the new key (an interrupted run) is replaced, never read
    remnant = Path(F.features_folder(new_cfg, new_key))
    remnant.mkdir(parents=True)
    (remnant / "part-stale.parquet").write_bytes(b"half")
    new = F.compute_features(new_cfg, progress=False)
    assert new["computed"] and new["location"] == str(remnant)
    assert not (remnant / "part-stale.parquet").exists()
    assert not [p for p in remnant.parent.iterdir() if p.name.startswith(".staging")]
    ids = [int(i) for i in F.open_features(new_cfg).ecg_ids[:8]]
    _, p_new = F.open_features(new_cfg).features(ids)
    _, p_old = F.open_features(old_cfg).features(ids)
    assert float((p_new - p_old).abs().max()) > 0.1  # the features did change
    meta = json.loads((remnant / F.META_FILE).read_text())
    assert meta["key_inputs"]["weights"] != old["key_inputs"]["weights"]
    assert meta["key_inputs"]["data"] == old["key_inputs"]["data"]
    # --rebuild recomputes a complete folder and swaps it in whole
    rebuilt = F.compute_features(new_cfg, progress=False, rebuild=True)
    assert rebuilt["computed"] and rebuilt["created"] >= new["created"] and rebuilt["files"] != new["files"]
    assert sorted(p.name for p in remnant.iterdir()) == sorted(
        [F.META_FILE, *(f["name"] for f in rebuilt["files"])]
    )
    torch.testing.assert_close(F.open_features(new_cfg).features(ids)[1], p_new, **tolerance(new_cfg, p_new))
    assert not [p for p in remnant.parent.iterdir() if p.name.startswith(".staging")]


@pytest.mark.slow
def test_a_file_uri_location_works(toy, ray_session, tmp_path):
    local = Path(shutil.copytree(toy, tmp_path / "prepared", ignore=shutil.ignore_patterns("features")))
    uri = f"file://{local}"
    cfg = toy_config(uri)
    key = F.feature_key(cfg)
    assert key == F.feature_key(toy_config(local))  # the location's spelling is not part of the key
    remnant = local / "features" / key
    remnant.mkdir(parents=True)
    (remnant / "part-stale.parquet").write_bytes(b"half")  # written in place over an interrupted write
    report = F.compute_features(cfg, progress=False)
    assert report["computed"] and report["location"] == f"{uri}/features/{key}"
    assert not (remnant / "part-stale.parquet").exists() and (remnant / F.META_FILE).is_file()
    store = F.open_features(cfg)
    ids = [int(i) for i in store.ecg_ids]
    _, pooled = store.features(ids)
    _, ref = direct(toy_config(local), ids)
    torch.testing.assert_close(pooled, ref, **tolerance(cfg, ref))
    assert F.ensure_features(toy_config(local), progress=False) == str(remnant)  # the same folder

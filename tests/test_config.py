from pathlib import Path

import pytest

from ecgray.config import Config, ConfigError, load_config, save_config


def test_defaults_are_the_paper_values():
    cfg = Config()
    assert (cfg.meta.inner_steps, cfg.meta.inner_lr, cfg.meta.meta_lr) == (15, 0.05, 5e-4)
    assert (cfg.episodes.n_way, cfg.episodes.k_shot, cfg.episodes.n_query) == (5, 5, 5)
    assert cfg.episodes.split_seed == 222
    assert cfg.data.n_samples == 2500
    assert cfg.model.n_prefix == 4


def test_overrides_and_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("meta:\n  inner_lr: 0.01\nepisodes:\n  n_way: 2\n")
    cfg = load_config(path, ["meta.inner_steps=3", "model.llm=tiny-llama"])
    assert cfg.meta.inner_lr == 0.01 and cfg.episodes.n_way == 2
    assert cfg.meta.inner_steps == 3 and cfg.model.llm == "tiny-llama"


@pytest.mark.parametrize(
    "override, key",
    [
        ("meta.inner_lrr=1", "meta.inner_lrr"),
        ("meta.inner_steps=abc", "meta.inner_steps"),
        ("model.mapper=foo", "model.mapper"),
        ("nothing=1", "nothing"),
    ],
)
def test_bad_keys_and_values_name_the_dotted_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["seed=7"])
    path = save_config(cfg, tmp_path)
    assert load_config(path).seed == 7
    assert (tmp_path / "versions.json").is_file()


def test_configuration_reference_is_current():
    """docs/configuration.md is generated from the dataclasses: regenerate with `python -m ecgray.config`."""
    from ecgray.config import reference_markdown

    text = reference_markdown()
    path = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert path.read_text() == text, (
        "docs/configuration.md is stale: python -m ecgray.config > docs/configuration.md"
    )
    assert (
        "| `meta.lr_schedule` | `Literal['constant', 'cosine']` | `\"constant\"` | Meta learning rate" in text
    )
    assert "| `model.attention` | `Literal['auto', 'sdpa', 'eager']` | `\"auto\"` | The frozen LLM's" in text

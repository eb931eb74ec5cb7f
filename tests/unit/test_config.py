from pathlib import Path

import pytest

from onerec.config import ConfigError, RootConfig, from_dict, load_config, to_dict

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
STAGE_CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*.yaml"))


def test_config_dir_is_not_empty():
    assert len(STAGE_CONFIGS) >= 4


@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_config_file_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RootConfig)
    assert cfg.eval.beam_width >= max(cfg.eval.ks)


def test_yaml_overrides_defaults_and_cli_overrides_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.5\n  batch_size: 7\n")
    cfg = load_config(path, ["train.lr=0.25", "model.moe.num_experts=6"])
    assert cfg.train.lr == 0.25
    assert cfg.train.batch_size == 7
    assert cfg.model.moe.num_experts == 6
    assert cfg.train.weight_decay == RootConfig().train.weight_decay


def test_misspelt_key_in_file_is_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(path)


def test_misspelt_override_is_rejected():
    with pytest.raises(ConfigError, match="batchsize"):
        load_config(None, ["train.batchsize=3"])


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.format=mystery", "data.format"),
        ("model.moe.top_k=9", "top_k"),
        ("model.num_heads=3", "divisible"),
        ("eval.beam_width=3", "beam_width"),
        ("train.lr=abc", "lr"),
        ("data.min_user_interactions=2", "min_user_interactions"),
        ("align.num_samples=1", "num_samples"),
        ("align.users_fraction=0", "users_fraction"),
        ("align.max_recall_drop=-0.1", "max_recall_drop"),
        ("reward.holdout_fraction=1.5", "holdout_fraction"),
        ("reward.signals=[{name: like, column: rating, kind: ordinal}]", "kind"),
        ("reward.signals=[{name: a, column: x}, {name: a, column: y}]", "unique"),
    ],
)
def test_bad_values_are_rejected_with_the_field_named(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_round_trip_through_dict():
    cfg = load_config(None, ["train.lr=0.123", "data.text_fields=[title,brand]"])
    again = from_dict(to_dict(cfg))
    assert again == cfg


def test_alignment_without_a_reward_model_is_refused_before_any_work(tmp_path):
    from onerec.stages.pipeline import main as pipeline_main

    cfg = load_config(None, [f"run.out_dir={tmp_path / 'run'}", "align.enabled=true"])
    with pytest.raises(ValueError, match="reward.enabled"):
        pipeline_main(cfg)
    assert not (tmp_path / "run").exists()


def test_the_scientific_config_is_the_beauty_config_with_other_data():
    """Scientific measures whether Beauty's choices carry over, so only the keys that describe
    the data (its format, path and text fields) and the run directory may differ; the reward
    section is for bench/reward.py on Beauty only."""

    def leaves(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    beauty = dict(leaves(to_dict(load_config(CONFIG_DIR / "beauty" / "pipeline.yaml"))))
    scientific = dict(leaves(to_dict(load_config(CONFIG_DIR / "scientific" / "pipeline.yaml"))))
    differing = {key for key in beauty.keys() | scientific.keys() if beauty.get(key) != scientific.get(key)}
    allowed = {"run.out_dir", "data.format", "data.root", "data.text_fields"}
    assert {key for key in differing if not key.startswith("reward.")} <= allowed, sorted(differing - allowed)

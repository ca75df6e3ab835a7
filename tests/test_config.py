"""Config: YAML recipes with base chaining, --set overrides, one error naming every problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmpt.config import config_yaml, load_config, parse_override, to_dict
from mmpt.errors import MmptError
from mmpt.tasks import FLAGS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("recipe", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_recipe_is_valid_and_round_trips_through_its_yaml(recipe, tmp_path):
    cfg = load_config(recipe)
    saved = tmp_path / "config.yaml"
    saved.write_text(config_yaml(cfg))
    assert load_config(saved) == cfg


def test_exponent_floats_without_a_dot_are_numbers_in_yaml_and_in_set(tmp_path):
    # PyYAML reads `1e-4` as a string (YAML 1.1 wants a dot); researchers write it anyway
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 1e-4\n  weight_decay: 5e-2\n")
    cfg = load_config(recipe, [parse_override("optim.head_lr=3e-3")])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.head_lr) == (1e-4, 5e-2, 3e-3)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e39", ".inf"])
def test_non_finite_or_float32_overflowing_values_are_refused(value):
    with pytest.raises(MmptError, match=r"optim.lr must be a finite number within float32 range"):
        load_config(None, [parse_override(f"optim.lr={value}")])


def test_base_chaining_merges_sections_key_by_key(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 7\n  batch_size: 16\noptim:\n  lr: 0.01\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  epochs: 3\n")
    cfg = load_config(tmp_path / "child.yaml", [parse_override("optim.lr=0.5")])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.lr) == (3, 16, 0.5)


def test_a_base_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(MmptError, match="cycle of 'base:'"):
        load_config(tmp_path / "a.yaml")


def test_every_problem_is_named_in_one_error():
    overrides = [parse_override(s) for s in ("train.epochs=0", "optim.lrr=1", "loss.weighting=magic", "data.resolution=100")]
    with pytest.raises(MmptError) as info:
        load_config(None, overrides)
    message = str(info.value)
    for part in ("train.epochs must be >= 1", "unknown key 'optim.lrr'", "loss.weighting must be one of none, size",
                 "data.resolution must be one of 28, 64, 128, 224"):
        assert part in message, message


def test_datasets_are_stored_as_medmnist_flags_in_medmnist_order():
    cfg = load_config(None, [parse_override("data.datasets=retina,path,chestmnist")])
    assert cfg.data.datasets == ("pathmnist", "chestmnist", "retinamnist")
    assert load_config(None, [parse_override("data.datasets=all")]).data.datasets == FLAGS
    assert to_dict(cfg)["data"]["datasets"] == ["pathmnist", "chestmnist", "retinamnist"]

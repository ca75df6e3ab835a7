"""train.py --print-config: the resolved config with every key annotated by what it accepts."""

from __future__ import annotations

import yaml

from mmpt.cli import train_main
from mmpt.config import load_config, to_dict
from tests.helpers import REPO, quiet


def test_print_config_shows_every_key_with_its_allowed_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = quiet(
        train_main,
        [
            "--print-config",
            "--config",
            str(REPO / "configs" / "quickstart.yaml"),
            "--epochs",
            "7",
            "--set",
            "loss.weighting=size",
        ],
    )
    assert code == 0 and not (tmp_path / "runs").exists()
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [{"train": {"epochs": 7}, "loss": {"weighting": "size"}}])
    assert to_dict(load_config(overrides=[yaml.safe_load(out)])) == to_dict(cfg)
    lines = [line for line in out.splitlines() if not line.rstrip().endswith(":")]
    assert all("  # " in line for line in lines)
    assert "weighting: size  # none | size" in out and "mode: pad  # pad" in out and "| native" in out
    assert "epochs: 7  # integer >= 1" in out

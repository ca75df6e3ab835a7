"""Config: YAML recipes with base chaining, --set overrides, one error naming every problem."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmpt.cli import evaluate_main, train_main
from mmpt.config import (
    RESUME_MAY_CHANGE,
    SETTINGS,
    check_value,
    config_yaml,
    fixed_key_changes,
    load_config,
    parse_flag,
    to_dict,
)
from mmpt.config.settings import parse_override, value_of
from mmpt.errors import MmptError
from mmpt.runs.rundir import RunDir
from mmpt.tasks import FLAGS
from mmpt.training.build import check_run
from tests.helpers import REPO, TINY_RUN, folder_snapshot

CONFIGS = REPO / "configs"


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
    overrides = [
        parse_override(s) for s in ("train.epochs=0", "optim.lrr=1", "loss.weighting=magic", "data.resolution=100")
    ]
    with pytest.raises(MmptError) as info:
        load_config(None, overrides)
    message = str(info.value)
    for part in (
        "train.epochs must be >= 1",
        "unknown key 'optim.lrr'",
        "loss.weighting must be one of none, size",
        "data.resolution must be one of 28, 64, 128, 224",
    ):
        assert part in message, message


def test_datasets_are_stored_as_medmnist_flags_in_medmnist_order():
    cfg = load_config(None, [parse_override("data.datasets=retina,path,chestmnist")])
    assert cfg.data.datasets == ("pathmnist", "chestmnist", "retinamnist")
    assert load_config(None, [parse_override("data.datasets=all")]).data.datasets == FLAGS
    assert to_dict(cfg)["data"]["datasets"] == ["pathmnist", "chestmnist", "retinamnist"]


# ---------------------------------------------------------------- one declaration per setting


def test_a_new_key_with_a_flag_needs_only_its_declaration(tmp_path, monkeypatch):
    """A result-neutral key with a flag reaches train.py's flags, the flag table, the resume keys and
    docs/settings.md through its declaration alone (here added to SETTINGS as `setting(...)` would add it)."""
    from mmpt.cli.common import flag_overrides
    from mmpt.cli.train import train_parser
    from mmpt.config import docs as configdoc
    from mmpt.config.settings import Key, declaration

    spec = declaration("say more", resume=True, result=False, flag="--verbose")
    monkeypatch.setitem(SETTINGS, "train.verbose", Key("train.verbose", bool, spec, False))
    monkeypatch.setitem(configdoc.NAMED_FLAGS, "--verbose", "train.verbose")
    monkeypatch.setattr(configdoc, "RESUME_MAY_CHANGE", RESUME_MAY_CHANGE | {"train.verbose"})
    args = train_parser().parse_args(["--verbose"])
    assert flag_overrides(args, configdoc.NAMED_FLAGS) == {"train": {"verbose": True}}
    for block in configdoc.BLOCKS:
        page = tmp_path / block.page
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text((CONFIGS.parent / block.page).read_text(encoding="utf-8"), encoding="utf-8")
    pages = {str(p.relative_to(tmp_path)): text for p, text in configdoc.generated_pages(tmp_path).items()}
    assert "| `--verbose` | `train.verbose` |  | sets it to true: say more |" in pages["docs/training-and-settings.md"]
    assert "`--verbose`<!-- end: flag-list -->" in pages["README.md"]
    assert ", `train.verbose`<!-- end: resume-keys -->" in pages["docs/reproducibility-and-errors.md"]
    row = "| `train.verbose` | true \\| false | `false` | may change | no | `--verbose` | say more |"
    assert row in pages["docs/settings.md"]


def test_declared_facts_replace_the_hand_kept_lists():
    from mmpt.config import EVALUATE_FLAGS, NAMED_FLAGS, RESULT_NEUTRAL

    assert (
        NAMED_FLAGS["--batch-size"] == "train.batch_size" and EVALUATE_FLAGS["--batch-size"] == "data.eval_batch_size"
    )
    assert NAMED_FLAGS["--no-verify"] == "data.verify" and NAMED_FLAGS["--download"] == "data.download"
    assert {"name", "output", "data.root", "train.device", "checkpoint.every_steps"} <= RESULT_NEUTRAL
    # a key that changes what a run computes is never result-neutral, even where a resume may change it
    assert not {"optim.lr", "train.epochs", "loss.weighting", "train.seed"} & RESULT_NEUTRAL


def test_print_config_refuses_the_two_key_rules_a_run_refuses(capsys):
    """A rule between keys is checked where a config is loaded, so --print-config refuses it as the run would."""

    argv = ["--print-config", "--set", "model.norm=per_dataset", "--set", "loss.weighting=upgrad"]
    assert train_main([*argv, "--set", "sampler.tasks_per_step=2"]) == 2
    err = capsys.readouterr().err
    assert "model.norm per_dataset" in err and "loss.weighting=upgrad" in err
    assert train_main(["--print-config", "--set", "sampler.tasks_per_step=2", "--set", "loss.weighting=upgrad"]) == 0
    assert train_main([*argv]) == 2  # and the method's own rule: tasks_per_step 1 is refused too
    assert "combines several datasets per step" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--sweep", "data.root=a,b"], ["--sweep data.root", "does not change what a run computes"]),
        (["--sweep", "loss.weighting=none,upgrad"], ["loss.weighting=upgrad", "(--sweep loss.weighting=upgrad)"]),
        (["--seeds", "0,1", "--seed", "3"], ["--seed and --seeds both set the seed"]),
        (["--individual", "--sweep", "data.datasets=breast,retina"], ["--sweep data.datasets with --individual"]),
        (["--individual", "--sweep", "model.norm=shared,per_dataset_stats"], ["nothing to keep apart"]),
    ],
)
def test_print_config_refuses_the_series_a_run_refuses(flags, words, capsys):
    """--print-config plans the series the flags ask for, so it refuses every sweep key and every combination of
    keys that training the series would refuse (in one line, exit 2), and prints only what would train."""

    assert train_main(["--print-config", "--datasets", "breast,retina", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    for word in words:
        assert word in err
    assert train_main(["--print-config", "--datasets", "breast,retina", "--sweep", "loss.weighting=none,size"]) == 0


def test_a_key_or_a_section_given_twice_is_refused_wherever_yaml_is_read(tmp_path):
    """YAML keeps the last of two equal keys and drops the first without a word; every YAML mmpt reads refuses it."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  epochs: 3\noptim:\n  lr: 0.1\ntrain:\n  batch_size: 8\n")
    with pytest.raises(MmptError, match=r"r.yaml: 'train' is given twice \(lines 1 and 5\).*keep only the last"):
        load_config(recipe)
    recipe.write_text("optim: {lr: 0.1, weight_decay: 0, lr: 0.2}\n")
    with pytest.raises(MmptError, match=r"'lr' is given twice"):
        load_config(recipe)
    with pytest.raises(MmptError, match=r"--set loss.weighting_args=.*'temperature' is given twice"):
        parse_override("loss.weighting_args={temperature: 2, temperature: 3}")
    # a base recipe is read by the same loader; YAML's own merge key (<<) still overrides on purpose
    (tmp_path / "base.yaml").write_text("data:\n  datasets: [breast]\ndata:\n  resolution: 64\n")
    recipe.write_text("base: base.yaml\n")
    with pytest.raises(MmptError, match=r"base.yaml: 'data' is given twice"):
        load_config(recipe)
    recipe.write_text("defaults: &d {epochs: 3, batch_size: 8}\ntrain:\n  <<: *d\n  epochs: 5\n")
    with pytest.raises(MmptError, match="unknown key 'defaults'"):  # the merge itself is accepted
        load_config(recipe)
    from mmpt.runs.members import read_run_config

    (tmp_path / "run").mkdir()
    RunDir(tmp_path / "run").config.write_text("name: a\nname: b\n")
    with pytest.raises(MmptError, match=r"is not a config written by train.py.*'name' is given twice"):
        read_run_config(tmp_path / "run")


@pytest.mark.parametrize("text", ["2024", "1.10", "010", "0x1F", "1_000", "12345678901234567890123"])
def test_a_name_or_folder_that_looks_like_a_number_is_that_text_in_a_recipe_set_and_flag(text, tmp_path):
    """YAML reads `name: 2024` as a number; a text setting takes the text as written, as a flag's text is taken."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: {text}\noutput: {text}\ndata:\n  root: {text}\nmodel:\n  init_from: {text}\n")
    cfg = load_config(recipe)
    assert (cfg.name, cfg.output, cfg.data.root, cfg.model.init_from) == (text, text, text, text)
    assert load_config(None, [parse_override(f"name={text}"), parse_override(f"output={text}")]).name == text
    assert parse_flag("--output", "output", text) == text
    # what the run records reads back as the same text
    saved = tmp_path / "config.yaml"
    saved.write_text(config_yaml(cfg))
    assert load_config(saved) == cfg
    # a number setting still takes the number, not the text
    assert load_config(None, [parse_override("train.epochs=12")]).train.epochs == 12
    assert type(load_config(None, [parse_override("train.epochs=12")]).train.epochs) is int


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=" + "1" * 400, "optim.lr must be a finite number within float32 range"),
        ("optim.lr=" + "1" * 5000, "optim.lr must be a finite number within float32 range"),
        ("train.epochs=" + "1" * 5000, "train.epochs must be an integer within"),
        ("sampler.alpha=-" + "9" * 400, "sampler.alpha must be a finite number"),
    ],
)
def test_a_number_of_hundreds_of_digits_is_refused_in_one_short_line(override, message, tmp_path):
    with pytest.raises(MmptError, match=message) as refused:
        load_config(None, [parse_override(override)])
    assert len(str(refused.value)) < 300 and "characters)" in str(refused.value)
    key, _, value = override.partition("=")
    section, leaf = key.split(".")
    (tmp_path / "r.yaml").write_text(f"{section}:\n  {leaf}: {value}\n")
    with pytest.raises(MmptError, match=message):
        load_config(tmp_path / "r.yaml")
    with pytest.raises(MmptError, match=message.replace(key, "--x")):
        parse_flag("--x", key, value)


def test_every_setting_is_documented_with_its_bounds_in_print_config():
    from mmpt.config.docs import annotated_yaml

    text = annotated_yaml(load_config())
    for key, k in SETTINGS.items():
        assert k.spec.doc, key
        assert f"{key.rsplit('.', 1)[-1]}: " in text, key
    # the upper bounds are stated, not only the lower ones
    assert "drop_rate: 0.0  # number >= 0 and < 1; " in text
    assert "seed: 0  # integer >= 0 and <= 4294967295; " in text
    assert "crop_scale_min: 0.8  # number > 0 and <= 1; " in text


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("model.drop_rate=1", None, "model.drop_rate must be < 1, got 1.0"),
        ("train.seed=4294967296", None, "train.seed must be <= 4294967295, got 4294967296"),
        ("output=''", None, "output must not be empty"),
        ("data.root='  '", None, "data.root must not be empty"),
        ("model.init_from=''", None, "model.init_from must not be empty"),
        ("train.device=gpu", None, "train.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("train.seed=010", 10, None),  # YAML 1.1 would read octal 8
    ],
)
def test_set_values_are_checked_against_their_declaration(setting, value, message):
    if message is None:
        assert load_config(None, [parse_override(setting)]).train.seed == value
        return
    with pytest.raises(MmptError, match=re.escape(message)):
        load_config(None, [parse_override(setting)])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-size", "abc"], "train.batch_size must be an integer, got 'abc'"),
        (["--epochs", "0"], "train.epochs must be >= 1, got 0"),
        (["--lr", "-1"], "optim.lr must be > 0, got -1.0"),
        (["--output", ""], "output must not be empty"),
        (["--data-root", ""], "data.root must not be empty"),
        (["--init-from", ""], "model.init_from must not be empty"),
        (["--backbone", " "], "model.backbone must not be empty"),
        (["--datasets", ""], "data.datasets must name MedMNIST+ datasets: no dataset selected"),
        (["--resolution", "27"], "data.resolution must be one of 28, 64, 128, 224, got 27"),
        (["--device", "gpu"], "train.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ],
)
def test_named_flags_are_checked_as_the_keys_they_set(flags, message):
    from mmpt.cli.train import build_train_config, train_parser

    with pytest.raises(MmptError, match=re.escape(message)):
        build_train_config(train_parser().parse_args(flags))


def test_named_flags_set_their_keys():
    from mmpt.cli.train import build_train_config, train_parser

    cfg = build_train_config(
        train_parser().parse_args(
            [
                "--epochs",
                "3",
                "--lr",
                "1e-3",
                "--seed",
                "010",
                "--datasets",
                "retina,breast",
                "--device",
                "cuda:1",
                "--set",
                "train.epochs=9",
            ]
        )
    )
    assert (cfg.train.epochs, cfg.optim.lr, cfg.train.seed, cfg.train.device) == (3, 1e-3, 10, "cuda:1")
    assert cfg.data.datasets == ("retinamnist", "breastmnist")


@pytest.mark.parametrize(
    "flag, key, text, message",
    [
        ("--batch-size", "data.eval_batch_size", "0", "--batch-size must be >= 1, got 0"),
        ("--batch-size", "data.eval_batch_size", "many", "--batch-size must be an integer, got 'many'"),
        ("--resolution", "data.resolution", "100", "--resolution must be one of 28, 64, 128, 224, got 100"),
        ("--device", "train.device", "tpu", "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        ("--data-root", "data.root", "", "--data-root must not be empty"),
    ],
)
def test_evaluation_flags_are_checked_as_their_config_keys(flag, key, text, message):
    with pytest.raises(MmptError, match=re.escape(message)):
        parse_flag(flag, key, text)


def test_evaluate_refuses_an_empty_data_root_in_one_line(tmp_path, capsys):

    assert evaluate_main([str(tmp_path), "--data-root", ""]) == 2
    assert capsys.readouterr().err == "error: --data-root must not be empty, got ''\n"


def test_check_run_names_every_environment_problem_at_once():
    cfg = load_config(
        None,
        [
            parse_override(s)
            for s in (
                "model.backbone=resnet_9000",
                "optim.name=nope",
                "train.batch_size=4",
                "sampler.tasks_per_step=2",
                "loss.weighting=upgrad",
            )
        ],
    )
    with pytest.raises(MmptError) as info:
        check_run(cfg, world_size=2)
    message = str(info.value)
    for part in (
        "train.batch_size 4 is the global batch, split over 2 processes",
        "unknown backbone 'resnet_9000'",
        "unknown optimizer 'nope'",
        "loss.weighting=upgrad",
        "does not support distributed training",
    ):
        assert part in message, message
    check_run(load_config(), world_size=1)  # the defaults run here


def test_importing_the_cli_leaves_the_cublas_setting_to_determinism():
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    out = subprocess.run(
        [sys.executable, "-c", "import os, mmpt.cli; print(os.environ.get('CUBLAS_WORKSPACE_CONFIG'))"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert out.stdout.strip() == "None"


# ---------------------------------------------------------------- resume refuses every change of a fixed key


def _another_value(key: str, current):
    """A valid value of `key` other than `current`, derived from its declaration (so a new key needs no new case)."""
    k = SETTINGS[key]
    if k.spec.choices:
        return next(c for c in k.spec.choices if c != current)
    if isinstance(current, bool):
        candidates = [not current]
    elif isinstance(current, tuple):
        candidates = [current[:1] if len(current) > 1 else ("breastmnist", "retinamnist")]
    elif isinstance(current, dict):
        candidates = [{**current, "added": 1.0}]
    elif isinstance(current, (int, float)) or current is None:
        base = current if current is not None else (k.spec.low or 1)
        candidates = [base + 1, base * 2 + 1, base / 2, (base + (k.spec.high or base + 1)) / 2, "other_value", "4G"]
    else:
        candidates = [current + "_other", "cpu"]
    for value in candidates:
        checked, problem = check_value(key, value)
        if problem is None and checked != current:
            return checked
    raise AssertionError(f"no other value found for {key}; extend _another_value")


def _replaced(cfg, key: str, value):
    head, _, rest = key.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: _replaced(getattr(cfg, head), rest, value)})


FIXED_KEYS = [key for key in SETTINGS if key not in RESUME_MAY_CHANGE]


def test_the_fixed_keys_are_every_key_but_the_declared_resume_may_change_ones():
    assert "loss.weighting_args" in FIXED_KEYS and "loss.weights" in FIXED_KEYS and "optim.per_head" in FIXED_KEYS
    assert {"optim.lr", "train.epochs", "data.root", "checkpoint.every_minutes"} <= RESUME_MAY_CHANGE
    assert len(FIXED_KEYS) + len(RESUME_MAY_CHANGE) == len(SETTINGS)


@pytest.mark.parametrize("key", FIXED_KEYS)
def test_a_change_of_any_fixed_key_is_refused_on_resume(key):
    saved = load_config(None, [parse_override("loss.weighting=uw"), parse_override("loss.weighting_args={lr: 0.01}")])
    current = to_dict(value_of(saved, key))
    current = tuple(current) if isinstance(current, list) else current
    changed = _replaced(saved, key, _another_value(key, current))
    assert [c[0] for c in fixed_key_changes(saved, changed)] == [key]
    assert fixed_key_changes(saved, saved) == []


@pytest.mark.parametrize("key", sorted(RESUME_MAY_CHANGE))
def test_a_resume_may_change_the_keys_declared_so(key):
    saved = load_config()
    current = to_dict(value_of(saved, key))
    assert fixed_key_changes(saved, _replaced(saved, key, _another_value(key, current))) == []


def test_a_method_option_or_a_manual_weight_changed_by_one_entry_is_a_fixed_key_change():
    def cfg(*sets):
        return load_config(None, [parse_override(s) for s in sets])

    uw = cfg("loss.weighting=uw", "loss.weighting_args={lr: 0.01}")
    assert fixed_key_changes(uw, cfg("loss.weighting=uw", "loss.weighting_args={lr: 0.02}")) == [
        ("loss.weighting_args", {"lr": 0.01}, {"lr": 0.02})
    ]
    assert [c[0] for c in fixed_key_changes(uw, cfg("loss.weighting=uw"))] == ["loss.weighting_args"]
    manual = ("loss.weighting=manual", "data.datasets=breast,retina")
    assert fixed_key_changes(
        cfg(*manual, "loss.weights={breast: 1, retina: 2}"), cfg(*manual, "loss.weights={breast: 1, retina: 3}")
    ) == [("loss.weights", {"breastmnist": 1.0, "retinamnist": 2.0}, {"breastmnist": 1.0, "retinamnist": 3.0})]


@pytest.fixture(scope="module")
def uw_run(synthetic_root, tmp_path_factory) -> Path:
    """A finished 1-epoch run with a weighting method that takes an option."""

    run = tmp_path_factory.mktemp("uw") / "run"
    assert (
        train_main(
            [
                *("--data-root", str(synthetic_root), "--output", str(run), *TINY_RUN, "--datasets", "breast,retina"),
                *("--set", "loss.weighting=uw", "--set", "loss.weighting_args={lr: 0.01}"),
            ]
        )
        == 0
    )
    return run


@pytest.mark.parametrize(
    "flags, key",
    [
        (["--set", "loss.weighting_args={lr: 0.5}"], "loss.weighting_args"),
        (["--set", "input.augment.hflip=true"], "input.augment.hflip"),
    ],
)
def test_train_resume_refuses_a_fixed_key_change_in_one_line_and_leaves_the_run_as_it_was(uw_run, capsys, flags, key):

    before = folder_snapshot(uw_run)
    capsys.readouterr()
    assert train_main(["--resume", str(uw_run), "--epochs", "2", *flags]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert f"was trained with {key}=" in err and f"{key} cannot change mid-run" in err, err
    assert folder_snapshot(uw_run) == before


# ---------------------------------------------------------------- the README and docs/


def test_experiment_recipes_follow_the_doerrich_protocol():
    recipes = sorted((REPO / "configs" / "experiments").glob("*.yaml"))
    runnable = [p for p in recipes if p.name != "protocol.yaml"]
    assert len(runnable) == 16  # {mm-PT, individual} × {ResNet-18, ViT-B/16} × {28, 64, 128, 224}
    for path in runnable:
        assert yaml.safe_load(path.read_text())["base"] == "protocol.yaml", path
        cfg = load_config(path)
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.schedule, cfg.train.batch_size) == ("adamw", 1e-4, "cosine", 64)
        assert (cfg.train.epochs, cfg.train.patience, cfg.train.monitor) == (100, 5, "val_loss")
        assert (cfg.input.mode, cfg.model.img_size, cfg.model.pretrained) == ("pad", 224, True)
        assert not any(to_dict(cfg.input.augment)[k] for k in ("hflip", "vflip", "random_resized_crop"))
        assert cfg.model.backbone in ("resnet18", "vit_b16") and str(cfg.data.resolution) in path.stem

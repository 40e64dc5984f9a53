"""config: the dataclass is the CLI; presets < config file < flags; bad input is one line and exit 2."""
import dataclasses
import sys

import pytest

from conftest import error_lines, run
from ddp_train.config import PRESETS, Config, parse


def test_every_field_is_a_flag_with_its_default_in_help():
    p = run([sys.executable, "-m", "ddp_train", "--help"], check=True)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        assert flag in p.stdout, flag
        assert f"(default: {f.default!r})" in " ".join(p.stdout.split()), f.name


def test_flags_override_file_override_preset(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("preset: seed2018\nepochs: 3\nlr: 1\nlabel-smoothing: 0.2\n")
    cfg = parse(["--config", str(yml), "--epochs", "5"])
    assert cfg.model == "seed2018" and cfg.batch_size == 256            # from the preset
    assert cfg.lr == 1.0 and cfg.label_smoothing == 0.2                  # from the file (int coerced to float)
    assert cfg.epochs == 5                                                # the flag wins
    toml = tmp_path / "c.toml"
    toml.write_text('model = "resnet18"\nwidth = 8\naugment = false\n')
    cfg = parse(["--config", str(toml), "--preset", "cpu-demo"])
    assert cfg.width == 8 and cfg.augment is False and cfg.epochs == PRESETS["cpu-demo"]["epochs"]


def test_bool_flags_have_negations():
    assert parse(["--no-channels-last", "--no-nesterov", "--momentum", "0.5"]).channels_last is False
    assert parse([]).channels_last is True


def test_tracking_defaults_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/x.db")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "exp")
    cfg = parse([])
    assert cfg.tracking_uri == "sqlite:////tmp/x.db" and cfg.experiment == "exp"
    assert parse(["--experiment", "other"]).experiment == "other"


@pytest.mark.parametrize("args, fragment", [
    (["--lr", "-0.1"], "--lr must be positive"),
    (["--model", "vgg"], "invalid choice: 'vgg'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--epochs", "two"], "invalid int value: 'two'"),
    (["--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1)"),
    (["--preset", "fast"], "invalid choice: 'fast'"),
])
def test_bad_flags_exit_2_with_one_line(args, fragment):
    p = run([sys.executable, "-m", "ddp_train", *args])
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == error_lines(p.stderr) and len(error_lines(p.stderr)) == 1, p.stderr
    assert fragment in p.stderr


@pytest.mark.parametrize("text, fragment", [
    ("epochs: 3\nlearning_rate: 0.1\n", "unknown config key 'learning_rate'"),
    ("epochs: three\n", "'epochs' must be int"),
    ("model: vgg\n", "'model' must be one of resnet18, seed2018"),
    ("- a\n- b\n", "expected a mapping"),
    ("epochs: [\n", "not valid YAML"),
])
def test_bad_config_files_exit_2_with_one_line(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    p = run([sys.executable, "-m", "ddp_train", "--config", path])
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and fragment in p.stderr, p.stderr

"""config: the dataclass is the CLI; presets < config file < flags; bad input is one line and exit 2."""
import dataclasses
import re
import sys

import pytest

from ddp_train.config import PRESETS, Config, ConfigError, parse, preflight

from conftest import error_lines, run


def test_every_field_is_a_flag_with_its_default_in_help():
    p = run([sys.executable, "-m", "ddp_train", "--help"], check=True)
    blocks = re.split(r"\n  (?=--)", p.stdout.split("options:", 1)[1])
    entries = {b.split()[0].rstrip(","): " ".join(b.split()) for b in blocks if b.startswith("--")}
    for f in dataclasses.fields(Config):
        entry = entries["--" + f.name.replace("_", "-")]
        said = "(default:" in f.metadata["help"]  # a help that explains its default says it once, itself
        assert entry.count("(default:") == 1 and (said or f"(default: {f.default!r})" in entry), entry


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
    (["--seed", "4294967296"], "--seed must be in [0, 4294967295], got 4294967296"),  # was numpy's traceback
    (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    # a run directory outside --out-dir (/abs, ..) or --out-dir itself (.), or a nested one
    (["--run-name", "../x"], "--run-name '../x' must be one directory name under --out-dir (no '/', not '.' or '..', "
                             "no control characters), e.g. --run-name x"),
    (["--run-name", ".."], "e.g. --run-name my-run"),
    (["--run-name", "/tmp/r"], "e.g. --run-name tmp-r"),
    (["--run-name", "a\nb"], "e.g. --run-name a-b"),
    # MLflow 3 refuses its file store: the run fell back to a store in the run directory, "unreachable"
    (["--tracking-uri", "file:///tmp/m/"], "error: the MLflow tracking URI file:///tmp/m/ (--tracking-uri or "
     "MLFLOW_TRACKING_URI) is a directory: MLflow's file store, which MLflow 3 refuses (maintenance mode); use a "
     "database, e.g. sqlite:////tmp/m.db (`mlflow migrate-filestore` moves the runs kept there), or set "
     "MLFLOW_ALLOW_FILE_STORE=true, or pass --no-mlflow"),
    (["--tracking-uri", "./mlruns"], "e.g. sqlite:///./mlruns.db ("),
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


@pytest.mark.parametrize("args, fragment", [
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--weight-decay=-inf"], "--weight-decay must be a finite number, got -inf"),
])
def test_non_finite_numbers_are_bad_input(args, fragment):
    p = run([sys.executable, "-m", "ddp_train", "--check", *args])
    assert p.returncode == 2 and error_lines(p.stderr) == [f"error: {fragment}"], p.stderr


def test_a_warm_up_as_long_as_the_run_is_refused_or_when_not_asked_for_shortened():
    """`--epochs 3` with the default 5 warm-up epochs used to climb for the whole run and end at the peak lr."""
    assert parse(["--epochs", "3"]).warmup_epochs == 0.375  # not asked for: an eighth of the run
    assert parse(["--preset", "cpu-demo", "--epochs", "1"]).warmup_epochs == 0.125
    assert parse(["--epochs", "6"]).warmup_epochs == 5  # the default where it fits
    with pytest.raises(ConfigError) as e:  # asked for (a flag or a config file): refused, a shorter one named
        Config(epochs=3).validate()
    assert str(e.value) == ("--warmup-epochs 5 is not shorter than --epochs 3: the learning rate would rise for the "
                            "whole run and never decay; pass a shorter warm-up, e.g. --warmup-epochs 0.375 (an "
                            "eighth of the run, like the 40-epoch recipe)")
    Config(epochs=3, warmup_epochs=2.5).validate()
    Config(epochs=3, schedule="constant").validate()  # no warm-up to speak of


def test_loader_threads_default_to_the_cores_a_process_may_use(tmp_path):
    """A Slurm task with --cpus-per-task 2 (or a 2-core machine) ran the default 4 FFCV threads: numba refused
    them in a ValueError traceback from inside the loader. The default now fits; an explicit excess is one line."""
    assert parse([], cores=2).num_workers == 2 and parse([], cores=16).num_workers == 4
    assert parse(["--num-workers", "8"], cores=2).num_workers == 8  # asked for: kept, and refused by preflight
    (tmp_path / "c.yaml").write_text("num_workers: 6\n")
    assert parse(["--config", str(tmp_path / "c.yaml")], cores=2).num_workers == 6
    assert parse(["--preset", "cpu-demo"], cores=16).num_workers == 1
    with pytest.raises(ConfigError, match=r"^--num-workers 3 exceeds the 2 CPU core\(s\) each training process may "
                       r"use \(--cpus-per-task; FFCV runs at most one loader thread per core\): pass --num-workers 2 "
                       "or fewer, or give each process more cores$"):
        preflight(Config(num_workers=3), 1, gpus=False, cores=2)  # refused before the data is read


def test_the_core_count_is_numbas_under_an_affinity_and_the_trainer_fits_it(synthetic_data):
    """Under taskset (as under a Slurm task's cgroup) cpu_cores() must be the limit numba enforces, and the
    trainer's checks pass with the default and refuse an excess in one line."""
    taskset = ["taskset", "-c", "0"]
    run([*taskset, sys.executable, "-c", "import numba, ddp_train.config as c; "
         "assert numba.config.NUMBA_NUM_THREADS == c.cpu_cores() == 1, c.cpu_cores()"], check=True)
    check = [*taskset, sys.executable, "-m", "ddp_train", "--data-dir", synthetic_data, "--check"]
    assert "config and data ok" in run(check, check=True).stdout
    p = run([*check, "--num-workers", "2"])
    assert p.returncode == 2 and error_lines(p.stderr) == [
        "error: --num-workers 2 exceeds the 1 CPU core(s) each training process may use (its CPU affinity; FFCV runs "
        "at most one loader thread per core): pass --num-workers 1 or fewer, or give each process more cores"]


def test_file_stores_are_the_uris_mlflow_opens_as_directories(monkeypatch):
    from ddp_train.config import file_store
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    stores = {"/a/b/": "/a/b", "file:///a/b": "/a/b", "FILE:/a": "/a", "mlruns": "mlruns", "./x y": "./x y"}
    others = ["", "sqlite:///m.db", "http://h:5000", "HTTPS://h", "databricks", "databricks://profile", "uc",
              "postgresql://u@h/db", "foo://bar"]
    assert {u: file_store(u) for u in [*stores, *others]} == {**stores, **dict.fromkeys(others, "")}
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "True")  # MLflow then opens it: so does the trainer
    assert file_store("/a/b") == ""


def test_yaml_numbers_are_read_by_the_fields_type(tmp_path):
    """YAML 1.1 reads 5e-4 (no dot) as a string; the field says float."""
    path = tmp_path / "c.yaml"
    path.write_text("weight_decay: 5e-4\nlr: 1e-1\nepochs: '7'\n")
    cfg = parse(["--config", str(path)])
    assert cfg.weight_decay == 5e-4 and cfg.lr == 0.1 and cfg.epochs == 7


def test_resumable_fields_are_how_a_run_executes_not_what_it_computes():
    from ddp_train.config import RESUMABLE, resume_difference
    assert {"data_dir", "num_workers", "loader", "tracking_uri", "out_dir"} <= RESUMABLE
    assert not {"lr", "epochs", "seed", "batch_size", "model", "augment"} & RESUMABLE
    saved = Config().to_dict()
    assert resume_difference(saved, {**saved, "num_workers": 9, "data_dir": "/x"}) == ""
    assert resume_difference(saved, {**saved, "epochs": 3}) == "the config differs: epochs 40 → 3"
    older = {k: v for k, v in saved.items() if k != "fused_sgd"}  # a checkpoint from before the field existed
    assert resume_difference(older, saved) == ""
    assert resume_difference(older, {**saved, "fused_sgd": True}) == "the config differs: fused_sgd False → True"


@pytest.mark.parametrize("text, shown", [
    ("https://alice:s3cret@mlflow.example:5000", "https://***@mlflow.example:5000"),
    ("https://tok3n@host/x", "https://***@host/x"),
    ("https://host/api?run=1&access_token=s3cret&sig=abc", "https://host/api?run=1&access_token=***&sig=***"),
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("torchrun -m ddp_train --tracking-uri http://u:p@h:1 --lr 0.1", "torchrun -m ddp_train --tracking-uri "
                                                                      "http://***@h:1 --lr 0.1"),
])
def test_credentials_in_urls_are_redacted(text, shown):
    from ddp_train.config import redact
    assert redact(text) == shown


def test_the_public_config_hides_credentials():
    cfg = Config(tracking_uri="https://u:s3cret@h", experiment="e")
    assert cfg.public_dict()["tracking_uri"] == "https://***@h" and cfg.tracking_uri == "https://u:s3cret@h"

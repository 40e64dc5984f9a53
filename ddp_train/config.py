"""Every knob of a training run, in one dataclass. The CLI and the optional YAML/TOML config file derive from it.

Precedence, lowest first: dataclass defaults < --preset < --config file < command-line flags.
"""
import argparse
import dataclasses
import math
import os
import re
import sys
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError, report


def knob(default, help, choices=None, resumable=False):
    """A config field. `resumable`: a resumed run may change it (how the run is executed or observed, not what
    it computes); every other field must equal the checkpoint's."""
    return field(default=default, metadata={"help": help, "choices": choices, "resumable": resumable})


@dataclass
class Config:
    # data
    data_dir: str = knob("data", "directory holding cifar100_{train,test}.beton and manifest.json (make prep-data)",
                         resumable=True)
    loader: str = knob("auto", "resident: the splits read once into device memory and batched there; ffcv: FFCV "
                               "loaders; auto: resident on a GPU when the splits fit, else ffcv (the same batches "
                               "either way)", ["auto", "ffcv", "resident"], resumable=True)
    num_workers: int = knob(4, "FFCV loader threads per process, and torch's CPU thread count with either loader; "
                               "at most the CPU cores the process may use (default: 4, or those cores if fewer)",
                            resumable=True)
    verify_data: bool = knob(False, "hash every beton against the manifest at start (by default only files whose "
                                    "size or mtime changed since prep are hashed)", resumable=True)
    # model
    model: str = knob("resnet18", "architecture", ["resnet18", "seed2018"])
    width: int = knob(64, "base channel width of resnet18 (64 is the standard ResNet-18; seed2018 has a fixed width)")
    norm: str = knob("bn", "normalisation layer: BatchNorm, or GroupNorm (batch-independent)", ["bn", "gn"])
    sync_bn: bool = knob(False, "SyncBatchNorm: batch statistics over all ranks (GPU only; for small per-GPU batches)")
    # optimisation
    epochs: int = knob(40, "training epochs")
    batch_size: int = knob(512, "global batch size, split evenly over the ranks")
    lr: float = knob(0.4, "peak learning rate (SGD)")
    momentum: float = knob(0.9, "SGD momentum")
    nesterov: bool = knob(True, "Nesterov momentum")
    weight_decay: float = knob(5e-4, "L2 weight decay")
    label_smoothing: float = knob(0.1, "label smoothing of the training loss")
    schedule: str = knob("onecycle", "lr schedule: linear warm-up then linear decay to 0, or constant",
                         ["onecycle", "constant"])
    warmup_epochs: float = knob(5.0, "onecycle: epochs of linear warm-up to the peak lr, fewer than --epochs (a "
                                         "run as short as the default's or a preset's warm-up, given none, warms up "
                                         "for an eighth of itself)")
    # augmentation (flip always; on the device, seeded by seed, epoch and rank)
    augment: bool = knob(True, "training augmentation: random flip, translate and cutout")
    translate: int = knob(2, "random translation of up to this many pixels (0: off)")
    cutout: int = knob(4, "side of the cutout square in pixels (0: off)")
    # precision and speed
    amp: str = knob("auto", "mixed precision: auto = bf16 on Ampere and newer GPUs, else fp16 with GradScaler; "
                            "off on CPU", ["auto", "bf16", "fp16", "off"])
    channels_last: bool = knob(True, "channels_last memory format for model and inputs")
    compile: bool = knob(False, "torch.compile the model", resumable=True)
    fused_sgd: bool = knob(False, "SGD as one fused kernel for all parameters (PyTorch's default is foreach); the "
                                  "step ran 1.12× as fast on one H100; the whole trainer is not measured yet")
    deterministic: bool = knob(False, "deterministic GPU kernels (slower); CPU runs are deterministic anyway")
    eval_batch_size: int = knob(1000, "per-rank batch size for evaluation", resumable=True)
    # run
    seed: int = knob(0, "seed for initialisation, data order and augmentation")
    out_dir: str = knob("runs", "where each run's directory (checkpoints, final model, pictures) goes",
                        resumable=True)
    run_name: str = knob("", "run name and directory under out_dir; rerun with the same name to resume (default: "
                             "model-width-batch-lr-world, then the Slurm job id, or the date and a random suffix)",
                         resumable=True)
    progress: str = knob("auto", "progress display: a tqdm bar on a TTY, one line per epoch otherwise",
                         ["auto", "bar", "line"], resumable=True)
    dist_timeout: int = knob(600, "seconds before a stuck collective fails the job", resumable=True)
    # checkpoints and resumption (see ddp_train/checkpoint.py)
    ckpt_every: int = knob(1, "checkpoint every N epochs (and at the end, and when SIGUSR2/SIGTERM asks to stop)",
                           resumable=True)
    keep_ckpts: int = knob(3, "checkpoints kept in <run dir>/checkpoints", resumable=True)
    resume: str = knob("auto", "auto: continue from the newest checkpoint of the run directory that fits this "
                               "config; never: start afresh (refused where the run directory already holds one; "
                               "the job's own torchrun restarts and Slurm requeues still resume)",
                       ["auto", "never"], resumable=True)
    # tracking
    system_metrics: bool = knob(True, "log CPU, memory, disk, network and GPU metrics to the run (each node's first "
                                      "process)", resumable=True)
    system_metrics_interval: float = knob(10.0, "seconds between system metric samples", resumable=True)
    log_every_steps: int = knob(0, "also log train loss and lr every N optimizer steps, asynchronously (0: off)",
                                resumable=True)
    tta_thresholds: str = knob("50,60,70", "time to accuracy: seconds of training and evaluation until test top-1 "
                                           "first reaches each of these percentages (comma-separated; empty: none)",
                               resumable=True)
    register_model: str = knob("", "also register the final model under this name in the MLflow model registry",
                               resumable=True)
    mlflow: bool = knob(True, "track the run in MLflow (rank 0 only)", resumable=True)
    tracking_uri: str = knob("", "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
                             resumable=True)
    experiment: str = knob("", "MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else cifar100-ddp)",
                           resumable=True)

    def validate(self, world_size: int = 1) -> None:
        for f in dataclasses.fields(self):
            if f.type is float and not math.isfinite(getattr(self, f.name)):
                raise ConfigError(f"--{flag(f.name)} must be a finite number, got {getattr(self, f.name)}")
        positive = ["epochs", "batch_size", "lr", "width", "eval_batch_size", "num_workers", "dist_timeout",
                    "ckpt_every", "keep_ckpts", "system_metrics_interval"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{flag(name)} must be positive, got {getattr(self, name)}")
        for name in ["weight_decay", "warmup_epochs", "translate", "cutout", "log_every_steps"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{flag(name)} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.seed < 2 ** 32:  # numpy's seed range; beyond it a traceback from np.random.seed
            raise ConfigError(f"--seed must be in [0, 4294967295], got {self.seed}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.schedule == "onecycle" and self.warmup_epochs >= self.epochs:
            raise ConfigError(f"--warmup-epochs {self.warmup_epochs:g} is not shorter than --epochs {self.epochs}: "
                              "the learning rate would rise for the whole run and never decay; pass a shorter "
                              f"warm-up, e.g. --warmup-epochs {self.epochs / 8:g} (an eighth of the run, like the "
                              "40-epoch recipe)")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("--nesterov needs --momentum > 0; pass --no-nesterov or a momentum")
        try:
            thresholds = self.thresholds()
        except ValueError:
            raise ConfigError(f"--tta-thresholds must be comma-separated numbers, got {self.tta_thresholds!r}") \
                from None
        if any(not 0 < t <= 100 for t in thresholds):
            raise ConfigError(f"--tta-thresholds must lie in (0, 100], got {self.tta_thresholds!r}")
        if "/" in self.run_name or self.run_name.strip() in (".", "..") or any(c < " " for c in self.run_name):
            raise ConfigError(f"--run-name {self.run_name!r} must be one directory name under --out-dir (no '/', not "
                              "'.' or '..', no control characters), e.g. --run-name "
                              f"{re.sub(r'[^A-Za-z0-9._+-]+', '-', self.run_name).strip('.-') or 'my-run'}")
        if self.sync_bn and self.norm != "bn":
            raise ConfigError("--sync-bn applies to BatchNorm only; drop it or use --norm bn")
        if self.batch_size % world_size:
            raise ConfigError(f"--batch-size {self.batch_size} is not divisible by the world size {world_size}; "
                              f"use a multiple of {world_size}")

    def thresholds(self) -> list:
        return [float(t) for t in self.tta_thresholds.split(",") if t.strip()]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def public_dict(self) -> dict:
        """The config as it may be shown and stored (logs, MLflow params, checkpoints): credentials redacted."""
        return {k: redact(v) if isinstance(v, str) else v for k, v in self.to_dict().items()}


RESUMABLE = frozenset(f.name for f in dataclasses.fields(Config) if f.metadata["resumable"])
DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}


def resume_difference(saved: dict, current: dict) -> str:
    """'' when a run with config `saved` may be continued under `current`, else the fields that differ. A field the
    saved config lacks (added to Config since) counts as its default, which keeps the earlier behaviour."""
    saved = {**DEFAULTS, **saved}
    diff = [f"{k} {saved.get(k)!r} → {v!r}" for k, v in current.items() if k not in RESUMABLE and saved.get(k) != v]
    return ("the config differs: " + ", ".join(diff)) if diff else ""

# Query parameters whose values are credentials (access tokens, signed-URL signatures, API keys).
_SECRET_QUERY = re.compile(r"token|secret|passw|pwd|key|sig|auth|credential|session", re.I)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def _redact_url(url: str) -> str:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" not in netloc and not any(_SECRET_QUERY.search(k.partition("=")[0]) for k in parts.query.split("&")):
        return url  # nothing to hide: leave it as written (urlunsplit would turn sqlite:/// into sqlite:/)
    if "@" in netloc:  # user-info (user:password@, or a token as the user name) → hidden
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "&".join(f"{k}=***" if _SECRET_QUERY.search(k) else (f"{k}={v}" if v or "=" in pair else k)
                     for pair in parts.query.split("&") if pair for k, _, v in [pair.partition("=")])
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it replaced by ***: user-info and token-like query values."""
    return _URL.sub(lambda m: _redact_url(m.group(0)), text)


# Named recipes; a preset sets these fields, the config file and flags still override them.
PRESETS = {
    # The 2018 single-process trainer this project started from: 62.7% test top-1 after 70 epochs.
    "seed2018": {"model": "seed2018", "epochs": 70, "batch_size": 256, "lr": 0.01, "momentum": 0.9, "nesterov": False,
                 "weight_decay": 1e-5, "label_smoothing": 0.0, "schedule": "constant", "translate": 4, "cutout": 0},
    # What `make train` runs on a machine without a GPU: a narrow ResNet-18 on the synthetic set, a few minutes.
    "cpu-demo": {"width": 16, "epochs": 4, "batch_size": 256, "lr": 0.2, "warmup_epochs": 1.0, "num_workers": 1,
                 "eval_batch_size": 500},
}

FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def flag(name: str) -> str:
    return name.replace("_", "-")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


class DefaultsHelp(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, except None and False (a help describes those itself): for the
    launchers' and data prep's parsers (the trainer's is generated from Config)."""
    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m ddp_train", description="Train on CIFAR-100 with DDP (run under torchrun).",
                argument_default=argparse.SUPPRESS, allow_abbrev=False)
    p.add_argument("--config", type=Path, help="YAML or TOML file of config fields (flags override it)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="named recipe (config file and flags override it)")
    p.add_argument("--check", action="store_true", help="validate the config (for WORLD_SIZE) and the data, then "
                   "exit without training; the Slurm launchers run it before any worker starts")
    for f in FIELDS.values():
        text = f.metadata["help"]  # a help that explains its default itself gets no "(default: '')"
        kw = {"help": text if "(default:" in text else f"{text} (default: {f.default!r})", "dest": f.name}
        if f.type is bool:
            p.add_argument(f"--{flag(f.name)}", action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(f"--{flag(f.name)}", type=f.type, choices=f.metadata["choices"], metavar=f.type.__name__
                           if not f.metadata["choices"] else None, **kw)
    return p


def _coerce(name: str, value, origin: str):
    if name not in FIELDS:
        raise ConfigError(f"{origin}: unknown config key '{name}'; see python -m ddp_train --help for the fields")
    f = FIELDS[name]
    if isinstance(value, str) and f.type in (int, float):  # YAML 1.1 reads 5e-4 as a string: read it by the type
        try:
            value = f.type(value)
        except ValueError:
            pass
    ok = isinstance(value, f.type) and not (f.type is not bool and isinstance(value, bool))
    if f.type is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"{origin}: '{name}' must be {f.type.__name__}, got {value!r}")
    if f.metadata["choices"] and value not in f.metadata["choices"]:
        raise ConfigError(f"{origin}: '{name}' must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
    return value


def load_file(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            raw = yaml.safe_load(path.read_text()) or {}
        else:
            raise ConfigError(f"--config {path}: use a .yaml, .yml or .toml file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"--config {path}: not valid {path.suffix[1:].upper()} ({str(e).splitlines()[0]})") \
            from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of field: value")
    return {k.replace("-", "_"): v for k, v in raw.items()}


def parse(argv=None, cores: int | None = None) -> Config:
    return parse_args(argv, cores)[0]


def cpu_cores() -> int:
    """The CPU cores this process may use, as numba counts them (its affinity: a Slurm task's --cpus-per-task, a
    taskset; or NUMBA_NUM_THREADS): FFCV cannot run more loader threads than that."""
    return int(os.environ.get("NUMBA_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))


def parse_args(argv=None, cores: int | None = None) -> tuple[Config, bool]:
    """Config from presets, file and flags, and whether --check was given. Bad input exits 2 with one line.
    `cores`: the CPU cores of each process that will train (default: this process's, cpu_cores())."""
    ns = vars(build_parser().parse_args(argv))
    check = ns.pop("check", False)
    try:
        values = {}
        preset = ns.pop("preset", None)
        path = ns.pop("config", None)
        file_values = load_file(path) if path else {}
        preset = file_values.pop("preset", None) if preset is None else preset
        file_values.pop("preset", None)
        if preset is not None:
            if preset not in PRESETS:
                raise ConfigError(f"unknown preset '{preset}'; choose from {', '.join(sorted(PRESETS))}")
            values.update(PRESETS[preset])
        values.update({k: _coerce(k, v, f"--config {path}") for k, v in file_values.items()})
        values.update(ns)
        cfg = Config(**values)
        if "warmup_epochs" not in ns and "warmup_epochs" not in file_values and cfg.warmup_epochs >= cfg.epochs:
            cfg.warmup_epochs = cfg.epochs / 8  # a short run (make train EPOCHS=2) warms up for an eighth of itself
        if "num_workers" not in ns and "num_workers" not in file_values:  # a 2-core task runs 2 loader threads
            cfg.num_workers = min(cfg.num_workers, cores or cpu_cores())
        cfg.tracking_uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        cfg.experiment = cfg.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME", "") or "cifar100-ddp"
        cfg.validate()
    except ConfigError as e:
        sys.exit(report(e))
    return cfg, check


def file_store(uri: str) -> str:
    """The directory of a tracking URI that MLflow would open as its file store ('' for any other store, or when
    MLFLOW_ALLOW_FILE_STORE lets MLflow open it): a plain path or file:, as MLflow reads URIs."""
    if not uri or uri in ("databricks", "databricks-uc", "uc") or \
            os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("true", "1"):
        return ""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme.lower() not in ("", "file"):
        return ""
    return (parts.path if parts.scheme else uri).rstrip("/") or "mlruns"


def preflight(cfg: Config, world_size: int, gpus: bool, full: bool | None = None, cores: int | None = None) -> dict:
    """Everything that can be checked before a process group exists: config, data, output directory. → manifest
    (The submitit launcher runs the same checks before it submits, for the job's world size and cores per task.)"""
    from data_prep import files  # here: make train's launcher parses with this module and needs none of it
    from data_prep import manifest as manifest_lib
    cfg.validate(world_size)
    if cfg.sync_bn and not gpus:
        raise ConfigError("--sync-bn needs GPUs (gloo has no SyncBatchNorm); on CPU use --norm gn or drop it")
    why = "--cpus-per-task" if cores else "NUMBA_NUM_THREADS" if os.environ.get("NUMBA_NUM_THREADS") else \
        "its CPU affinity"
    cores = cores or cpu_cores()
    if cfg.num_workers > cores:
        raise ConfigError(f"--num-workers {cfg.num_workers} exceeds the {cores} CPU core(s) each training process may "
                          f"use ({why}; FFCV runs at most one loader thread per core): pass --num-workers {cores} or "
                          "fewer, or give each process more cores")
    if not files.writable(cfg.out_dir):
        raise ConfigError(f"--out-dir {cfg.out_dir} is not a writable directory; choose one this job can write")
    if cfg.mlflow and (store := file_store(cfg.tracking_uri)):
        raise ConfigError(f"the MLflow tracking URI {redact(cfg.tracking_uri)} (--tracking-uri or MLFLOW_TRACKING_URI) "
                          "is a directory: MLflow's file store, which MLflow 3 refuses (maintenance mode); use a "
                          f"database, e.g. sqlite:///{store}.db (`mlflow migrate-filestore` moves the runs kept "
                          "there), or set MLFLOW_ALLOW_FILE_STORE=true, or pass --no-mlflow")
    manifest = manifest_lib.verify(cfg.data_dir, full=cfg.verify_data if full is None else full)
    count = manifest["splits"]["train"]["count"]
    per_rank = cfg.batch_size // world_size
    if math.ceil(count / world_size) < per_rank:  # each rank's share of the shuffled set, in whole batches
        raise ConfigError(f"--batch-size {cfg.batch_size} exceeds the training set ({count} images over "
                          f"{world_size} rank(s)); use a batch of at most {count // world_size * world_size}")
    return manifest

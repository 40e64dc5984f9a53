"""The Trainer's parts called one by one in this process, without torchrun or a process group: train_epoch,
evaluate, end_epoch and finish; and the one exit, which ends the MLflow run with the status of how the block ended
and frees the run directory; a disk that fills before the final model is written."""
import os
import re
import signal

import pytest
import torch
from mlflow import MlflowClient

from ddp_train import config, dist
from ddp_train.config import preflight
from ddp_train.errors import JobError
from ddp_train.trainer import Trainer

from conftest import FAST, fill, tmpfs

RECIPE = [*FAST, "--epochs", "2", "--no-system-metrics", "--run-name", "unit", "--experiment", "unit"]


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts (./mlruns beside the sqlite store) land in the test's directory


def setup(data_dir, tmp_path, env, *extra):
    cfg, _ = config.parse_args(["--data-dir", str(data_dir), *RECIPE, "--out-dir", str(tmp_path / "runs"),
                                "--tracking-uri", env["MLFLOW_TRACKING_URI"], *extra])
    d = dist.from_env()
    assert not d.distributed
    return cfg, d, preflight(cfg, d.world_size, d.device.type == "cuda")


def runs(env):
    c = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    return c, c.search_runs([c.get_experiment_by_name("unit").experiment_id], order_by=["attributes.start_time ASC"])


def test_the_loops_parts_run_one_by_one_in_this_process(synthetic_data, tmp_path, mlflow_env):
    cfg, d, manifest = setup(synthetic_data, tmp_path, mlflow_env)
    with Trainer(cfg, d, manifest) as t:
        train = t.train_epoch(0)
        assert train["train_loss"] > 0 and 0 <= train["train_top1"] <= 100 and train["images_per_s"] > 0
        test = t.evaluate()
        assert test["test_count"] == manifest["splits"]["test"]["count"] and 0 <= test["test_top1"] <= 100
        t.end_epoch(0, train, test)
        assert [h["test_top1"] for h in t.history] == [test["test_top1"]]
        t.finish()
        t.status = "FINISHED"
    run_dir = tmp_path / "runs" / "unit"
    assert (run_dir / "model.pt").is_file() and (run_dir / "time_budget.csv").is_file()
    c, [r] = runs(mlflow_env)
    assert r.info.status == "FINISHED" and r.info.run_name == "unit"
    assert [m.step for m in c.get_metric_history(r.info.run_id, "test_top1")] == [0]


def test_an_exception_in_the_loop_ends_the_run_failed_and_frees_its_directory(synthetic_data, tmp_path,
                                                                              mlflow_env):
    cfg, d, manifest = setup(synthetic_data, tmp_path, mlflow_env)
    with pytest.raises(RuntimeError, match="boom"), Trainer(cfg, d, manifest) as t:
        t.train_epoch(0)
        raise RuntimeError("boom")
    _, [r] = runs(mlflow_env)
    assert r.info.status == "FAILED"
    with Trainer(cfg, d, manifest) as again:  # the lock was released: the same name starts in this process
        assert again.run_name == "unit" and again.train() == 0
    _, found = runs(mlflow_env)
    assert found[-1].info.status == "FINISHED" and len(found[-1].data.metrics) > 0


def test_a_threshold_a_resume_adds_is_stamped_on_the_epoch_that_first_reached_it(synthetic_data, tmp_path,
                                                                                   mlflow_env):
    """--tta-thresholds may change on a resume. A threshold that an epoch before the resume had reached was stamped
    on the first epoch after it, with that epoch's time."""
    cfg, d, manifest = setup(synthetic_data, tmp_path, mlflow_env, "--tta-thresholds", "")
    with Trainer(cfg, d, manifest) as t:  # the first of the two epochs, checkpointed; then this attempt ends
        t.end_epoch(0, t.train_epoch(0), t.evaluate())
        t.status = "KILLED"
    first = t.history[0]
    assert first["test_top1"] >= 1 and not any(k.startswith("time_to") for h in t.history for k in h)
    cfg, d, manifest = setup(synthetic_data, tmp_path, mlflow_env, "--tta-thresholds", "1")
    with Trainer(cfg, d, manifest) as again:
        assert again.train() == 0
    assert [h.get("time_to_top1_1") for h in again.history] == [first["epoch_seconds"], None]
    c, [r] = runs(mlflow_env)
    assert [(m.step, m.value) for m in c.get_metric_history(r.info.run_id, "time_to_top1_1")] == \
        [(0, pytest.approx(first["epoch_seconds"]))]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")
def test_a_full_disk_at_export_fails_the_run_in_one_line_and_keeps_the_final_checkpoint(synthetic_data, tmp_path,
                                                                                        mlflow_env):
    """The output directory is a real tmpfs that fills up after the last checkpoint, before the final model."""
    with tmpfs(tmp_path / "runs", "size=16m") as out:
        cfg, d, manifest = setup(synthetic_data, tmp_path, mlflow_env)
        with pytest.raises(JobError) as e, Trainer(cfg, d, manifest) as t:
            train = t.train_epoch(0)
            t.end_epoch(0, train, t.evaluate())
            t.ckpt.wait()
            fill(out)
            t.finish()
        run_dir = out / "unit"
        assert str(e.value) == (f"cannot write the final model {run_dir / 'model.pt'} (No space left on device); the "
                                f"final checkpoint {run_dir / 'checkpoints' / 'ckpt_e0001_s000000.pt'} is intact: free "
                                "space and rerun with --run-name unit to export again")
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "checkpoints", "run.json"]  # nothing partial
        assert torch.load(run_dir / "checkpoints" / "ckpt_e0001_s000000.pt", weights_only=False)["epoch"] == 1
        _, [r] = runs(mlflow_env)
        assert r.info.status == "FAILED"


def test_a_picture_that_cannot_be_written_fails_the_run_in_one_line_after_the_model(synthetic_data, tmp_path,
                                                                                    mlflow_env):
    """A directory takes the learning curves' path: the model is saved, then one line, nothing half-written."""
    run_dir = tmp_path / "runs" / "unit"
    (run_dir / "learning_curves.png").mkdir(parents=True)
    cfg, d, manifest = setup(synthetic_data, tmp_path, mlflow_env)
    with pytest.raises(JobError) as e, Trainer(cfg, d, manifest) as t:
        train = t.train_epoch(0)
        t.end_epoch(0, train, t.evaluate())
        t.finish()
    assert str(e.value) == (f"cannot write the run's pictures and tables in {run_dir} (Is a directory); the final "
                            f"checkpoint {run_dir / 'checkpoints' / 'ckpt_e0001_s000000.pt'} is intact: fix that and "
                            "rerun with --run-name unit to export again")
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "checkpoints", "learning_curves.png", "model.pt",
                                                         "run.json"]  # no temporary file left
    _, [r] = runs(mlflow_env)
    assert r.info.status == "FAILED"


def test_a_stop_logs_its_last_step_metric_and_an_untracked_attempt_passes_the_run_and_its_epochs_on(
        synthetic_data, tmp_path, mlflow_env):
    cfg, d, manifest = setup(synthetic_data, tmp_path, mlflow_env, "--log-every-steps", "1")
    with Trainer(cfg, d, manifest) as t:
        t.stopper.requested = signal.SIGUSR2  # what the handler does
        assert t.train_epoch(0) is None  # stopped after its first step, checkpointed
        t.status, run_id = "KILLED", t.tracker.run_id
    c, _ = runs(mlflow_env)
    assert [m.step for m in c.get_metric_history(run_id, "step_train_loss")] == [1]
    # an attempt with --no-mlflow resumes that checkpoint; its own checkpoints still name the run to continue
    cfg, d, manifest = setup(synthetic_data, tmp_path, mlflow_env, "--log-every-steps", "1", "--no-mlflow")
    with Trainer(cfg, d, manifest) as t:
        assert t.start_step == 1 and t.tracker.run_id is None and t.state_dict()["mlflow_run_id"] == run_id
        t.end_epoch(0, t.train_epoch(0), t.evaluate())  # an untracked epoch, checkpointed
        t.status, untracked = "KILLED", t.history[0]["test_top1"]
    # the next tracked attempt continues the run and logs the epoch it missed
    cfg, d, manifest = setup(synthetic_data, tmp_path, mlflow_env, "--log-every-steps", "1")
    with Trainer(cfg, d, manifest) as t:
        assert (t.start_epoch, t.tracker.run_id, t.tracker.continued) == (1, run_id, True)
        t.status = "KILLED"
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "test_top1")] == [(0, untracked)]


@pytest.mark.parametrize("registered_first", [True, False], ids=["registered", "registered-on-the-rerun"])
def test_a_rerun_after_a_failure_past_the_model_upload_does_not_log_the_model_twice(synthetic_data, tmp_path,
                                                                                    mlflow_env, capsys,
                                                                                    registered_first):
    """The time budget cannot be written (a directory takes its path) after the model went to MLflow; the rerun the
    error line asks for exports again into the same run, which keeps one model and one registered version. When the
    first attempt did not register it (--register-model, which a resume may change, given only to the rerun), the
    rerun registers the model the run holds."""
    run_dir = tmp_path / "runs" / "unit"
    (run_dir / "time_budget.csv").mkdir(parents=True)
    register = ["--register-model", "unit-model"]
    cfg, d, manifest = setup(synthetic_data, tmp_path, mlflow_env, "--epochs", "1", *register * registered_first)
    with pytest.raises(JobError, match="cannot write the time budget"), Trainer(cfg, d, manifest) as t:
        t.train()
    (run_dir / "time_budget.csv").rmdir()
    cfg, d, manifest = setup(synthetic_data, tmp_path, mlflow_env, "--epochs", "1", *register)
    with Trainer(cfg, d, manifest) as t:
        assert t.tracker.continued and t.train() == 0
    assert "(an earlier attempt uploaded it); not logged again" in capsys.readouterr().out
    c, [r] = runs(mlflow_env)
    assert r.info.status == "FINISHED"
    models = c.search_logged_models([r.info.experiment_id], filter_string=f"source_run_id = '{r.info.run_id}'")
    assert len(models) == 1
    assert [v.run_id for v in c.search_model_versions("name = 'unit-model'")] == [r.info.run_id]


def test_amp_auto_continues_on_a_gpu_of_another_generation(synthetic_data, tmp_path, mlflow_env, monkeypatch, capsys):
    """--amp auto is bf16 on Ampere and newer, fp16 with a grad scaler before: a requeue onto the other kind used to
    end in a traceback (an empty scaler state loaded into an enabled scaler). Here the CPU's choice (off) stands in
    for bf16, which needs no scaler either, and step.resolve_amp is told what an older GPU would choose."""
    from ddp_train import step
    cfg, d, manifest = setup(synthetic_data, tmp_path, mlflow_env, "--amp", "auto", "--no-mlflow")
    for attempt, chosen in enumerate([(None, False), (torch.float16, True)]):  # (the other way, the saved scaler
        monkeypatch.setattr(step, "resolve_amp", lambda amp, device, c=chosen: c)  # state is simply not loaded)
        with Trainer(cfg, d, manifest) as t:
            assert t.start_step == attempt and t.scaler.is_enabled() == (attempt == 1)
            t.stopper.requested = signal.SIGUSR2  # one step, then a checkpoint, as on a requeue
            assert t.train_epoch(0) is None
            t.status = "KILLED"
    assert "note: the checkpoint trained with autocast off; this device runs float16 (--amp auto): continuing in " \
           "float16 with a new grad scaler\n" in capsys.readouterr().out
    assert (tmp_path / "runs" / "unit" / "checkpoints" / "ckpt_e0000_s000002.pt").is_file()


def test_a_model_that_is_not_finite_is_never_checkpointed(synthetic_data, tmp_path, mlflow_env):
    """An overflowed BatchNorm running_var leaves the training loss finite (training normalises with the batch's own)
    and the test loss too (that channel becomes its bias): the epoch fails in one line naming the last good
    checkpoint, and saves nothing."""
    cfg, d, manifest = setup(synthetic_data, tmp_path, mlflow_env)
    with pytest.raises(JobError) as e, Trainer(cfg, d, manifest) as t:
        t.end_epoch(0, t.train_epoch(0), t.evaluate())
        t.epoch = 1
        train = t.train_epoch(1)
        next(m for m in t.model.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_var.fill_(float("inf"))
        t.end_epoch(1, train, t.evaluate())
    good = tmp_path / "runs" / "unit" / "checkpoints" / "ckpt_e0001_s000000.pt"
    assert str(e.value) == ("the model is not finite after epoch 1 (its weights, BatchNorm statistics or test loss "
                            f"overflowed, though the training loss was finite); nothing of it was saved and the last "
                            f"good checkpoint is {good}; lower --lr (0.2) or check the data")
    assert [p.name for p in good.parent.iterdir()] == [good.name]
    _, [r] = runs(mlflow_env)
    assert r.info.status == "FAILED"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cap is on host memory; this process would train on a GPU")
@pytest.mark.parametrize("doing", ["training", "evaluating"])
def test_out_of_memory_fails_in_one_line_that_names_the_batch_to_lower(synthetic_data, tmp_path, mlflow_env, doing):
    """A real allocator refusal: this process's address space is capped (soft limit) 64 MiB above what it uses, so
    the step's 2,000-image (or the evaluation's 1,000-image) activations, 128 MiB and more each, cannot be
    allocated. (Before: a 40-line traceback.)"""
    import resource

    import psutil
    cfg, d, manifest = setup(synthetic_data, tmp_path, mlflow_env, "--no-mlflow", "--width", "32", "--batch-size",
                             *(["100", "--eval-batch-size", "1000"] if doing == "evaluating" else ["2000"]))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with pytest.raises(JobError) as e, Trainer(cfg, d, manifest) as t:
        try:
            resource.setrlimit(resource.RLIMIT_AS, (psutil.Process().memory_info().vms + 2 ** 26, hard))
            t.evaluate() if doing == "evaluating" else t.train_epoch(0)
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert type(e.value).__name__ == "OutOfMemory" and e.value.every_rank
    if doing == "training":
        assert re.fullmatch(r"out of memory on rank 0 \(cpu\) while training in epoch 0 \(tried to allocate [\d.]+ "
                            r"MiB\): 2000 images per rank per step of --width 32 do not fit; start a new run with a "
                            r"smaller --batch-size or --width \(both are part of the recipe\), or free what else holds "
                            r"that memory and rerun", str(e.value)), str(e.value)
    else:  # the evaluation batch is not part of the recipe: the same run goes on with a smaller one
        assert re.fullmatch(r"out of memory on rank 0 \(cpu\) while evaluating in epoch 0 \(tried to allocate [\d.]+ "
                            r"MiB\); lower --eval-batch-size \(1000\) and rerun", str(e.value)), str(e.value)


def test_out_of_memory_is_told_from_other_errors_with_the_size_it_asked_for():
    import numpy as np

    from ddp_train.trainer import out_of_memory
    with pytest.raises(MemoryError) as numpy_refusal:
        np.empty(2 ** 60, dtype=np.uint8)  # a real refusal: numpy names the size in its own units
    cuda = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.2 GiB"
    assert [out_of_memory(e) for e in (
        numpy_refusal.value, torch.OutOfMemoryError(cuda), RuntimeError("CUDA error: out of memory"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                     "allocate 262144000 bytes. Error code 12"),
        RuntimeError("Connection closed by peer"), ValueError("out of memory"))] == [
        "tried to allocate 1.00 EiB", "tried to allocate 2.00 GiB", "tried to allocate an unknown size",
        "tried to allocate an unknown size", "tried to allocate 250.0 MiB", "", ""]

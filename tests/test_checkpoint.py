"""checkpoint: atomic save, keep-last-K, and fallback to the previous valid checkpoint."""
import torch

from ddp_train import checkpoint

CFG = {"model": "resnet18", "lr": 0.1, "num_workers": 4}


def state(epoch, step, **over):
    return {"epoch": epoch, "step": step, "config": dict(CFG), "manifest_sha256": "abc", "world_size": 2,
            "model": {"w": torch.full((3,), float(epoch))}, **over}


def test_keeps_the_last_k_newest_first(tmp_path):
    for e in range(1, 6):
        checkpoint.save(state(e, 0), checkpoint.path_for(tmp_path, e, 0), keep=3)
    checkpoint.save(state(5, 7), checkpoint.path_for(tmp_path, 5, 7), keep=3)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "ckpt_e0005_s000007.pt", "ckpt_e0005_s000000.pt", "ckpt_e0004_s000000.pt"]
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


def test_the_checkpoint_just_written_is_never_pruned(tmp_path):
    """A 2-rank run stopped mid-epoch 1 at step 10, resumed on 1 rank from epoch 1's start with --keep-ckpts 1
    (both may change on a resume), stopped again at step 3: the newer step-10 file pushed the new one out at once,
    and the stop line named a checkpoint that no longer existed."""
    checkpoint.save(state(1, 0), checkpoint.path_for(tmp_path, 1, 0), keep=3)
    checkpoint.save(state(1, 10), checkpoint.path_for(tmp_path, 1, 10), keep=3)
    checkpoint.save(state(1, 3, world_size=1), checkpoint.path_for(tmp_path, 1, 3), keep=1)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt_e0001_s000003.pt"]


def test_epochs_past_9999_and_steps_past_999999_are_still_checkpoints(tmp_path):
    """Their names widen (ckpt_e10000_…): they were never found to resume from, nor pruned."""
    for e, s in [(9999, 0), (10000, 0), (10000, 1_000_000)]:
        checkpoint.save(state(e, s), checkpoint.path_for(tmp_path, e, s), keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt_e10000_s1000000.pt",
                                                                       "ckpt_e10000_s000000.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_e10000_s000000.pt", "ckpt_e10000_s1000000.pt"]


def test_falls_back_past_truncated_foreign_and_mismatched_checkpoints(tmp_path):
    logs = []
    checkpoint.save(state(1, 0), checkpoint.path_for(tmp_path, 1, 0), keep=10)
    checkpoint.save(state(2, 0, manifest_sha256="other"), checkpoint.path_for(tmp_path, 2, 0), keep=10)
    checkpoint.save(state(3, 0, config={**CFG, "lr": 0.2}), checkpoint.path_for(tmp_path, 3, 0), keep=10)
    checkpoint.save(state(3, 5, world_size=4), checkpoint.path_for(tmp_path, 3, 5), keep=10)
    checkpoint.save(state(4, 0), checkpoint.path_for(tmp_path, 4, 0), keep=10)
    newest = checkpoint.path_for(tmp_path, 4, 0)
    newest.write_bytes(newest.read_bytes()[:200])  # truncated
    cfg = {**CFG, "num_workers": 8}  # a mutable field may change
    path, st, _ = checkpoint.load_latest(tmp_path, cfg, "abc", world_size=2, log=logs.append)
    assert path == checkpoint.path_for(tmp_path, 1, 0) and st["model"]["w"][0] == 1.0
    assert len(logs) == 4
    assert "unreadable" in logs[0] and "mid-epoch with world size 4" in logs[1]
    assert "lr 0.1 → 0.1" not in logs[2] and "lr 0.2 → 0.1" in logs[2] and "another dataset" in logs[3]


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert checkpoint.load_latest(tmp_path / "none", CFG, "abc", 1) == (None, None, [])


def test_only_unreadable_checkpoints_are_named_corrupt_not_another_runs(tmp_path):
    """Rerunning "with that run's config and data" cannot help when the files themselves are broken."""
    import pytest

    from ddp_train import dist
    from ddp_train.config import Config
    from ddp_train.rundir import RunConflict
    cfg = Config(out_dir=str(tmp_path))
    ckpt = checkpoint.Checkpointer(tmp_path / "r", "r", cfg, "abc", dist.from_env())
    checkpoint.save(state(1, 0, config=cfg.public_dict()), checkpoint.path_for(ckpt.dir, 1, 0), keep=3)
    assert ckpt.find(log=lambda _: None)[0] == checkpoint.path_for(ckpt.dir, 1, 0)
    only = checkpoint.path_for(ckpt.dir, 1, 0)
    only.write_bytes(only.read_bytes()[:200])  # truncated: copied off a full disk, or a failing one
    with pytest.raises(RunConflict) as e:
        ckpt.find(log=lambda _: None)
    assert str(e.value) == (f"every checkpoint in {ckpt.dir} is unreadable, truncated or corrupt "
                            "(ckpt_e0001_s000000.pt is unreadable (RuntimeError)); move them out of that directory "
                            "to start this run again, or choose a new --run-name")


def test_a_run_stopped_mid_epoch_on_other_ranks_is_refused_in_one_line_naming_the_rank_count(tmp_path):
    import dataclasses

    import pytest

    from ddp_train import dist
    from ddp_train.config import Config
    from ddp_train.rundir import RunConflict
    cfg = Config(out_dir=str(tmp_path))
    two = dataclasses.replace(dist.from_env(), world_size=2)
    ckpt = checkpoint.Checkpointer(tmp_path / "r", "r", cfg, "abc", two)
    for step in (3, 7):  # two stops, both on one rank
        checkpoint.save(state(1, step, config=cfg.public_dict(), world_size=1), checkpoint.path_for(ckpt.dir, 1, step),
                        keep=3)
    said = []
    with pytest.raises(RunConflict) as e:
        ckpt.find(log=said.append)
    assert said == []  # no "trying the previous one" lines before the error
    assert str(e.value) == (f"the checkpoints in {ckpt.dir} stopped mid-epoch with world size 1 and this job has 2; "
                            "rerun with 1 rank(s) to resume, or choose a new --run-name")

"""data_prep: official-format reading, beton round trip, manifest, idempotence, atomicity and bad input."""
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import N_TEST, N_TRAIN, error_lines, prep_synthetic, run
from data_prep import cifar
from data_prep.beton import read_beton
from data_prep.cifar import DataError
from data_prep.manifest import MANIFEST, sha256sum, verify


def prep(*args, **kw):
    return run([sys.executable, "-m", "data_prep", *args], **kw)


def test_beton_round_trip_is_bit_identical(synthetic_data, tmp_path):
    # Regenerate the same synthetic source and read it through the archive reader, as data_prep did.
    archive = cifar.synthetic_archive(tmp_path / "src.tar.gz", N_TRAIN, N_TEST, seed=0)
    src = cifar.read_archive(archive, allow_custom=True)
    m = verify(synthetic_data)
    for name, split in (("train", src.train), ("test", src.test)):
        images, fine, coarse = read_beton(synthetic_data / f"cifar100_{name}.beton")
        assert images.dtype == np.uint8 and images.shape == (len(split.images), 32, 32, 3)
        assert np.array_equal(images, split.images)
        assert np.array_equal(fine, split.fine) and np.array_equal(coarse, split.coarse)
        entry = m["splits"][name]
        assert entry["count"] == len(split.images)
        assert entry["sha256"] == sha256sum(synthetic_data / entry["file"])
    assert m["fine_label_names"] == cifar.FINE_NAMES and m["coarse_label_names"] == cifar.COARSE_NAMES
    assert m["fine_to_coarse"] == cifar.FINE_TO_COARSE
    assert m["source"] == "synthetic" and m["source_checksum"].startswith("md5:") and not m["official"]


def test_synthetic_is_in_the_official_pickle_layout(tmp_path):
    archive = cifar.synthetic_archive(tmp_path / "a.tar.gz", 30, 20, seed=1)
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["cifar-100-python/meta", "cifar-100-python/test", "cifar-100-python/train"]
    ds = cifar.read_archive(archive, allow_custom=True)
    assert ds.train.images.shape == (30, 32, 32, 3) and ds.test.images.shape == (20, 32, 32, 3)
    # superclasses follow the official fine → coarse mapping
    assert all(cifar.FINE_TO_COARSE[f] == c for f, c in zip(ds.train.fine, ds.train.coarse))


def test_prep_is_idempotent_and_force_rewrites(tmp_path):
    out = tmp_path / "d"
    prep_synthetic(out, 200, 100)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prep_synthetic(out, 200, 100)
    assert "nothing to do" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # a different request is not "up to date"
    changed = prep_synthetic(out, 200, 100, seed=5)
    assert "nothing to do" not in changed.stdout and json.loads((out / MANIFEST).read_text())["request"]["seed"] == 5
    forced = prep_synthetic(out, 200, 100, seed=5, extra=["--force"])
    assert "nothing to do" not in forced.stdout


def test_local_archive_needs_official_md5_or_allow_custom(tmp_path):
    archive = cifar.synthetic_archive(tmp_path / "cifar-100-python.tar.gz", 100, 50, seed=2)
    out = tmp_path / "out"
    p = prep("--source", archive, "--out", out)
    assert p.returncode == 1
    [line] = error_lines(p.stderr)
    assert "not the official" in line and "--allow-custom" in line
    assert not out.exists() or not any(out.iterdir())
    # the extracted directory, accepted as a custom set
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    p = prep("--source", tmp_path / "extracted", "--out", out, "--allow-custom", check=True)
    m = verify(out)
    assert m["splits"]["train"]["count"] == 100 and m["source_checksum"].startswith("sha256:")
    assert m["request"]["allow_custom"] is True


@pytest.mark.parametrize("case", ["missing-path", "not-a-tar", "no-members", "cifar10-like"])
def test_bad_sources_fail_with_one_line_and_write_nothing(tmp_path, case):
    out = tmp_path / "out"
    src = tmp_path / "cifar-100-python.tar.gz"
    if case == "missing-path":
        src = tmp_path / "nope.tar.gz"
    elif case == "not-a-tar":
        src.write_bytes(os.urandom(4096))
    elif case == "no-members":
        with tarfile.open(src, "w:gz") as tar:
            tar.add(__file__, arcname="something/else.py")
    else:  # pickles without coarse labels
        import io
        import pickle
        with tarfile.open(src, "w:gz") as tar:
            for name in ("train", "test", "meta"):
                raw = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
                info = tarfile.TarInfo(f"cifar-100-python/{name}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    p = prep("--source", src, "--out", out, "--allow-custom")
    assert p.returncode == 1, p.stdout
    assert len(error_lines(p.stderr)) == 1, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not out.exists() or not any(out.glob("*.beton")) and not (out / MANIFEST).exists()


def test_download_fails_fast_offline_naming_both_alternatives(tmp_path):
    t0 = time.monotonic()
    p = prep("--source", "download", "--out", tmp_path / "out")
    assert p.returncode == 1
    [line] = error_lines(p.stderr)
    assert "--source /path/to/cifar-100-python.tar.gz" in line and "--source synthetic" in line
    assert time.monotonic() - t0 < 60  # seconds, not a hung connection
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def test_interrupted_prep_never_leaves_data_that_verifies(tmp_path):
    out = tmp_path / "d"
    prep_synthetic(out, 200, 100)
    assert verify(out)
    # Redo it bigger and SIGKILL it while the first beton is being written.
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", "--source", "synthetic", "--out", out,
                             "--synthetic-train", "30000", "--synthetic-test", "100", "--force"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(out.glob(".cifar100_train.beton.tmp*")):
        assert proc.poll() is None and time.monotonic() < deadline, "prep ended before writing"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the prep and its FFCV writer processes, as a killed job would be
    proc.wait()
    with pytest.raises(DataError, match="no prepared data"):
        verify(out)
    # the next prep sees nothing valid, cleans the temporary files and redoes the work
    p = prep_synthetic(out, 200, 100)
    assert "nothing to do" not in p.stdout
    assert verify(out)["splits"]["train"]["count"] == 200
    assert not list(out.glob(".*tmp*"))


def test_verify_rejects_truncated_and_replaced_betons(tmp_path):
    out = tmp_path / "d"
    prep_synthetic(out, 200, 100)
    beton = out / "cifar100_test.beton"
    data = beton.read_bytes()
    beton.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated"):
        verify(out)
    beton.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(DataError, match="sha256"):
        verify(out)

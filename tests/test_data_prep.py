"""data_prep: official-format reading, beton round trip, custom class sets, manifest, quick and full verification,
idempotence and atomicity."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from data_prep import cifar
from data_prep.beton import read_beton
from data_prep.cifar import DataError
from data_prep.manifest import MANIFEST, sha256sum, verify

from conftest import N_TEST, N_TRAIN, error_lines, prep_synthetic, run


def prep(*args, **kw):
    return run([sys.executable, "-m", "data_prep", *args], **kw)


def prep_here(*args):
    """A prep that succeeds, in this process (FFCV is imported once for all of them; keep_sigterm restores
    pytest's SIGTERM handler, which data_prep's main() replaces)."""
    from data_prep.__main__ import main as prep_main
    assert prep_main([str(a) for a in args]) == 0


def custom_archive(path, splits: dict, fine_names, coarse_names, seed=0):
    """An official-format archive: splits maps train/test to (fine labels, coarse labels); images are random."""
    rng = np.random.default_rng(seed)
    members = {name: {b"data": rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8), b"fine_labels": list(fine),
                      b"coarse_labels": list(coarse)} for name, (fine, coarse) in splits.items()}
    members["meta"] = {b"fine_label_names": [n.encode() for n in fine_names],
                       b"coarse_label_names": [n.encode() for n in coarse_names]}
    return cifar.write_archive(path, members)


def test_beton_round_trip_is_bit_identical(synthetic_data, tmp_path):
    # Regenerate the same synthetic source (the difficulty the fixture asked for) and read it through the archive
    # reader, as data_prep did.
    m = verify(synthetic_data, full=True)
    r = m["request"]
    spec = dataclasses.replace(cifar.Difficulty.at(r["difficulty"]), noise=r["noise"], label_noise=r["label_noise"])
    archive = cifar.synthetic_archive(tmp_path / "src.tar.gz", N_TRAIN, N_TEST, seed=0, spec=spec)
    src = cifar.read_archive(archive, allow_custom=True)
    for name, split in (("train", src.train), ("test", src.test)):
        beton = synthetic_data / f"cifar100_{name}.beton"
        images, fine, coarse = read_beton(beton)
        assert images.dtype == np.uint8 and images.shape == (len(split.images), 32, 32, 3)
        assert np.array_equal(images, split.images)
        assert np.array_equal(fine, split.fine) and np.array_equal(coarse, split.coarse)
        entry = m["splits"][name]
        assert entry["count"] == len(split.images)
        assert entry["sha256"] == sha256sum(beton) and entry["mtime_ns"] == beton.stat().st_mtime_ns
        assert entry["fine_present"] == sorted(set(split.fine.tolist()))
        assert entry["coarse_present"] == sorted(set(split.coarse.tolist()))
    assert m["fine_label_names"] == cifar.FINE_NAMES and m["coarse_label_names"] == cifar.COARSE_NAMES
    assert (m["num_classes"], m["num_superclasses"]) == (100, 20)
    assert m["fine_to_coarse"] == cifar.FINE_TO_COARSE
    assert m["fields"]["fine_label"] == "IntField 0..99" and m["fields"]["coarse_label"] == "IntField 0..19"
    assert m["source"] == "synthetic" and m["source_checksum"].startswith("md5:") and not m["official"]
    assert [p.name for p in synthetic_data.glob(".*")] == [".prep.lock"]  # no temporary file left


def test_synthetic_is_in_the_official_pickle_layout(tmp_path):
    archive = cifar.synthetic_archive(tmp_path / "a.tar.gz", 30, 20, seed=1)
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["cifar-100-python/meta", "cifar-100-python/test", "cifar-100-python/train"]
    ds = cifar.read_archive(archive, allow_custom=True)
    assert ds.train.images.shape == (30, 32, 32, 3) and ds.test.images.shape == (20, 32, 32, 3)
    # superclasses follow the official fine → coarse mapping
    assert all(cifar.FINE_TO_COARSE[f] == c for f, c in zip(ds.train.fine, ds.train.coarse, strict=True))
    assert sorted(os.listdir(tmp_path)) == ["a.tar.gz"]  # written through a temporary name, renamed when complete


def test_a_custom_set_with_fewer_classes_prepares(tmp_path, keep_sigterm):
    # 10 fine classes in 3 superclasses; fine class 9 appears in neither split.
    fine_to_coarse = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    train = [i % 9 for i in range(60)]
    test = [i % 5 for i in range(20)]
    archive = custom_archive(tmp_path / "ten.tar.gz", {"train": (train, [fine_to_coarse[f] for f in train]),
                                                      "test": (test, [fine_to_coarse[f] for f in test])},
                            [f"f{i}" for i in range(10)], ["a", "b", "c"])
    out = tmp_path / "out"
    prep_here("--source", archive, "--out", out, "--allow-custom")
    m = verify(out, full=True)
    assert (m["num_classes"], m["num_superclasses"]) == (10, 3)
    assert m["fine_to_coarse"] == [*fine_to_coarse[:9], -1]
    assert m["fields"]["fine_label"] == "IntField 0..9" and m["fields"]["coarse_label"] == "IntField 0..2"
    train_m, test_m = m["splits"]["train"], m["splits"]["test"]
    assert train_m["fine_present"] == list(range(9)) and train_m["coarse_present"] == [0, 1, 2]
    assert test_m["fine_present"] == list(range(5)) and test_m["coarse_present"] == [0, 1]
    _, fine, coarse = read_beton(out / "cifar100_test.beton")
    assert fine.tolist() == test and coarse.tolist() == [fine_to_coarse[f] for f in test]


def test_the_official_names_with_only_ten_classes_used(tmp_path, keep_sigterm):
    train = list(range(10)) * 5
    test = [0, 3, 7]
    splits = {name: (f, [cifar.FINE_TO_COARSE[i] for i in f]) for name, f in (("train", train), ("test", test))}
    extracted = tmp_path / "extracted"
    with tarfile.open(custom_archive(tmp_path / "a.tar.gz", splits, cifar.FINE_NAMES, cifar.COARSE_NAMES)) as tar:
        tar.extractall(extracted, filter="data")
    out = tmp_path / "out"
    prep_here("--source", extracted, "--out", out, "--allow-custom")
    m = verify(out)
    assert (m["num_classes"], m["num_superclasses"]) == (100, 20) and len(m["fine_to_coarse"]) == 100
    assert m["fine_to_coarse"] == cifar.FINE_TO_COARSE[:10] + [-1] * 90
    assert m["splits"]["train"]["fine_present"] == list(range(10))
    assert m["splits"]["train"]["coarse_present"] == sorted(set(cifar.FINE_TO_COARSE[:10]))
    assert m["splits"]["test"]["fine_present"] == [0, 3, 7]
    assert m["splits"]["test"]["coarse_present"] == sorted({cifar.FINE_TO_COARSE[i] for i in test})
    assert m["fields"]["fine_label"] == "IntField 0..99" and not m["official"]


def test_prep_is_idempotent_and_force_rewrites(tmp_path, capsys, keep_sigterm):
    def prep_in_process(*extra):
        prep_here("--source", "synthetic", "--out", out, "--synthetic-train", 200, "--synthetic-test", 100,
                  "--synthetic-difficulty", "easy", *extra)
        return capsys.readouterr().out
    out = tmp_path / "d"
    prep_in_process()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert "nothing to do" in prep_in_process()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # a different request is not "up to date"
    assert "nothing to do" not in prep_in_process("--synthetic-seed", "5")
    assert json.loads((out / MANIFEST).read_text())["request"]["seed"] == 5
    assert "nothing to do" not in prep_in_process("--synthetic-seed", "5", "--force")


def test_local_archive_needs_official_md5_or_allow_custom(tmp_path, keep_sigterm):
    archive = cifar.synthetic_archive(tmp_path / "cifar-100-python.tar.gz", 100, 50, seed=2)
    out = tmp_path / "out"
    p = prep("--source", archive, "--out", out)
    assert p.returncode == 1
    [line] = error_lines(p.stderr)
    assert "not the official" in line and "--allow-custom" in line
    assert not out.exists()
    # the extracted directory: not official by its files' MD5 (its shape is not checked: a relabelled or
    # generated set of the official size used to pass as official), accepted as a custom set
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    with pytest.raises(DataError, match=r"extracted/cifar-100-python: not the official CIFAR-100 files \(the MD5 of "
                                        r"train is [0-9a-f]{32}, not 16019d7e3df5f24257cddd939b257f8d\); 100 train / "
                                        r"50 test images in 100 fine / 20 coarse classes: pass --allow-custom"):
        cifar.read_directory(tmp_path / "extracted", allow_custom=False)
    prep_here("--source", tmp_path / "extracted", "--out", out, "--allow-custom")
    m = verify(out)
    assert m["splits"]["train"]["count"] == 100 and m["source_checksum"].startswith("sha256:")
    assert m["request"]["allow_custom"] is True


def test_download_fails_fast_offline_naming_both_alternatives(tmp_path):
    t0 = time.monotonic()
    p = prep("--source", "download", "--out", tmp_path / "out")
    assert p.returncode == 1
    [line] = error_lines(p.stderr)
    assert "--source /path/to/cifar-100-python.tar.gz" in line and "--source synthetic" in line
    assert time.monotonic() - t0 < 60  # seconds, not a hung connection
    assert not (tmp_path / "out").exists()


def start_bigger_prep(out):
    """Redo `out` bigger (--force) in a process group; → the process, once its train beton is being written (for
    about 5 s with one writer)."""
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", "--source", "synthetic", "--out", out,
                             "--synthetic-train", "10000", "--synthetic-test", "100", "--synthetic-difficulty", "easy",
                             "--workers", "1", "--force"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(out.glob(".cifar100_train.beton.tmp*")):
        assert proc.poll() is None and time.monotonic() < deadline, "prep ended before writing"
        time.sleep(0.05)
    return proc


def test_a_second_prep_is_refused_while_one_writes_and_a_killed_re_prep_leaves_the_old_set(tmp_path):
    out = tmp_path / "d"
    prep_synthetic(out, 200, 100)
    proc = start_bigger_prep(out)
    p = run([sys.executable, "-m", "data_prep", "--source", "synthetic", "--out", out, "--synthetic-train", 200,
             "--synthetic-test", 100, "--force"])
    assert p.returncode == 1 and error_lines(p.stderr) == [f"error: another data prep is writing {out}; wait for it "
                                                           "to end or choose another --out"], p.stderr
    assert list(out.glob(".cifar100_train.beton.tmp*"))  # the writer's temporary file was left alone
    os.killpg(proc.pid, signal.SIGKILL)  # the prep and its FFCV writer processes, as a killed job would be
    proc.communicate()
    assert verify(out, full=True)["splits"]["train"]["count"] == 200  # the new set replaces it only when complete
    # the next prep removes the killed one's temporary files and finds the set it asks for
    p = prep_synthetic(out, 200, 100)
    assert "nothing to do" in p.stdout and not list(out.glob(".*tmp*"))


def test_a_re_prep_stopped_by_sigterm_says_so_in_one_line_and_keeps_the_old_set(tmp_path):
    out = tmp_path / "d"
    prep_synthetic(out, 200, 100)
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", "--source", "synthetic", "--out", out,
                             "--synthetic-train", "200", "--synthetic-test", "100", "--synthetic-seed", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("writing 200 train images"):  # then FFCV writes and reads it back: seconds
            proc.send_signal(signal.SIGTERM)  # the prep alone, as Slurm's or docker's stop reaches it
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.splitlines() == [
        "error: stopped by SIGTERM; the data set that was there (if any) is unchanged and nothing half-written was "
        "kept; rerun to prepare the data"], err
    assert verify(out, full=True)["request"]["seed"] == 0 and not list(out.glob(".*tmp*"))


@pytest.fixture
def prepared(synthetic_data, tmp_path):
    """A copy of the session's prepared set (copy2 keeps each beton's mtime_ns, so the quick check trusts it)."""
    out = tmp_path / "d"
    shutil.copytree(synthetic_data, out)
    return out


def test_quick_verify_trusts_size_and_mtime_and_full_verify_hashes(prepared):
    beton = prepared / "cifar100_test.beton"
    st = beton.stat()
    assert verify(prepared)["splits"]["test"]["mtime_ns"] == st.st_mtime_ns
    # touched, same content: the mtime differs, so the quick check hashes, and the hash matches
    os.utime(beton, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    verify(prepared)
    verify(prepared, full=True)
    # one byte changed in place with the recorded mtime restored: only the full check can see it
    with open(beton, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(beton, ns=(st.st_atime_ns, st.st_mtime_ns))
    verify(prepared)
    with pytest.raises(DataError, match="does not match the sha256"):
        verify(prepared, full=True)
    # a manifest from before mtimes were recorded: the quick check hashes
    m = json.loads((prepared / MANIFEST).read_text())
    del m["splits"]["test"]["mtime_ns"]
    (prepared / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DataError, match="does not match the sha256"):
        verify(prepared)


def test_verify_rejects_truncated_and_replaced_betons_and_a_manifest_that_is_not_one(prepared):
    beton = prepared / "cifar100_test.beton"
    data = beton.read_bytes()
    st = beton.stat()
    beton.write_bytes(data[: len(data) // 2])
    os.utime(beton, ns=(st.st_atime_ns, st.st_mtime_ns))
    for full in (False, True):
        with pytest.raises(DataError, match="truncated"):
            verify(prepared, full=full)
    beton.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # replaced: a new mtime
    with pytest.raises(DataError, match="sha256"):
        verify(prepared)
    beton.unlink()
    with pytest.raises(DataError, match="missing"):
        verify(prepared)
    (prepared / MANIFEST).write_text("[]")  # valid JSON, not a manifest
    with pytest.raises(DataError, match=r"manifest.json is not a data prep manifest \(a JSON list\)"):
        verify(prepared)


def test_a_manifest_that_names_another_file_than_the_loaders_read_is_refused(synthetic_data, tmp_path):
    """The check hashed the file the manifest names; both loaders read cifar100_<split>.beton."""
    for f in synthetic_data.iterdir():
        (tmp_path / f.name).symlink_to(f)
    m = json.loads((synthetic_data / "manifest.json").read_text())
    m["splits"]["train"]["file"] = "cifar100_test.beton"
    m["splits"]["train"].update({k: m["splits"]["test"][k] for k in ("bytes", "sha256", "mtime_ns")})
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"lists 'cifar100_test.beton' as the train beton, not 'cifar100_train.beton' "
                                        r"\(edited by hand\?\); rerun data prep with --force"):
        verify(tmp_path)

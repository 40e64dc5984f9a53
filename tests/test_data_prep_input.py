"""data_prep's bad input and a full disk: one `error:` line naming the problem and the fix, a non-zero exit status,
and nothing written (no directory, no temporary file, no beton, no manifest)."""
import contextlib
import os
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from data_prep import cifar
from data_prep.manifest import verify

from conftest import tmpfs

ROOT_ONLY = "mounting a tmpfs (a real full or read-only filesystem) needs root; run the suite as root, as CI does"


def prep(*args, timeout=300):
    """The CLI as a process group, killed whole on timeout (a hung prep leaves FFCV writer processes behind)."""
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"python -m data_prep {' '.join(map(str, args))} hung for {timeout} s") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def archive(tmp_path, train: dict, fine_names=("a", "b"), coarse_names=("x",), test=None):
    """An official-format archive with the given train pickle (and a valid test pickle unless given)."""
    test = test or {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1], b"coarse_labels": [0, 0]}
    meta = {b"fine_label_names": [n.encode() for n in fine_names],
            b"coarse_label_names": [n.encode() for n in coarse_names]}
    return cifar.write_archive(tmp_path / "custom.tar.gz", {"train": train, "test": test, "meta": meta})


def labelled(tmp_path, fine_names, coarse_names, train, test):
    """An archive whose splits are lists of (fine, coarse) label pairs."""
    def split(pairs):
        return {b"data": np.zeros((len(pairs), 3072), np.uint8), b"fine_labels": [f for f, _ in pairs],
                b"coarse_labels": [c for _, c in pairs]}
    return archive(tmp_path, split(train), fine_names, coarse_names, split(test))


def no_members(tmp_path):
    path = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(__file__, arcname="something/else.py")
    return path


def directory_member(tmp_path):
    """The official layout, except that train is a directory."""
    path = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(tmp_path, arcname="cifar-100-python/train", recursive=False)
    return path


def flipped(path):
    """The archive with one bit of the CRC-32 in its gzip trailer flipped: every member still reads and unpickles,
    as after a flip in pixel data, and only gzip's check at the end of the stream can notice."""
    data = bytearray(path.read_bytes())
    data[-8] ^= 0x10
    path.write_bytes(bytes(data))
    return path


def a_file(tmp_path, name="a-file", data=b"not an archive\n"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


SYN = ["--source", "synthetic"]
# case: (arguments given the test's tmp_path and the --out it must leave untouched, exit status, words of the line)
CASES = {
    "train count 0": (lambda t, o: [*SYN, "--out", o, "--synthetic-train", "0"], 2,
                      "--synthetic-train must be at least 1 image, got 0"),
    "test count negative": (lambda t, o: [*SYN, "--out", o, "--synthetic-test", "-5"], 2,
                            "--synthetic-test must be at least 1 image, got -5"),
    "noise negative": (lambda t, o: [*SYN, "--out", o, "--synthetic-noise", "-10"], 2,
                       "--synthetic-noise is a pixel standard deviation from 0 to 255 (e.g. 48), got -10.0"),
    "noise nan": (lambda t, o: [*SYN, "--out", o, "--synthetic-noise", "nan"], 2, "--synthetic-noise is a pixel"),
    "noise overflows": (lambda t, o: [*SYN, "--out", o, "--synthetic-noise", "1e300"], 2,
                        "--synthetic-noise is a pixel standard deviation from 0 to 255 (e.g. 48), got 1e+300"),
    "seed negative": (lambda t, o: [*SYN, "--out", o, "--synthetic-seed", "-1"], 2,
                      "--synthetic-seed must be 0 or more, got -1"),
    "workers 0": (lambda t, o: [*SYN, "--out", o, "--workers", "0"], 2, ("--workers is 1 to ", "got 0")),
    "workers 100000": (lambda t, o: [*SYN, "--out", o, "--workers", "100000"], 2,  # once forked them all
                       ("--workers is 1 to ", "writer processes (4 per CPU, at least 64), got 100000")),
    "more images than memory": (lambda t, o: [*SYN, "--out", o, "--synthetic-train", "100000000"], 1,
                                "not enough memory to hold the data set"),
    "workers not a number": (lambda t, o: [*SYN, "--out", o, "--workers", "two"], 2,
                             "argument --workers: invalid int value: 'two'; see python -m data_prep --help"),
    "unknown flag": (lambda t, o: [*SYN, "--out", o, "--sythetic-train", "5"], 2,
                     "unrecognized arguments: --sythetic-train 5; see python -m data_prep --help"),
    "out is a file": (lambda t, o: [*SYN, "--out", a_file(t)], 2, ("--out ", "a-file is a file; choose a directory")),
    "out under a file": (lambda t, o: [*SYN, "--out", a_file(t) / "sub"], 2,
                         "a-file/sub cannot be created: "),
    "download dir is a file": (lambda t, o: ["--source", "download", "--out", o, "--download-dir", a_file(t)], 2,
                               ("--download-dir ", "a-file is a file; choose a directory")),
    "source missing": (lambda t, o: ["--source", t / "nope.tar.gz", "--out", o], 2,
                       "nope.tar.gz: no such file or directory; use 'download', 'synthetic', or a path to"),
    "source not an archive": (lambda t, o: ["--source", a_file(t, "x.tar.gz", os.urandom(4096)), "--out", o,
                                            "--allow-custom"], 1, "x.tar.gz: not a readable tar.gz archive"),
    "source a text file": (lambda t, o: ["--source", a_file(t, "notes.txt"), "--out", o], 1,
                           "notes.txt: not a readable tar.gz archive"),  # not "pass --allow-custom"
    "archive without the members": (lambda t, o: ["--source", no_members(t), "--out", o, "--allow-custom"], 1,
                                    "no member cifar-100-python/train"),
    "directory without the pickles": (lambda t, o: ["--source", t, "--out", o, "--allow-custom"], 1,
                                      "no file 'train'"),
    "cifar-10 pickles": (lambda t, o: ["--source", archive(t, {b"data": np.zeros((2, 3072), np.uint8),
                                                               b"labels": [0, 1]}), "--out", o, "--allow-custom"], 1,
                         "lacks data/fine_labels/coarse_labels: not CIFAR-100"),
    "images not 32x32x3": (lambda t, o: ["--source", archive(t, {b"data": np.zeros((2, 1024), np.uint8),
                                                                 b"fine_labels": [0, 1], b"coarse_labels": [0, 0]}),
                                         "--out", o, "--allow-custom"], 1, "data must be uint8 N×3072"),
    "labels not integers": (lambda t, o: ["--source", archive(t, {b"data": np.zeros((2, 3072), np.uint8),
                                                                  b"fine_labels": [0.5, 1.0],
                                                                  b"coarse_labels": [0, 0]}),
                                          "--out", o, "--allow-custom"], 1, "must be a flat list of integer class"),
    "labels beyond the names": (lambda t, o: ["--source", labelled(t, ["a", "b"], ["x"], [(0, 0), (2, 0)],
                                                                   [(1, 0)]), "--out", o, "--allow-custom"], 1,
                                ("train labels out of range (fine 0..2, coarse 0..0); with 2 fine and 1 coarse "
                                 "names they must be 0..1 and 0..0")),
    "fine class in two superclasses": (lambda t, o: ["--source", labelled(t, ["a", "b"], ["x", "y"], [(0, 0)],
                                                                          [(0, 1)]), "--out", o, "--allow-custom"], 1,
                                       "fine class 0 appears under superclasses 0 and 1"),
    "no class names": (lambda t, o: ["--source", labelled(t, [], ["x"], [(0, 0)], [(0, 0)]), "--out", o,
                                     "--allow-custom"], 1, "meta lists 0 fine and 1 coarse class names"),
    "a member that is a directory": (lambda t, o: ["--source", directory_member(t), "--out", o, "--allow-custom"],
                                     1, "no member cifar-100-python/train"),
    "a corrupt gzip stream": (lambda t, o: ["--source", flipped(labelled(t, ["a", "b"], ["x"], [(0, 0), (1, 0)],
                                                                         [(1, 0)])), "--out", o, "--allow-custom"],
                              1, "custom.tar.gz: not a readable tar.gz archive"),
    "labels without images": (lambda t, o: ["--source", archive(t, {b"data": np.zeros((2, 3072), np.uint8),
                                                                    b"fine_labels": [0, 1, 1],
                                                                    b"coarse_labels": [0, 0, 0]}),
                                            "--out", o, "--allow-custom"], 1, "train has 2 images, 3 fine"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
    args, code, words = CASES[case]
    out = tmp_path / "out"
    argv = args(tmp_path, out)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    p = prep(*argv)
    assert p.returncode == code, p.stderr
    assert p.stderr.splitlines() == [p.stderr.strip()] and p.stderr.startswith("error: "), p.stderr
    assert all(w in p.stderr for w in (words if isinstance(words, tuple) else (words,))), p.stderr
    assert not out.exists()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_bad_source_leaves_prepared_data_intact(synthetic_data, tmp_path):
    out = tmp_path / "d"
    subprocess.run(["cp", "-a", synthetic_data, out], check=True)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    p = prep("--source", a_file(tmp_path, "x.tar.gz"), "--out", out, "--force", "--allow-custom")
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1, p.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    verify(out, full=True)


@pytest.mark.parametrize("exists", [True, False], ids=["existing", "to-create"])
def test_out_on_a_read_only_filesystem(tmp_path, exists):
    if os.geteuid() != 0:  # without root, a directory without write permission is read-only enough
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        ctx = contextlib.nullcontext(ro)
    else:
        ctx = tmpfs(tmp_path / "ro", "ro,size=1m")
    with ctx as ro:
        out = ro if exists else ro / "new" / "data"
        p = prep("--source", "synthetic", "--out", out)
        assert p.returncode == 2, p.stderr
        assert p.stderr.splitlines() == [(f"error: --out {out} is not a writable directory and cannot be created; "
                                          "choose one this user can write (or fix its permissions)")]
        assert not any(ro.iterdir())


@pytest.mark.parametrize("size, train, test", [("12m", 5000, 100), ("20m", 200, 5000)],
                         ids=["train-beton", "test-beton"])
def test_a_full_disk_fails_in_one_line_and_leaves_nothing(tmp_path, size, train, test):
    """ENOSPC in FFCV's writer processes: 5000 images are several chunks, so both workers hold pages when one fails
    (FFCV's own wait then hung with the other worker spinning). Exactly one line on stderr also means no traceback
    from a worker and no leaked-shared-memory warning from the resource tracker. In the second case the train beton
    fits and the test beton does not: the train beton goes too, since without a manifest it is not data."""
    if os.geteuid() != 0:
        pytest.skip(ROOT_ONLY)
    with tmpfs(tmp_path / "small", f"size={size}") as fs:
        out = fs / "data"
        p = prep("--source", "synthetic", "--out", out, "--synthetic-train", train, "--synthetic-test", test,
                 "--workers", "2", timeout=300)
        split = "train" if train > test else "test"
        assert p.returncode == 1, p.stderr
        assert p.stderr.splitlines() == [(f"error: cannot write {out}/cifar100_{split}.beton: No space left on "
                                          "device; free space or choose another --out")]
        assert not any(fs.iterdir())  # no temporary file, no beton, no manifest, not even the directory it made



def test_a_re_prep_that_fills_the_disk_keeps_the_set_that_was_there(tmp_path):
    """The new betons are staged beside the old set, which is replaced only once they are complete. FFCV pads each
    beton to whole 8 MiB pages per writer: the 200/100 set takes 33 MB, leaving too little for a new train beton."""
    if os.geteuid() != 0:
        pytest.skip(ROOT_ONLY)
    with tmpfs(tmp_path / "small", "size=48m") as fs:
        out = fs / "data"
        assert prep("--source", "synthetic", "--out", out, "--synthetic-train", 200, "--synthetic-test", 100,
                    "--synthetic-difficulty", "easy").returncode == 0
        p = prep("--source", "synthetic", "--out", out, "--synthetic-train", 5000, "--synthetic-test", 100,
                 "--synthetic-difficulty", "easy", "--force")
        assert p.returncode == 1 and p.stderr.splitlines() == [
            f"error: cannot write {out}/cifar100_train.beton: No space left on device; free space or choose another "
            "--out"], p.stderr
        assert verify(out, full=True)["splits"]["train"]["count"] == 200
        assert sorted(p.name for p in out.iterdir()) == [".prep.lock", "cifar100_test.beton", "cifar100_train.beton",
                                                         "manifest.json"]


def test_generated_data_goes_to_its_own_directory_unless_told(capsys):
    """`python -m data_prep --source synthetic` used to replace the official set in data/."""
    from pathlib import Path

    from data_prep.__main__ import parse_args
    assert parse_args(["--source", "synthetic"]).out == Path("data/synthetic")
    assert parse_args([]).out == parse_args(["--source", "x.tar.gz"]).out == Path("data")
    assert parse_args(["--source", "synthetic", "--out", "d"]).out == Path("d")
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "(default: None)" not in capsys.readouterr().out  # such defaults are described in the help itself


def test_class_names_in_str_are_read_and_names_that_are_not_utf8_are_one_line(tmp_path):
    """A custom meta pickled by Python 3 (str names) read as "meta lacks fine_label_names: not CIFAR-100"; a name
    that is not UTF-8 was a UnicodeDecodeError traceback."""
    split = {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1], b"coarse_labels": [0, 0]}

    def read(fine):
        meta = {b"fine_label_names": fine, b"coarse_label_names": [b"x"]}
        path = cifar.write_archive(tmp_path / "custom.tar.gz", {"train": split, "test": split, "meta": meta})
        return cifar.read_archive(path, allow_custom=True)
    assert read(["a", "b"]).fine_names == ["a", "b"]
    with pytest.raises(cifar.DataError, match=r"meta fine_label_names: the class name b'caf\\xe9' is not valid UTF-8; "
                                              "fix the set's meta file$"):
        read([b"caf\xe9", b"b"])


def test_the_request_is_matched_without_taking_synthetic_or_download_for_paths(synthetic_data, tmp_path,
                                                                               monkeypatch):
    """A directory named like a source word in the working directory made a second prep fail ("no file 'train'")."""
    import json

    from data_prep.__main__ import up_to_date
    monkeypatch.chdir(tmp_path)
    (tmp_path / "synthetic").mkdir()
    (tmp_path / "download").write_text("")
    request = json.loads((synthetic_data / "manifest.json").read_text())["request"]
    assert up_to_date(synthetic_data, request)


def test_a_refused_prep_leaves_the_running_ones_directory_and_lock_alone(tmp_path, monkeypatch):
    """Two preps into a new --out: both saw it missing, one took the lock. The other's refusal used to remove the
    directory and unlink the winner's lock as if it had created them."""
    import fcntl

    import data_prep.__main__ as prep_main
    out = tmp_path / "new" / "out"
    out.mkdir(parents=True)
    with open(out / prep_main.LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the winner
        monkeypatch.setattr(prep_main, "missing_dirs", lambda path: [out, out.parent])  # what the loser saw
        with pytest.raises(cifar.DataError, match="another data prep is writing"), prep_main.only_writer(out):
            pass
        assert (out / prep_main.LOCK).is_file()


def test_a_filesystem_without_locks_is_named_not_taken_for_a_prep_in_progress(tmp_path, monkeypatch):
    import errno
    import fcntl

    import data_prep.__main__ as prep_main

    def no_locks(*_):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_locks)  # NFS without its lock service answers so
    with pytest.raises(cifar.DataError) as e, prep_main.only_writer(tmp_path / "out"):
        pass
    assert str(e.value) == (f"cannot lock {tmp_path}/out/.prep.lock (No locks available): its filesystem does not "
                            "support file locks (flock); choose an --out on one that does")
    assert not (tmp_path / "out").exists()

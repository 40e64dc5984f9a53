"""The synthetic CIFAR-100: deterministic, in the official format, each difficulty knob doing what it says, the easy
level being the original generator bit for bit, and the hard level much harder than easy for a raw-pixel classifier.
"""
import dataclasses
import json
import tarfile

import numpy as np
import pytest

from data_prep import cifar
from data_prep.__main__ import main as prep_main
from data_prep.cifar import Difficulty

HARD = Difficulty.at(cifar.DIFFICULTY_LEVELS["hard"])
COARSE_OF = np.array(cifar.FINE_TO_COARSE)
# Only the knob under test: no shift, no pixel noise, one pose, so every difference comes from the knob.
BARE = Difficulty(shift=0, noise=0)


def original_generator(n_train, n_test, seed=0, noise=48.0):
    """The generator as it was before difficulty levels (per-image loop), to compare the easy level against."""
    import torch
    import torch.nn.functional as F
    rng = np.random.default_rng(seed)

    def smooth(k):
        low = torch.from_numpy(rng.normal(0, 1, (k, 3, 8, 8)).astype(np.float32))
        return F.interpolate(low, size=32, mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    super_pat, fine_pat = smooth(20), smooth(100)
    protos = 128 + 40 * super_pat[COARSE_OF] + 40 * fine_pat

    def make(n):
        fine = rng.integers(0, 100, n)
        shift = rng.integers(-3, 4, (n, 2))
        imgs = np.empty((n, 32, 32, 3), np.float32)
        for i in range(n):
            imgs[i] = np.roll(protos[fine[i]], tuple(shift[i]), axis=(0, 1))
        imgs += rng.normal(0, noise, imgs.shape).astype(np.float32)
        return np.clip(imgs, 0, 255).round().astype(np.uint8), fine
    return make(n_train), make(n_test)


def test_easy_is_the_original_generator_bit_for_bit():
    easy = cifar.synthetic_splits(300, 100, seed=3, spec=Difficulty.at(cifar.DIFFICULTY_LEVELS["easy"]))
    for name, (images, fine) in zip(("train", "test"), original_generator(300, 100, seed=3), strict=True):
        assert np.array_equal(easy[name][0], images) and np.array_equal(easy[name][1], fine)


def test_same_seed_same_set_other_seed_other_set():
    a, b = (cifar.synthetic_splits(200, 50, seed=7, spec=HARD) for _ in range(2))
    c = cifar.synthetic_splits(200, 50, seed=8, spec=HARD)
    for name in ("train", "test"):
        assert all(np.array_equal(x, y) for x, y in zip(a[name], b[name], strict=True))
        assert not np.array_equal(a[name][0], c[name][0])


def test_hard_archive_is_in_the_official_layout_with_the_official_superclasses(tmp_path):
    archive = cifar.synthetic_archive(tmp_path / "a.tar.gz", 400, 100, seed=1, spec=HARD)
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["cifar-100-python/meta", "cifar-100-python/test", "cifar-100-python/train"]
    ds = cifar.read_archive(archive, allow_custom=True)   # the reader any archive goes through
    assert ds.train.images.shape == (400, 32, 32, 3) and ds.test.images.shape == (100, 32, 32, 3)
    assert (ds.fine_names, ds.coarse_names) == (cifar.FINE_NAMES, cifar.COARSE_NAMES)
    for split in (ds.train, ds.test):
        assert np.array_equal(split.coarse, COARSE_OF[split.fine])  # noisy labels stay consistent with the map
    splits = cifar.synthetic_splits(400, 100, seed=1, spec=HARD)
    assert np.array_equal(ds.train.images, splits["train"][0]) and np.array_equal(ds.train.fine, splits["train"][1])


def test_label_noise_moves_that_fraction_of_training_labels_within_their_superclass():
    s = cifar.synthetic_splits(2000, 500, seed=0, spec=dataclasses.replace(BARE, label_noise=0.3))
    _, noisy, clean = s["train"]
    moved = noisy != clean
    assert moved.mean() == pytest.approx(0.3, abs=0.001)
    assert np.array_equal(COARSE_OF[noisy], COARSE_OF[clean])          # another class of the same superclass
    assert len(np.unique(noisy[moved] - clean[moved])) > 5             # not one fixed offset
    _, test_labels, test_clean = s["test"]
    assert np.array_equal(test_labels, test_clean)                     # test labels are never noisy
    _, noisy, clean = cifar.synthetic_splits(1000, 0, seed=0, spec=HARD)["train"]
    assert (noisy != clean).mean() == pytest.approx(HARD.label_noise, abs=0.001) and HARD.label_noise > 0


def distinct_images_per_class(spec, n=1500):
    images, _, fine = cifar.synthetic_splits(n, 0, seed=0, spec=spec)["train"]
    return [len(np.unique(images[fine == f].reshape(-1, 3072), axis=0)) for f in range(100) if (fine == f).sum() > 12]


def test_poses_are_distinct_prototypes_per_class():
    assert set(distinct_images_per_class(BARE)) == {1}
    four = distinct_images_per_class(dataclasses.replace(BARE, poses=4, pose_signal=40))
    assert max(four) == 4 and np.mean(four) > 3.5      # a class with few images may not show all four


def test_rotation_and_zoom_make_every_image_of_a_class_different():
    for knob in ({"rotate": 30}, {"zoom": 0.3}):
        counts = distinct_images_per_class(dataclasses.replace(BARE, **knob), n=600)
        assert min(counts) > 0.9 * 600 / 100, knob


def class_pixel_spread(spec, n=1500):
    """Per-pixel standard deviation within each class, averaged over classes: 32×32."""
    images, _, fine = cifar.synthetic_splits(n, 0, seed=0, spec=spec)["train"]
    images = images.astype(np.float32).mean(-1)
    return np.mean([images[fine == f].std(0) for f in range(100) if (fine == f).sum() > 5], axis=0)


def test_silhouette_puts_the_object_on_a_background_and_a_distractor_behind_it():
    assert class_pixel_spread(dataclasses.replace(BARE, clutter=30)).max() < 0.01     # no silhouette: no background
    spread = class_pixel_spread(dataclasses.replace(BARE, silhouette=1, clutter=30))
    assert spread[0, 0] > 5 and spread[14:18, 14:18].mean() < 1                       # the background varies
    alone, behind = (cifar.synthetic_splits(600, 0, seed=0, spec=dataclasses.replace(BARE, silhouette=1, distractor=p))
                     ["train"][0].astype(np.int16) for p in (0, 0.5))
    changed = (abs(alone - behind) > 8).any(-1)
    assert 0.4 < changed.reshape(600, -1).any(1).mean() < 0.55                        # about half the images
    assert changed[:, 14:18, 14:18].mean() < changed[:, 6:10, 8:24].mean() / 4        # behind the object


def test_occlusion_colour_jitter_and_noise():
    clean = cifar.synthetic_splits(600, 0, seed=0, spec=BARE)["train"][0].astype(np.float32)
    occluded = cifar.synthetic_splits(600, 0, seed=0, spec=dataclasses.replace(BARE, occlude=0.5))["train"][0]
    hidden = (occluded != clean).any(-1).reshape(600, -1)
    assert 0.35 < hidden.any(1).mean() < 0.55 and hidden.sum(1).max() <= 14 * 14   # some images, one square each
    jittered = cifar.synthetic_splits(600, 0, seed=0, spec=dataclasses.replace(BARE, jitter=0.4))["train"][0]
    change = (jittered.astype(np.float32) - clean).mean((1, 2))                   # per image and channel
    assert change.std(0).min() > 10
    noisy = cifar.synthetic_splits(600, 0, seed=0, spec=dataclasses.replace(BARE, noise=20))["train"][0]
    assert (noisy - clean).std() == pytest.approx(20, rel=0.05)


def nearest_class_mean(spec, n_train=3000, n_test=1000):
    """Test accuracy (fine, superclass) of the nearest class mean on raw pixels, learned from the training labels."""
    s = cifar.synthetic_splits(n_train, n_test, seed=0, spec=spec)
    (x, y, _), (xt, yt, _) = s["train"], s["test"]
    x, xt = x.reshape(len(x), -1).astype(np.float32), xt.reshape(len(xt), -1).astype(np.float32)
    means = np.stack([x[y == c].mean(0) for c in range(100)])
    d = (xt ** 2).sum(1)[:, None] - 2 * xt @ means.T + (means ** 2).sum(1)[None]
    pred = d.argmin(1)
    return (pred == yt).mean(), (COARSE_OF[pred] == COARSE_OF[yt]).mean()


def test_hard_is_much_harder_than_easy_for_a_raw_pixel_classifier():
    easy, _ = nearest_class_mean(Difficulty.at(cifar.DIFFICULTY_LEVELS["easy"]))
    medium, _ = nearest_class_mean(Difficulty.at(cifar.DIFFICULTY_LEVELS["medium"]))
    hard, hard_super = nearest_class_mean(HARD)
    assert easy > 0.9 and hard < 0.35 and easy > medium > hard
    assert hard_super > 2 * hard  # the superclasses share structure: mistakes stay in the superclass


def test_the_manifest_request_records_the_difficulty_and_another_one_is_prepared_anew(tmp_path, capsys,
                                                                                       keep_sigterm):
    out = tmp_path / "d"
    args = ["--source", "synthetic", "--out", str(out), "--synthetic-train", "40", "--synthetic-test", "10"]
    assert prep_main([*args, "--synthetic-difficulty", "easy"]) == 0
    request = json.loads((out / "manifest.json").read_text())["request"]
    assert (request["difficulty"], request["noise"], request["label_noise"]) == (0.0, 48.0, 0.0)
    assert prep_main([*args, "--synthetic-difficulty", "0"]) == 0             # the same level by number
    assert "nothing to do" in capsys.readouterr().out
    assert prep_main([*args, "--synthetic-difficulty", "hard"]) == 0
    assert "nothing to do" not in capsys.readouterr().out
    request = json.loads((out / "manifest.json").read_text())["request"]
    assert (request["difficulty"], request["label_noise"]) == (HARD.level, HARD.label_noise)
    assert prep_main([*args, "--synthetic-difficulty", "hard", "--synthetic-label-noise", "0"]) == 0  # one knob
    assert "nothing to do" not in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["request"]["label_noise"] == 0


@pytest.mark.parametrize("flag, value, message", [
    ("--synthetic-difficulty", "extreme", "--synthetic-difficulty is easy, medium, hard or a number from 0 to 2, "
                                          "got extreme"),
    ("--synthetic-difficulty", "2.5", "--synthetic-difficulty is easy, medium, hard or a number from 0 to 2, got 2.5"),
    ("--synthetic-label-noise", "1.5", "--synthetic-label-noise is a fraction of the training labels, from 0 to 1, "
                                       "got 1.5"),
])
def test_a_bad_difficulty_is_one_error_line(tmp_path, capsys, keep_sigterm, flag, value, message):
    assert prep_main(["--source", "synthetic", "--out", str(tmp_path / "d"), flag, value]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {message}"]
    assert not (tmp_path / "d").exists()

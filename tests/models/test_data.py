"""Degradations (determinism, documented ranges), image files, datasets and the sample set."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moe_restore.data import (FixedDegradedDataset, PairedFolderDataset, PairedPatchDataset, SyntheticDataset,
                              builtin_images, degrade, parse_task, read_image, write_image)
from moe_restore.data import degradations as D
from moe_restore.data.sources import evaluation_set, training_set

TASKS = ("noise", "rain", "haze", "blur", "lowlight", "haze+rain", "lowlight+haze+rain")


def _image(h: int = 37, w: int = 53, seed: int = 0) -> torch.Tensor:
    """A smooth colourful test image in [0.1, 0.9] (odd size)."""
    y = torch.linspace(0, 1, h)[:, None]
    x = torch.linspace(0, 1, w)[None, :]
    g = torch.Generator().manual_seed(seed)
    phase = torch.rand(3, generator=g) * 6
    return torch.stack([0.5 + 0.4 * torch.sin(3 * x + 2 * y + p) for p in phase])


@pytest.mark.parametrize("task", TASKS)
def test_degradation_is_deterministic_per_seed_and_in_range(task):
    clean = _image()
    a = degrade(task, clean, seed=3, strength=0.6)
    b = degrade(task, clean, seed=3, strength=0.6)
    c = degrade(task, clean, seed=4, strength=0.6)
    assert a.shape == clean.shape and a.dtype == clean.dtype
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert (a - clean).abs().mean() > 1e-3, "the degradation changed nothing"
    if task != "haze":  # haze at fixed strength varies only through its airlight and depth field
        assert not torch.equal(a, c)
    assert torch.equal(clean, _image()), "the clean image was modified in place"


@pytest.mark.parametrize("sigma", [15, 25, 50])
def test_noise_has_the_benchmark_sigma(sigma):
    clean = torch.full((3, 128, 128), 0.5)
    noisy = D.noise(clean, seed=1, strength=D.NOISE_STRENGTH[sigma])
    std = float((noisy - clean).std()) * 255
    # 49152 samples: the sample std is within ~1% of sigma; at 0.5 +- 3 sigma clipping is rare.
    assert abs(std - sigma) < 0.03 * sigma, std


def test_haze_follows_the_scattering_model():
    clean = _image(40, 30)
    for strength in (0.0, 0.5, 1.0):
        hazy = D.haze(clean, seed=5, strength=strength)
        depth = D.haze_depth(40, 30, 6)
        t = torch.exp(-(0.4 + 1.6 * strength) * depth)
        # I = J t + A (1 - t): solve for A pixel-wise where 1 - t is not tiny; one airlight.
        airlight = (hazy - clean * t) / (1 - t)
        mask = (1 - t) > 0.2
        values = airlight[:, mask]
        assert values.std() < 1e-5 and 0.75 <= float(values.mean()) <= 0.95
    assert 0 <= float(depth.min()) and float(depth.max()) <= 1


def test_blur_kernels_are_normalised_and_sized():
    for strength in (0.0, 1.0):
        k = D.motion_kernel(seed=2, strength=strength)
        assert k.shape[0] == k.shape[1] and 9 <= k.shape[0] <= 23 and k.shape[0] % 2 == 1
        assert abs(float(k.sum()) - 1) < 1e-5 and float(k.min()) >= 0
        g = D.gaussian_kernel(strength)
        sigma = 0.8 + 2.2 * strength
        assert abs(float(g.sum()) - 1) < 1e-5 and g.shape[0] == 2 * math.ceil(3 * sigma) + 1
    # a constant image stays constant under any normalised kernel
    flat = torch.full((3, 33, 31), 0.3)
    assert torch.allclose(D.blur(flat, seed=7, strength=0.9), flat, atol=1e-6)


def test_lowlight_darkens_by_the_documented_curve():
    clean = _image(64, 64)
    for strength in (0.0, 1.0):
        dark = D.lowlight(clean, seed=1, strength=strength)
        expected = (0.7 - 0.4 * strength) * clean ** (1.5 + 1.5 * strength)
        # Poisson-Gaussian noise is zero-mean: the image mean follows the curve within noise.
        assert abs(float(dark.mean() - expected.mean())) < 0.01
        assert float(dark.mean()) < float(clean.mean())


def test_rain_only_brightens():
    clean = _image(50, 40)
    rainy = D.rain(clean, seed=3, strength=1.0)
    assert (rainy >= clean - 1e-6).all()
    streak_fraction = float(((rainy - clean).amax(0) > 0.05).float().mean())
    assert 0.01 < streak_fraction < 0.6


def test_composites_apply_in_physical_order_and_names_are_checked():
    assert parse_task("rain+lowlight+haze") == ("haze", "rain", "lowlight")
    with pytest.raises(ValueError, match="task"):
        parse_task("snow")
    with pytest.raises(ValueError, match="task"):
        parse_task("rain+rain")
    with pytest.raises(ValueError, match="strength"):
        D.noise(_image(), 0, 1.5)
    with pytest.raises(ValueError, match="clean"):
        D.noise(torch.rand(1, 8, 8), 0, 0.5)


def test_read_image_conversions(tmp_path):
    import imageio.v3 as iio

    rgb = (np.arange(20 * 30 * 3) % 256).astype(np.uint8).reshape(20, 30, 3)
    iio.imwrite(tmp_path / "rgb.png", rgb)
    assert torch.equal(read_image(tmp_path / "rgb.png"), torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    gray16 = (np.arange(20 * 30) * 97 % 65536).astype(np.uint16).reshape(20, 30)
    iio.imwrite(tmp_path / "gray16.png", gray16)
    image = read_image(tmp_path / "gray16.png")
    assert image.shape == (3, 20, 30)
    assert torch.equal(image[0], image[2]) and torch.allclose(image[1], torch.from_numpy(gray16).float() / 65535)
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 7, np.uint8)], axis=2)
    iio.imwrite(tmp_path / "rgba.png", rgba)
    assert torch.equal(read_image(tmp_path / "rgba.png"), read_image(tmp_path / "rgb.png"))
    iio.imwrite(tmp_path / "tiny.png", rgb[:4, :4])
    with pytest.raises(ValueError, match="smaller than"):
        read_image(tmp_path / "tiny.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        read_image(tmp_path / "broken.png")


def test_write_image_round_trip(tmp_path):
    image = torch.rand(3, 17, 23)
    write_image(tmp_path / "a.png", image)
    assert torch.allclose(read_image(tmp_path / "a.png"), image, atol=0.5 / 255 + 1e-6)
    write_image(tmp_path / "a.jpg", image)
    assert read_image(tmp_path / "a.jpg").shape == image.shape
    with pytest.raises(ValueError, match="format"):
        write_image(tmp_path / "a.gif", image)


def test_synthetic_dataset_is_a_pure_function_of_the_index_and_task_balanced():
    images = [_image(40, 50, 0), _image(45, 33, 1)]
    ds = SyntheticDataset(images, ("noise", "haze", "lowlight+rain"), patch=24, length=30, seed=2)
    again = SyntheticDataset(images, ("noise", "haze", "lowlight+rain"), patch=24, length=30, seed=2)
    labels = []
    for i in (0, 1, 2, 7, 29):
        degraded, clean, label = ds[i]
        d2, c2, l2 = again[i]
        assert torch.equal(degraded, d2) and torch.equal(clean, c2) and label == l2 == i % 3
        assert degraded.shape == clean.shape == (3, 24, 24)
        labels.append(label)
    assert not torch.equal(ds[0][1], ds[3][1]), "different indices gave the same crop"
    # Shuffled channels: the same crop in a random channel order, itself a function of the index.
    shuffled = SyntheticDataset(images, ("noise", "haze", "lowlight+rain"), patch=24, length=30, seed=2,
                                shuffle_channels=True)
    orders = set()
    for i in range(30):
        clean, again_clean = ds[i][1], shuffled[i][1]
        order = next(o for o in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
                     if torch.equal(again_clean, clean[list(o)]))
        orders.add(order)
        assert torch.equal(shuffled[i][0], shuffled[i][0]) and shuffled[i][2] == i % 3
    assert len(orders) >= 4, orders
    with pytest.raises(ValueError, match="patch"):
        SyntheticDataset(images, ("noise",), patch=41, length=1)


def _write_pairs(folder, names, size=(20, 24), seed=0):
    g = torch.Generator().manual_seed(seed)
    for sub in ("input", "target"):
        for name in names:
            write_image(folder / sub / f"{name}.png", torch.rand(3, *size, generator=g))


def test_paired_folders_single_task_and_all_in_one(tmp_path):
    _write_pairs(tmp_path / "one", ["a", "b"])
    pairs = PairedFolderDataset(tmp_path / "one", tasks=["rain"])
    assert len(pairs) == 2 and pairs.tasks == ("rain",)
    degraded, target, label = pairs[1]
    assert torch.equal(target, read_image(tmp_path / "one" / "target" / "b.png")) and label == 0

    aio = tmp_path / "aio"
    _write_pairs(aio / "Test" / "Derain", ["r1", "r2"])
    _write_pairs(aio / "Test" / "Dehaze", ["h1"])
    for name in ("n1", "n2"):  # clean-only Denoise folder: noise is synthesized (sigma 25)
        write_image(aio / "Test" / "Denoise" / f"{name}.png", torch.full((3, 20, 24), 0.5))
    test = PairedFolderDataset(aio, split="Test")
    assert test.tasks == ("noise", "rain", "haze") and len(test) == 5
    noisy, clean, label = next(test[i] for i in range(len(test)) if test.entries[i][2] == "noise")
    assert label == 0 and 15 < float((noisy - clean).std()) * 255 < 35
    assert PairedFolderDataset(aio, split="Test", tasks=["haze"]).tasks == ("haze",)

    _write_pairs(aio / "Train" / "Dehaze", ["h1", "h2"], size=(32, 40))
    patches = PairedPatchDataset(PairedFolderDataset(aio, split="Train"), patch=16, length=4)
    assert patches[3][0].shape == (3, 16, 16)

    write_image(tmp_path / "bad" / "input" / "x.png", torch.rand(3, 10, 10))
    write_image(tmp_path / "bad" / "target" / "y.png", torch.rand(3, 10, 10))
    with pytest.raises(ValueError, match="unmatched"):
        PairedFolderDataset(tmp_path / "bad")
    with pytest.raises(ValueError, match="data folder"):
        PairedFolderDataset(tmp_path / "one" / "input")


def test_clean_folder_sources_hold_out_an_image(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"img{i}.png", torch.rand(3, 32, 32))
    train = training_set(str(tmp_path), ["noise"], patch=16, length=5, seed=0)
    test = evaluation_set(str(tmp_path), ["noise", "blur"])
    assert len(train.images) == 2 and isinstance(test, FixedDegradedDataset) and len(test) == 2
    assert torch.equal(test.images[0], read_image(tmp_path / "img2.png"))


def test_builtin_sample_set_is_fixed_and_held_out():
    train_names, train = builtin_images("train")
    test_names, test = builtin_images("test")
    assert set(train_names).isdisjoint(test_names) and len(test) >= 3 and len(train) >= 5
    # Held out by content too: no test image is a training image under another name.
    for image in test:
        assert not any(image.shape == other.shape and torch.equal(image, other) for other in train)
    for image in train + test:
        assert image.shape[0] == 3 and max(image.shape[1:]) <= 512 and min(image.shape[1:]) >= 256
        assert 0 <= float(image.min()) and float(image.max()) <= 1
    evaluation = FixedDegradedDataset(test, ("noise", "blur"), names=test_names)
    a, b = evaluation[1], evaluation[1]
    assert torch.equal(a[0], b[0]) and a[2] == 0 and evaluation.name(len(test)) == f"blur/{test_names[0]}"


@pytest.mark.parametrize("task", ["rain", "haze", "blur", "haze+rain"])
def test_degradations_treat_the_colour_channels_alike(task):
    """Grey airlight and streaks, one blur kernel: degrading a channel-permuted image gives the
    permuted degraded image (the premise of the built-in set's channel shuffling)."""
    clean, order = _image(), torch.tensor([2, 0, 1])
    assert torch.allclose(degrade(task, clean[order], 4, 0.7), degrade(task, clean, 4, 0.7)[order], atol=1e-6)


@pytest.mark.parametrize("task", ["noise", "lowlight"])
def test_random_degradations_keep_a_grey_image_grey_on_average(task):
    grey = _image(64, 64)[:1].expand(3, -1, -1).contiguous()
    means = degrade(task, grey, 5, 0.5).mean((1, 2))
    assert (means - means.mean()).abs().max() < 0.004, means


def test_builtin_training_pairs_teach_no_colour_cast():
    """The restorer that the built-in training pairs of a task favour, in its simplest form (the
    affine colour map J = M I + b fitted by least squares to every pixel of 200 patches), maps a
    grey input to grey. Without the channel shuffling these patches are warm (mean RGB 0.52 / 0.42 /
    0.39) and the fitted maps add a cast of up to 0.020 (haze), 0.030 (noise) and 0.058 (low
    light) to grey; with it, under 0.007."""
    for task in ("noise", "rain", "haze", "blur", "lowlight"):
        ds = training_set("builtin", [task], patch=32, length=200, seed=0)
        pairs = [ds[i] for i in range(len(ds))]
        degraded = torch.stack([d for d, _, _ in pairs]).double().transpose(0, 1).reshape(3, -1)
        clean = torch.stack([c for _, c, _ in pairs]).double().transpose(0, 1).reshape(3, -1)
        if task == "noise":
            means = clean.mean(1)
            assert (means - means.mean()).abs().max() < 0.02, f"training patches not grey on average: {means}"
        inputs = torch.cat([degraded, torch.ones_like(degraded[:1])]).T
        fit = torch.linalg.lstsq(inputs, clean.T).solution  # [4, 3]: M transposed, then b
        for level in (0.2, 0.5, 0.8):
            out = torch.tensor([level, level, level, 1.0], dtype=torch.float64) @ fit
            assert (out - out.mean()).abs().max() < 0.015, f"{task}: grey {level} -> {out.tolist()}"

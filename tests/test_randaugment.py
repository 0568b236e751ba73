"""Batched RandAugment (the FFCV path) against timm's own, and PIL-style resizing."""
from __future__ import annotations

import random

import numpy as np
import pytest
import timm.data.auto_augment as timm_aa
import torch
from PIL import Image
from scipy import stats

from data_pipelines.randaugment import FILL, OPS, BatchRandAugment, parse_randaugment
from data_pipelines.resize import BICUBIC, BILINEAR, resize_crop


def natural_image(height: int = 80, width: int = 96, seed: int = 0) -> np.ndarray:
    """Smooth colour structure plus grain: every op changes it visibly."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(8, 8, 3))
    base = ((base - base.min()) / np.ptp(base) * 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC), dtype=float)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("magnitude,sign", [(9, 1.0), (9, -1.0), (3, 1.0), (3, -1.0), (10, -1.0)])
def test_every_op_does_what_timms_does(name, magnitude, sign, monkeypatch):
    """Same image, magnitude and sign: our tensor op against timm's PIL op (timm negates the
    level of the signed ops at random; it is fixed here, to each branch)."""
    monkeypatch.setattr(timm_aa, "_randomly_negate", lambda v: v if sign > 0 else -v)
    img = natural_image()
    hparams = dict(timm_aa._HPARAMS_DEFAULT, img_mean=FILL, interpolation=Image.BICUBIC)
    reference = np.asarray(timm_aa.AugmentOp(name, prob=1.0, magnitude=magnitude,
                                             hparams=hparams)(Image.fromarray(img)), dtype=float)
    ours = BatchRandAugment(f"rand-m{magnitude}", "bicubic").apply(
        name, torch.from_numpy(img).permute(2, 0, 1)[None].float(),
        torch.tensor([float(magnitude)]), torch.tensor([sign]))[0].permute(1, 2, 0).numpy()
    change = np.abs(reference - img).mean()  # what the op does to the image
    error = np.abs(ours - reference).mean()
    if magnitude == 9:  # (at 10 Solarize's threshold is 256: timm's own no-op)
        assert change > 1.0  # the op does something, so the comparison has teeth
    assert error <= 1.5 and error <= max(0.2 * change, 0.5), (error, change)


def _timm_draws(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Applied flags and magnitudes of timm's AugmentOp for rand-m9-mstd0.5."""
    random.seed(seed)
    seen = []
    op = timm_aa.AugmentOp("Brightness", prob=0.5, magnitude=9,
                           hparams=dict(timm_aa._HPARAMS_DEFAULT, magnitude_std=0.5))
    op.level_fn = lambda magnitude, hparams: (seen.append(magnitude), (1.0,))[1]
    applied = []
    for _ in range(n):
        before = len(seen)
        op(Image.new("RGB", (2, 2)))
        applied.append(len(seen) > before)
    return np.array(applied), np.array(seen)


def test_the_draws_follow_timms_distribution():
    ra = BatchRandAugment("rand-m9-mstd0.5")
    plan = ra.plan(20000, torch.Generator().manual_seed(0))
    assert plan.ops.shape == (2, 20000)  # two layers per image
    counts = torch.bincount(plan.ops.flatten(), minlength=len(OPS)).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3  # ops uniform over timm's 15
    assert stats.binomtest(int(plan.applied.sum()), plan.applied.numel(), 0.5).pvalue > 1e-3
    timm_applied, timm_mags = _timm_draws(20000, seed=0)
    assert stats.binomtest(int(timm_applied.sum()), len(timm_applied), 0.5).pvalue > 1e-3
    ours = plan.magnitudes[plan.applied].numpy()
    assert stats.ks_2samp(ours, timm_mags).pvalue > 1e-3  # N(9, 0.5) clipped to [0, 10]
    assert abs(ours.std() - timm_mags.std()) < 0.03 and ours.max() <= 10.0
    assert stats.binomtest(int((plan.signs < 0).sum()), plan.signs.numel(), 0.5).pvalue > 1e-3


def test_every_op_family_is_used_and_images_differ_in_a_batch():
    images = torch.from_numpy(natural_image(32, 32)).permute(2, 0, 1)[None].repeat(64, 1, 1, 1)
    ra = BatchRandAugment("rand-m9-mstd0.5")
    plan = ra.plan(64, torch.Generator().manual_seed(3))
    assert len(set(plan.ops[0].tolist())) > 1  # two images of one batch draw different ops
    big = ra.plan(4000, torch.Generator().manual_seed(3))
    assert set((big.ops[big.applied]).tolist()) == set(range(len(OPS)))
    out = ra(images, torch.Generator().manual_seed(3))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    changed = (out != images).flatten(1).any(dim=1)
    untouched = ~plan.applied.any(dim=0)
    assert changed.sum() > 20 and not changed[untouched].any()  # only where an op applied
    assert len({tuple(x.flatten()[:64].tolist()) for x in out[changed]}) > 10


def test_a_seed_reproduces_the_augmentation():
    images = torch.from_numpy(natural_image(32, 32)).permute(2, 0, 1)[None].repeat(16, 1, 1, 1)
    ra = BatchRandAugment("rand-m9-mstd0.5", "bicubic")
    a = ra(images, torch.Generator().manual_seed(7))
    b = ra(images, torch.Generator().manual_seed(7))
    c = ra(images, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("config,message", [
    ("auto-m9", "starts with 'rand'"), ("rand-x9", "not supported"), ("rand-inc1", "not supported")])
def test_unsupported_strings_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        parse_randaugment(config)


def test_parse_matches_timm():
    spec = parse_randaugment("rand-m9-mstd0.5")
    assert (spec.magnitude, spec.num_layers, spec.prob, spec.magnitude_std) == (9, 2, 0.5, 0.5)
    assert parse_randaugment("rand-m7-n3-p0.8-mstd101").magnitude_std == float("inf")


@pytest.mark.parametrize("kernel,pil", [(BILINEAR, Image.BILINEAR), (BICUBIC, Image.BICUBIC)])
@pytest.mark.parametrize("box,size", [((20, 10, 400, 300), (224, 224)), ((0, 0, 500, 375), (80, 64)),
                                      ((60, 50, 100, 80), (128, 96))])
def test_resize_is_pils(kernel, pil, box, size):
    """Down- and upscaling a crop: within one grey level of PIL.Image.resize(box=...)."""
    img = natural_image(375, 500, seed=1)
    out = np.zeros((size[1], size[0], 3), np.uint8)
    resize_crop(img, box[1], box[3], box[0], box[2], out, kernel)
    reference = np.asarray(Image.fromarray(img).resize(size, pil, box=box))
    assert np.abs(out.astype(int) - reference.astype(int)).max() <= 1

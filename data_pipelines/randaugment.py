"""timm's RandAugment (``rand-m9-mstd0.5`` and friends) on batches of image tensors.

FFCV has no RandAugment, and timm's (``timm.data.rand_augment_transform``) works on one PIL
image at a time, inside the loader. This applies the same policy after the FFCV loader, on
the batch, on whatever device the batch is (the GPU in training):

- the op set is timm's ``_RAND_TRANSFORMS`` (15 ops: AutoContrast, Equalize, Invert, Rotate,
  Posterize, Solarize, SolarizeAdd, Color, Contrast, Brightness, Sharpness, ShearX, ShearY,
  TranslateXRel, TranslateYRel), drawn per image and per layer, with replacement;
- each of the ``n`` layers (default 2) is applied with probability ``p`` (default 0.5);
- the magnitude of an applied op is drawn per image: N(m, mstd) clipped to [0, mmax]
  (mmax 10), then mapped to the op's argument by timm's level functions, with a random sign
  for rotate, shear and translate;
- geometric ops fill with the ImageNet mean colour and interpolate as the recipe resizes
  (bilinear or bicubic), as timm's ``create_transform`` sets them.

Every op is vectorised over the images that drew it (``torch.nn.functional.grid_sample`` for the
geometric ones, blends and lookups for the rest; Equalize is torchvision's batched
``equalize``), so a batch costs a few tensor ops per op family rather than a Python loop over
images. The pixel arithmetic follows PIL's (what timm runs) up to rounding; the tests compare
every op with timm's on the same image. Randomness comes from a ``torch.Generator``: the same
seed gives the same augmentation.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
       "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
       "TranslateYRel")
LEVEL_DENOM = 10.0
FILL = tuple(min(255, round(255 * m)) for m in (0.485, 0.456, 0.406))  # timm's img_mean


@dataclass(frozen=True)
class RandAugmentSpec:
    """The settings of a timm RandAugment string."""

    magnitude: float = 10.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    magnitude_max: float = LEVEL_DENOM


def parse_randaugment(config: str) -> RandAugmentSpec:
    """Parse ``rand-m9-mstd0.5``-style strings as timm does (sections m, n, p, mstd, mmax)."""
    parts = config.split("-")
    if parts[0] != "rand":
        raise ValueError("a RandAugment string starts with 'rand', e.g. rand-m9-mstd0.5")
    values = {}
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)(\d.*)", part)
        if not match or match.group(1) not in ("m", "n", "p", "mstd", "mmax"):
            raise ValueError(f"section {part!r} is not supported: use m, n, p, mstd, mmax "
                             "(timm's default op set)")
        try:
            values[match.group(1)] = float(match.group(2))
        except ValueError:
            raise ValueError(f"section {part!r} has no number") from None
    spec = RandAugmentSpec(
        magnitude=values.get("m", LEVEL_DENOM), num_layers=int(values.get("n", 2)),
        prob=values.get("p", 0.5),
        magnitude_std=math.inf if values.get("mstd", 0.0) > 100 else values.get("mstd", 0.0),
        magnitude_max=values.get("mmax", LEVEL_DENOM))
    if not (0 <= spec.magnitude <= 30 and spec.num_layers >= 1 and 0 <= spec.prob <= 1):
        raise ValueError("need 0 <= m <= 30, n >= 1 and 0 <= p <= 1")
    return spec


@dataclass
class Plan:
    """What a batch draws: per layer and image, the op, whether it applies, its magnitude and
    sign (each ``[layers, batch]``)."""

    ops: torch.Tensor
    applied: torch.Tensor
    magnitudes: torch.Tensor
    signs: torch.Tensor


class BatchRandAugment:
    """Per-image RandAugment of a batch ``N x 3 x H x W`` of uint8 (or 0..255 float) images."""

    def __init__(self, config: str, interpolation: str = "bilinear", fill=FILL) -> None:
        self.spec = parse_randaugment(config)
        self.config = config
        self.mode = "bicubic" if interpolation == "bicubic" else "bilinear"
        self.fill = tuple(float(v) for v in fill)

    def plan(self, batch: int, generator: torch.Generator, device=None) -> Plan:
        """Draw the ops, application, magnitudes and signs of ``batch`` images."""
        s = self.spec
        shape = (s.num_layers, batch)
        kw = dict(generator=generator, device=device)
        ops = torch.randint(len(OPS), shape, **kw)
        applied = torch.rand(shape, **kw) < s.prob
        if s.magnitude_std == math.inf:
            mags = torch.rand(shape, **kw) * s.magnitude
        else:
            mags = s.magnitude + s.magnitude_std * torch.randn(shape, **kw)
        mags = mags.clamp(0.0, s.magnitude_max)
        signs = torch.where(torch.rand(shape, **kw) > 0.5, -1.0, 1.0)
        return Plan(ops, applied, mags, signs)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        dtype = images.dtype
        x = images.float()
        plan = self.plan(x.shape[0], generator, x.device)
        for layer in range(plan.ops.shape[0]):
            for k, name in enumerate(OPS):
                idx = torch.nonzero((plan.ops[layer] == k) & plan.applied[layer]).flatten()
                if idx.numel():
                    x[idx] = self.apply(name, x[idx], plan.magnitudes[layer, idx],
                                        plan.signs[layer, idx])
        return x.round().clamp(0, 255).to(dtype) if dtype == torch.uint8 else x

    # ------------------------------------------------------------------ the ops
    def apply(self, name: str, x: torch.Tensor, magnitude: torch.Tensor,
              sign: torch.Tensor) -> torch.Tensor:
        """Op ``name`` on float images in 0..255 with per-image magnitudes (timm's levels)."""
        level = (magnitude / LEVEL_DENOM).view(-1, 1, 1, 1)
        if name == "AutoContrast":
            lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
            scale = 255.0 / (hi - lo).clamp(min=1)
            return torch.where(hi > lo, torch.floor((x - lo) * scale).clamp(0, 255), x)
        if name == "Equalize":
            from torchvision.transforms.v2.functional import equalize

            return equalize(x.round().clamp(0, 255).to(torch.uint8)).float()
        if name == "Invert":
            return 255.0 - x
        if name == "Posterize":
            step = 2.0 ** (8 - torch.floor(level * 4))  # keep int(level * 4) high bits
            return torch.floor(x / step) * step
        if name == "Solarize":
            threshold = torch.floor(level * 256).clamp(max=256)
            return torch.where(x >= threshold, 255.0 - x, x)
        if name == "SolarizeAdd":
            add = torch.floor(level * 110).clamp(max=128)
            return torch.where(x < 128, (x + add).clamp(max=255), x)
        if name in ("Color", "Contrast", "Brightness", "Sharpness"):
            factor = level * 1.8 + 0.1
            return _blend(_degenerate(name, x), x, factor)
        return self._affine(name, x, (magnitude / LEVEL_DENOM) * sign)

    def _affine(self, name: str, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        one, zero = torch.ones_like(level), torch.zeros_like(level)
        cx, cy = w / 2.0, h / 2.0
        if name == "Rotate":  # PIL's rotate: counter-clockwise by degrees about the centre
            a = -torch.deg2rad(level * 30.0)
            cos, sin = torch.cos(a), torch.sin(a)
            rows = [cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy]
        elif name == "ShearX":
            rows = [one, level * 0.3, zero, zero, one, zero]
        elif name == "ShearY":
            rows = [one, zero, zero, level * 0.3, one, zero]
        elif name == "TranslateXRel":
            rows = [one, zero, level * 0.45 * w, zero, one, zero]
        elif name == "TranslateYRel":
            rows = [one, zero, zero, zero, one, level * 0.45 * h]
        else:
            raise ValueError(f"unknown RandAugment op {name!r}")
        # PIL's affine maps each output pixel centre to the input point it samples
        matrix = torch.stack(rows, dim=1).view(n, 2, 3)
        ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype) + 0.5,
                                torch.arange(w, device=x.device, dtype=x.dtype) + 0.5,
                                indexing="ij")
        centres = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).view(1, h * w, 3)
        source = centres @ matrix.transpose(1, 2)  # n x hw x 2, input pixels
        grid = torch.stack([source[..., 0] * (2.0 / w) - 1, source[..., 1] * (2.0 / h) - 1],
                           dim=-1).view(n, h, w, 2)
        inside = torch.ones_like(x[:, :1])
        out = F.grid_sample(torch.cat([x, inside], dim=1), grid, mode=self.mode,
                            padding_mode="zeros", align_corners=False)
        image, coverage = out[:, :3], out[:, 3:].clamp(0, 1)
        fill = torch.tensor(self.fill, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (image + (1 - coverage) * fill).round().clamp(0, 255)


def _luma(x: torch.Tensor) -> torch.Tensor:
    # PIL's RGB -> L (ITU-R 601-2), rounded as PIL's fixed-point conversion does
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.floor((r * 299 + g * 587 + b * 114) / 1000 + 0.5)


def _degenerate(name: str, x: torch.Tensor) -> torch.Tensor:
    """The image PIL's ImageEnhance blends towards (factor 0)."""
    if name == "Color":
        return _luma(x).expand_as(x)
    if name == "Contrast":
        return torch.floor(_luma(x).mean((1, 2, 3), keepdim=True) + 0.5).expand_as(x)
    if name == "Brightness":
        return torch.zeros_like(x)
    # PIL's SMOOTH kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 = (3x3 sum + 4 x centre) / 13
    window = F.avg_pool2d(x, 3, stride=1) * 9
    out = x.clone()  # the filter keeps the border pixels
    out[:, :, 1:-1, 1:-1] = torch.round((window + 4 * x[:, :, 1:-1, 1:-1]) / 13)
    return out


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (degenerate + factor * (x - degenerate)).round().clamp(0, 255)

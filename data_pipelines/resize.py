"""PIL's resampling (bilinear or bicubic, antialiased) of an image crop, for FFCV's decoders.

FFCV resizes with OpenCV's INTER_AREA, hard-wired in its C extension; timm and the torchvision
path resize with PIL's filters. ``resize_crop`` does what ``PIL.Image.resize(..., box=crop)``
does - a separable convolution whose support widens with the downscale factor (PIL's
antialiasing) - in plain Python that FFCV's pipeline compiler (numba) turns into machine code,
so both loaders resize alike. Weights follow PIL's ``precompute_coeffs``; sums are float32 and
rounded to uint8 (PIL uses fixed point: results differ by at most one grey level). Jitted with
numba at first use (FFCV's own dependency; only the FFCV path imports this module).
"""
from __future__ import annotations

import numpy as np
from numba import njit

BILINEAR, BICUBIC = 0, 1  # the ``kernel`` argument
INTERPOLATIONS = {"bilinear": BILINEAR, "bicubic": BICUBIC}


@njit(nogil=True, cache=True)
def _filter(x: float, kernel: int) -> float:
    x = abs(x)
    if kernel == BILINEAR:
        return 1.0 - x if x < 1.0 else 0.0
    a = -0.5  # PIL's bicubic
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@njit(nogil=True, cache=True)
def _coefficients(start: float, length: float, in_size: int, out_size: int, kernel: int):
    """For each output pixel: the first input pixel, the tap count and the tap weights."""
    support = 1.0 if kernel == BILINEAR else 2.0
    scale = length / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    taps = int(np.ceil(support)) * 2 + 1
    first = np.zeros(out_size, np.int64)
    count = np.zeros(out_size, np.int64)
    weights = np.zeros((out_size, taps), np.float32)
    for xx in range(out_size):
        center = start + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        total = 0.0
        for t in range(xmax):
            w = _filter((t + xmin - center + 0.5) / filterscale, kernel)
            weights[xx, t] = w
            total += w
        if total != 0.0:
            for t in range(xmax):
                weights[xx, t] /= total
        first[xx], count[xx] = xmin, xmax
    return first, count, weights


@njit(nogil=True, cache=True, fastmath=True)
def resize_crop(source: np.ndarray, row0: int, row1: int, col0: int, col1: int,
                destination: np.ndarray, kernel: int) -> None:
    """Resample ``source[row0:row1, col0:col1]`` (H x W x 3 uint8) into ``destination``."""
    out_h, out_w = destination.shape[0], destination.shape[1]
    xf, xc, xw = _coefficients(float(col0), float(col1 - col0), source.shape[1], out_w, kernel)
    yf, yc, yw = _coefficients(float(row0), float(row1 - row0), source.shape[0], out_h, kernel)
    # the source rows and columns the taps read
    r_lo, c_lo = yf.min(), xf.min()
    rows, cols = (yf + yc).max() - r_lo, (xf + xc).max() - c_lo
    # Both passes are written as "row += weight * row" over contiguous float32 rows, the form
    # the compiler vectorises; the horizontal pass (first, as in PIL) therefore runs on the
    # transposed crop, and its result is transposed back for the vertical pass.
    columns = np.empty((cols, rows * 3), np.float32)
    for r in range(rows):
        for c in range(cols):
            for k in range(3):
                columns[c, r * 3 + k] = source[r_lo + r, c_lo + c, k]
    across = np.zeros((out_w, rows * 3), np.float32)
    for xx in range(out_w):
        out_row = across[xx]
        for t in range(xc[xx]):
            weight = xw[xx, t]
            in_row = columns[xf[xx] + t - c_lo]
            for k in range(rows * 3):
                out_row[k] += weight * in_row[k]
    resized_rows = np.empty((rows, out_w * 3), np.float32)
    for xx in range(out_w):
        for r in range(rows):
            for k in range(3):
                resized_rows[r, xx * 3 + k] = across[xx, r * 3 + k]
    acc = np.empty(out_w * 3, np.float32)
    for yy in range(out_h):
        acc[:] = 0.0
        for t in range(yc[yy]):
            weight = yw[yy, t]
            in_row = resized_rows[yf[yy] + t - r_lo]
            for k in range(out_w * 3):
                acc[k] += weight * in_row[k]
        for xx in range(out_w):
            for k in range(3):
                v = np.floor(acc[xx * 3 + k] + 0.5)
                destination[yy, xx, k] = min(max(v, 0.0), 255.0)


@njit(nogil=True, cache=True)
def place_crop(pixels: np.ndarray, height: int, width: int, row: int, col: int, h: int, w: int,
               destination: np.ndarray, kernel: int, flip_prob: float) -> None:
    """Resample the crop (``row``, ``col``, ``h``, ``w``) of the decoded ``pixels`` (flat, at
    least height x width x 3) into ``destination`` and flip it with ``flip_prob``. Compiled
    once into numba's on-disk cache: FFCV's pipeline compiler recompiles its decoder closure
    in every process, so what can live outside the closure lives here."""
    image = pixels[: 3 * height * width].reshape(height, width, 3)
    resize_crop(image, row, row + h, col, col + w, destination, kernel)
    if np.random.rand() < flip_prob:
        destination[:] = destination[:, ::-1].copy()

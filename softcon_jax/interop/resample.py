"""Position-embedding resampling that reproduces torch's `F.interpolate` (bicubic) in NumPy.

timm loads DINOv2 weights at another grid with `resample_abs_pos_embed(..., 'bicubic',
antialias=True)` (its `checkpoint_filter_fn` default). Both torch kernels are separable, so
each axis is a (out, in) weight matrix:
- antialias=False: Keys cubic with A=-0.75, source x = (i + 0.5) * in/out - 0.5, taps clamped
  to the border (`upsample_bicubic2d`, align_corners=False);
- antialias=True: PIL-style cubic with A=-0.5, support widened by in/out when shrinking,
  taps inside the image only, weights normalised (`_upsample_bicubic2d_aa`).
Computed in float64; agrees with torch's float32 kernel to ~1e-6 (relative).
"""

from __future__ import annotations

import math

import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    return np.where(x <= 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                    np.where(x < 2.0, ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a, 0.0))


def bicubic_matrix(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
    """(out_size, in_size) float64 weights of torch bicubic resizing along one axis."""
    # torch computes the scale in float32; matching it brings the two closer.
    scale = float(np.float32(in_size) / np.float32(out_size))
    w = np.zeros((out_size, in_size), np.float64)
    if antialias:
        support = 2.0 * scale if scale >= 1.0 else 2.0
        invscale = 1.0 / scale if scale >= 1.0 else 1.0
        for i in range(out_size):
            center = scale * (i + 0.5)
            xmin = max(int(center - support + 0.5), 0)
            xmax = min(int(center + support + 0.5), in_size)
            j = np.arange(xmin, xmax)
            k = _cubic((j - center + 0.5) * invscale, -0.5)
            total = k.sum()
            w[i, xmin:xmax] = k / total if total != 0.0 else k
        return w
    for i in range(out_size):
        src = scale * (i + 0.5) - 0.5
        x0 = math.floor(src)
        t = src - x0
        for tap, dist in zip(range(x0 - 1, x0 + 3), (t + 1.0, t, 1.0 - t, 2.0 - t)):
            w[i, min(max(tap, 0), in_size - 1)] += _cubic(np.array(dist), -0.75)
    return w


def resample_grid(grid: np.ndarray, new_hw: tuple[int, int], antialias: bool = True) -> np.ndarray:
    """Resizes a (H, W, D) grid to new_hw with torch-exact bicubic weights."""
    h, w, _ = grid.shape
    wh = bicubic_matrix(h, new_hw[0], antialias)
    ww = bicubic_matrix(w, new_hw[1], antialias)
    return np.einsum("ih,hwd,jw->ijd", wh, grid.astype(np.float64), ww)


def resample_pos_embed(pos_embed: np.ndarray, new_grid: tuple[int, int], *,
                       num_prefix_tokens: int = 1, antialias: bool = True) -> np.ndarray:
    """timm `resample_abs_pos_embed` for a square source grid: (1, P + h*w, D) -> new grid.

    The prefix (CLS) tokens are kept as they are; the patch part is resized bicubically.
    Returns float32.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, tokens, dim), got {pos_embed.shape}.")
    n = pos_embed.shape[1] - num_prefix_tokens
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"pos_embed has {n} patch tokens, not a square grid; cannot resample.")
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[0, num_prefix_tokens:]
    if (side, side) == tuple(new_grid):
        return pos_embed.astype(np.float32)
    grid = resample_grid(patches.reshape(side, side, -1), tuple(new_grid), antialias)
    out = grid.reshape(1, -1, pos_embed.shape[-1])
    return np.concatenate([prefix.astype(np.float64), out], axis=1).astype(np.float32)

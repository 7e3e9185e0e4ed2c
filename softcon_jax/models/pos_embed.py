"""Position-embedding resampling that reproduces torch's `F.interpolate` (bicubic) in NumPy.

timm loads DINOv2 weights at another grid with `resample_abs_pos_embed(..., 'bicubic',
antialias=True)` (its `checkpoint_filter_fn` default). Both torch kernels are separable, so
each axis is a (out, in) weight matrix:
- antialias=False: Keys cubic with A=-0.75, source x = (i + 0.5) * in/out - 0.5, taps clamped
  to the border (`upsample_bicubic2d`, align_corners=False);
- antialias=True: PIL-style cubic with A=-0.5, support widened by in/out when shrinking,
  taps inside the image only, weights normalised (`_upsample_bicubic2d_aa`).
Computed in float64; agrees with torch's float32 kernel to ~1e-6 (relative).

Two resamplings of a pretrained position embedding exist, and they differ:
- timm (`resample_pos_embed`): `F.interpolate(size=new_grid, mode='bicubic',
  antialias=True)`, the default of timm's `checkpoint_filter_fn` / `resample_abs_pos_embed`;
- DINOv2 (`dinov2_interpolate_pos_embed`): what facebookresearch/dinov2
  `dinov2/models/vision_transformer.py` `interpolate_pos_encoding` does at every forward
  pass with another input size: bicubic, antialias False, and `interpolate_offset = 0.1`,
  i.e. `F.interpolate(scale_factor=((w0 + 0.1) / M, (h0 + 0.1) / M))` for an M x M source
  grid, so the source coordinates are scaled by M / (w0 + 0.1), not M / w0.
For 37 x 37 (518 px) -> 16 x 16 (224 px) they differ by up to ~1.5 in the embedding.
"""

from __future__ import annotations

import math

import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    return np.where(x <= 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                    np.where(x < 2.0, ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a, 0.0))


def bicubic_matrix(in_size: int, out_size: int, antialias: bool,
                   scale_factor: float | None = None) -> np.ndarray:
    """(out_size, in_size) float64 weights of torch bicubic resizing along one axis.

    `scale_factor`: as `F.interpolate(scale_factor=...)`, whose kernel then maps
    coordinates with 1 / scale_factor instead of in_size / out_size.
    """
    # torch computes the scale in float32; matching it brings the two closer.
    if scale_factor is None:
        scale = float(np.float32(in_size) / np.float32(out_size))
    else:
        scale = float(np.float32(1.0 / scale_factor))
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


def resample_grid(grid: np.ndarray, new_hw: tuple[int, int], antialias: bool = True,
                  scale_factors: tuple[float, float] | None = None) -> np.ndarray:
    """Resizes a (H, W, D) grid to new_hw with torch-exact bicubic weights."""
    h, w, _ = grid.shape
    sh, sw = scale_factors if scale_factors is not None else (None, None)
    wh = bicubic_matrix(h, new_hw[0], antialias, sh)
    ww = bicubic_matrix(w, new_hw[1], antialias, sw)
    return np.einsum("ih,hwd,jw->ijd", wh, grid.astype(np.float64), ww)


def _square_side(pos_embed: np.ndarray, num_prefix_tokens: int) -> int:
    """Side of the square patch grid of a (1, P + side^2, D) position embedding."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, tokens, dim), got {pos_embed.shape}.")
    n = pos_embed.shape[1] - num_prefix_tokens
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"pos_embed has {n} patch tokens, not a square grid; cannot resample.")
    return side


def resample_pos_embed(pos_embed: np.ndarray, new_grid: tuple[int, int], *,
                       num_prefix_tokens: int = 1, antialias: bool = True) -> np.ndarray:
    """timm `resample_abs_pos_embed` for a square source grid: (1, P + h*w, D) -> new grid.

    The prefix (CLS) tokens are kept as they are; the patch part is resized bicubically.
    Returns float32.
    """
    side = _square_side(pos_embed, num_prefix_tokens)
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[0, num_prefix_tokens:]
    if (side, side) == tuple(new_grid):
        return pos_embed.astype(np.float32)
    grid = resample_grid(patches.reshape(side, side, -1), tuple(new_grid), antialias)
    out = grid.reshape(1, -1, pos_embed.shape[-1])
    return np.concatenate([prefix.astype(np.float64), out], axis=1).astype(np.float32)


DINOV2_INTERPOLATE_OFFSET = 0.1


def dinov2_interpolate_pos_embed(pos_embed: np.ndarray, new_grid: tuple[int, int], *,
                                 num_prefix_tokens: int = 1,
                                 interpolate_offset: float = DINOV2_INTERPOLATE_OFFSET
                                 ) -> np.ndarray:
    """DINOv2's `interpolate_pos_encoding` for a square source grid: (1, P + M*M, D) ->
    (1, P + h*w, D), bicubic without antialias, scale factors (h + offset) / M and
    (w + offset) / M (facebookresearch/dinov2 `vision_transformer.py`,
    `interpolate_offset=0.1`, `interpolate_antialias=False`). The prefix tokens are kept.
    With `interpolate_offset=0` it is an exact-size resize, as DINOv2 does then.
    Returns float32.
    """
    m = _square_side(pos_embed, num_prefix_tokens)
    new_grid = tuple(int(g) for g in new_grid)
    if new_grid == (m, m):
        return pos_embed.astype(np.float32)  # DINOv2 returns its embedding unchanged
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[0, num_prefix_tokens:]
    if interpolate_offset:
        factors = tuple(float(g + interpolate_offset) / m for g in new_grid)
        size = tuple(int(math.floor(m * f)) for f in factors)  # F.interpolate's output size
        if size != new_grid:
            raise ValueError(f"scale factors {factors} give a {size} grid, not {new_grid}.")
    else:
        factors = None
    grid = resample_grid(patches.reshape(m, m, -1), new_grid, False, factors)
    out = grid.reshape(1, -1, pos_embed.shape[-1])
    return np.concatenate([prefix.astype(np.float64), out], axis=1).astype(np.float32)

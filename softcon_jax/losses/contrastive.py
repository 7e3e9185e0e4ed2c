"""InfoNCE and SoftCon's soft contrastive loss, over the columns of the global batch.

Notation shared by every loss in this package: ``q`` (n, D) holds this device's rows and
``k`` (N, D) all columns, gathered from all devices; both are L2-normalised inside the loss.
Row ``i`` of ``q`` is sample ``row_offset + i`` of the global batch, and
``logits = q k^T / temperature``. A loss returns the mean over the rows of ``q``, so the mean
over devices is the global loss. Keys get no gradient (``stop_gradient``), as in the
reference implementations; queries get exact gradients.

``soft_contrastive`` is this project's reading of SoftCon (Wang, Albrecht and Zhu 2024,
"Multi-Label Guided Soft Contrastive Learning for Efficient Earth Observation Pretraining",
arXiv 2405.20462). The official SoftCon pretraining code is not public; the definitions below
are the ones this project implements, not a reproduction of unpublished code.

``row_offset`` may be a Python int (checked: the positive columns must exist) or a traced
integer such as ``jax.lax.axis_index(axis) * n`` inside ``jax.shard_map``; a traced offset
that points past the last column makes the loss NaN rather than silently wrong.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softcon_jax.losses.blockwise import (
    _as_float, check_num_chunks, l2_normalize, logsumexp_rows, sum_rows)
from softcon_jax.losses.registry import register

__all__ = ["infonce", "soft_contrastive", "positive_columns", "soft_target",
           "SOFT_VARIANTS"]

SOFT_VARIANTS = ("soft_ce", "bce", "mse")


# ------------------------------------------------------------------------------ helpers


def positive_columns(row_offset: Any, n: int, num_cols: int) -> tuple[jax.Array, jax.Array]:
    """Returns the positive column ``row_offset + i`` of each row, and whether it exists.

    A static ``row_offset`` is checked here (ValueError); a traced one cannot be, so the
    boolean mask lets the caller turn rows without a positive into NaN.
    """
    if isinstance(row_offset, (int, np.integer)) and not isinstance(row_offset, bool):
        if row_offset < 0 or row_offset + n > num_cols:
            raise ValueError(
                f"row_offset={row_offset} with {n} rows of q needs columns "
                f"{row_offset}..{row_offset + n - 1} of k, but k has {num_cols} columns")
    ids = jnp.asarray(row_offset, jnp.int32) + jnp.arange(n, dtype=jnp.int32)
    return ids, (ids >= 0) & (ids < num_cols)


def mean_rows(row_losses: jax.Array, has_positive: jax.Array) -> jax.Array:
    """Mean over rows; NaN if some row's positive column does not exist."""
    return jnp.mean(jnp.where(has_positive, row_losses, jnp.nan))


def check_temperature(temperature: Any) -> None:
    """Raises ValueError for a static temperature that is not positive."""
    if isinstance(temperature, (int, float, np.number)) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_matrix(name: str, x: jax.Array, shape: tuple) -> None:
    ok = x.ndim == len(shape) and all(s is None or s == d for s, d in zip(shape, x.shape))
    if not ok:
        want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")


def _queries_keys(q: Any, k: Any) -> tuple[jax.Array, jax.Array]:
    q, k = _as_float(q), _as_float(k)
    _check_matrix("q", q, (None, None))
    _check_matrix("k", k, (None, q.shape[1]))
    return l2_normalize(q), jax.lax.stop_gradient(l2_normalize(k))


def _unit_labels(labels: jax.Array) -> jax.Array:
    """Rows divided by their L2 norm; all-zero rows (no label) stay zero."""
    labels = jax.lax.stop_gradient(_as_float(labels))
    norm = jnp.sqrt(jnp.sum(labels * labels, axis=1, keepdims=True))
    return jnp.where(norm > 0, labels / jnp.where(norm > 0, norm, 1.0), 0.0)


def soft_target(row_ids: jax.Array, unit_labels_q: jax.Array, col_ids: jax.Array,
                unit_labels_k: jax.Array, soft_weight: jax.Array) -> jax.Array:
    """SoftCon's target block ``T = I + soft_weight * S * (1 - I)``, shape (rows, cols).

    ``S_ij`` is the cosine of the label vectors (0 when either is empty), computed from
    row-normalised labels; ``I_ij = [col_ids[j] == row_ids[i]]``.
    """
    similarity = unit_labels_q @ unit_labels_k.T
    return jnp.where(col_ids[None, :] == row_ids[:, None], 1.0, soft_weight * similarity)


def _soft_target_key(row_ids, unit_labels_q, unit_labels_k, k, soft_weight):
    """``sum_j P_ij k_j`` for ``P = T / rowsum(T)``, without building the (n, N) target.

    ``S = Lq Lk^T`` has rank C (the number of classes), so ``T k`` and the row sums of ``T``
    come from the (C, D) matrix ``Lk^T k`` and the (C,) label sum. Only used by the
    blockwise path; the direct path builds ``T`` literally, and tests check they agree.
    """
    k_pos = jnp.take(k, row_ids, axis=0, mode="clip")
    s_pos = jnp.sum(unit_labels_q * jnp.take(unit_labels_k, row_ids, axis=0, mode="clip"),
                    axis=1)
    row_sum = 1.0 + soft_weight * (unit_labels_q @ jnp.sum(unit_labels_k, axis=0) - s_pos)
    t_k = k_pos + soft_weight * (unit_labels_q @ (unit_labels_k.T @ k)
                                 - s_pos[:, None] * k_pos)
    return t_k / row_sum[:, None]


def _bce_values(x, row_data, col_data, params):
    """BCEWithLogits(x + bias, min(T, 1)) elementwise (x: logits block)."""
    row_ids, unit_q = row_data
    col_ids, unit_k = col_data
    soft_weight, bias = params
    y = jnp.minimum(soft_target(row_ids, unit_q, col_ids, unit_k, soft_weight), 1.0)
    z = x + bias
    return jax.nn.softplus(z) - z * y


def _mse_values(x, row_data, col_data, params):
    """(x - min(T, 1))^2 elementwise (x: cosine block, no temperature)."""
    row_ids, unit_q = row_data
    col_ids, unit_k = col_data
    soft_weight, _ = params
    y = jnp.minimum(soft_target(row_ids, unit_q, col_ids, unit_k, soft_weight), 1.0)
    return jnp.square(x - y)


# ------------------------------------------------------------------------------- losses


@register("infonce")
def infonce(q: jax.Array, k: jax.Array, *, temperature: float | jax.Array,
            row_offset: int | jax.Array = 0, num_chunks: int = 1) -> jax.Array:
    """InfoNCE: mean over rows of the cross-entropy of ``logits[i]`` with target column
    ``row_offset + i``.

    Args:
      q: (n, D) queries, this device's rows.
      k: (N, D) keys of the global batch (no gradient).
      temperature: tau in ``logits = q k^T / tau`` (MoCo-v3's extra factor ``2 tau`` is the
        trainer's business).
      row_offset: global index of row 0 of ``q`` (Python int or traced int).
      num_chunks: 1 builds the (n, N) logits; more evaluates blocks of
        ``ceil(N / num_chunks)`` columns (same value and gradient, less memory).

    Returns:
      Scalar float32 loss.
    """
    num_chunks = check_num_chunks(num_chunks)
    check_temperature(temperature)
    q, k = _queries_keys(q, k)
    ids, has_pos = positive_columns(row_offset, q.shape[0], k.shape[0])
    a = q / temperature
    if num_chunks == 1:
        logits = a @ k.T
        lse = jax.nn.logsumexp(logits, axis=1)
        pos = jnp.take_along_axis(logits, jnp.clip(ids, 0, k.shape[0] - 1)[:, None],
                                  axis=1)[:, 0]
    else:
        lse = logsumexp_rows(a, k, num_chunks=num_chunks)
        pos = jnp.sum(a * jnp.take(k, ids, axis=0, mode="clip"), axis=1)
    return mean_rows(lse - pos, has_pos)


@register("soft_contrastive")
def soft_contrastive(q: jax.Array, k: jax.Array, labels_q: jax.Array, labels_k: jax.Array,
                     *, temperature: float | jax.Array, soft_weight: float = 1.0,
                     variant: str = "soft_ce", bias: float = 0.0,
                     row_offset: int | jax.Array = 0, num_chunks: int = 1) -> jax.Array:
    """SoftCon's soft contrastive loss (this project's reading of arXiv 2405.20462).

    ``S_ij`` is the cosine of ``labels_q[i]`` and ``labels_k[j]`` (0 when either is all
    zeros), ``I_ij = [j == row_offset + i]`` and the target is
    ``T = I + soft_weight * S * (1 - I)``. Per row ``i``:

    * ``soft_ce``: ``-sum_j P_ij log softmax(logits_i)_j`` with ``P = T`` row-normalised.
      With ``soft_weight=0`` this is exactly :func:`infonce`.
    * ``bce``: ``sum_j BCEWithLogits(logits_ij + bias, min(T_ij, 1))``.
    * ``mse``: ``mean_j (q_i . k_j - min(T_ij, 1))^2`` on the normalised vectors (no
      temperature).

    Args:
      q: (n, D) queries; k: (N, D) keys (no gradient).
      labels_q: (n, C) multi-hot labels of the rows; labels_k: (N, C) of the columns.
      temperature: tau in ``logits = q k^T / tau``.
      soft_weight: weight of the label similarity off the diagonal (a constant: no
        gradient).
      variant: ``"soft_ce"``, ``"bce"`` or ``"mse"``.
      bias: added to the logits by ``bce`` (a constant: no gradient).
      row_offset: global index of row 0 of ``q`` (Python int or traced int).
      num_chunks: column blocks, as in :func:`infonce`.

    Returns:
      Scalar float32 loss: the mean over rows.
    """
    if variant not in SOFT_VARIANTS:
        raise ValueError(f"unknown soft_contrastive variant {variant!r} (config key "
                         f"loss.kwargs.variant); expected one of {', '.join(SOFT_VARIANTS)}")
    num_chunks = check_num_chunks(num_chunks)
    check_temperature(temperature)
    q, k = _queries_keys(q, k)
    n, num_cols = q.shape[0], k.shape[0]
    labels_q, labels_k = _as_float(labels_q), _as_float(labels_k)
    _check_matrix("labels_q", labels_q, (n, None))
    _check_matrix("labels_k", labels_k, (num_cols, labels_q.shape[1]))
    unit_q, unit_k = _unit_labels(labels_q), _unit_labels(labels_k)
    soft_weight = jax.lax.stop_gradient(jnp.asarray(soft_weight, jnp.float32))
    bias = jax.lax.stop_gradient(jnp.asarray(bias, jnp.float32))
    ids, has_pos = positive_columns(row_offset, n, num_cols)
    col_ids = jnp.arange(num_cols, dtype=jnp.int32)

    if variant == "soft_ce":
        a = q / temperature
        if num_chunks == 1:
            logits = a @ k.T
            target = soft_target(ids, unit_q, col_ids, unit_k, soft_weight)
            p = target / jnp.sum(target, axis=1, keepdims=True)
            losses = jax.nn.logsumexp(logits, axis=1) - jnp.sum(p * logits, axis=1)
        else:
            lse = logsumexp_rows(a, k, num_chunks=num_chunks)
            t_k = _soft_target_key(ids, unit_q, unit_k, k, soft_weight)
            losses = lse - jnp.sum(a * t_k, axis=1)
    else:
        values = _bce_values if variant == "bce" else _mse_values
        a = q / temperature if variant == "bce" else q
        losses = sum_rows(values, a, k, row_data=(ids, unit_q), col_data=(col_ids, unit_k),
                          params=(soft_weight, bias), num_chunks=num_chunks)
        if variant == "mse":
            losses = losses / num_cols
    return mean_rows(losses, has_pos)

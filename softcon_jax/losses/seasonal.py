"""SeCo's multi-subspace InfoNCE (Manas et al., ICCV 2021, ServiceNow/seasonal-contrast).

One query embedding per subspace ``e`` is contrasted with keys projected by head ``e``. The
positive of row ``i`` in subspace ``e`` is key view ``e`` of the same sample. Subspace 0 is
invariant to season and augmentation (negatives: its queue); subspace ``e > 0`` also uses
the other key views of every sample as negatives, which makes it sensitive to the factor
that distinguishes view ``e``.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from softcon_jax.losses.blockwise import (
    _as_float, check_num_chunks, l2_normalize, logsumexp_rows)
from softcon_jax.losses.contrastive import (
    _check_matrix, check_temperature, mean_rows, positive_columns)
from softcon_jax.losses.registry import register

__all__ = ["seasonal_infonce"]


@register("seasonal_infonce")
def seasonal_infonce(q: jax.Array, keys: jax.Array, *, temperature: float | jax.Array,
                     queues: jax.Array | None = None, batch_negatives: bool = True,
                     row_offset: int | jax.Array = 0, num_chunks: int = 1) -> jax.Array:
    """Sum over subspaces ``e`` of the mean cross-entropy of SeCo's subspace ``e``.

    For subspace ``e`` and row ``i`` (global sample ``row_offset + i``):

    * positive: ``keys[e, e, row_offset + i]``;
    * negatives: ``queues[e]`` if given; for ``e > 0`` also every key of the other views,
      ``keys[e, j, :]`` for ``j != e``, over all N samples (sample ``i``'s own included);
      with ``batch_negatives=True`` also ``keys[e, e, m]`` for every other sample ``m``.

    With ``batch_negatives=False`` and queues given this is the loss of the reference SeCo
    MoCo-v2 code (logits ``[positive, queue, other views]`` with the target at index 0).
    Queries, keys and queue entries are L2-normalised; keys and queues get no gradient.

    Args:
      q: (E, n, D) queries, one per subspace, this device's rows.
      keys: (E, E, N, D); ``keys[e, j]`` is key view ``j`` projected by head ``e``.
      temperature: tau (SeCo uses 0.07).
      queues: (E, K, D) negatives per subspace, or None.
      batch_negatives: add the other samples' positive-view keys as negatives.
      row_offset: global index of row 0 of ``q`` (Python int or traced int).
      num_chunks: 1 builds each subspace's logits at once; more evaluates blocks of
        ``ceil(M / num_chunks)`` of its M negative columns.

    Returns:
      Scalar float32 loss.
    """
    num_chunks = check_num_chunks(num_chunks)
    check_temperature(temperature)
    q, keys = _as_float(q), _as_float(keys)
    _check_matrix("q", q, (None, None, None))
    num_spaces, n, dim = q.shape
    _check_matrix("keys", keys, (num_spaces, num_spaces, None, dim))
    num_cols = keys.shape[2]
    if queues is not None:
        queues = _as_float(queues)
        _check_matrix("queues", queues, (num_spaces, None, dim))
    ids, has_pos = positive_columns(row_offset, n, num_cols)

    total = jnp.zeros((), jnp.float32)
    for e in range(num_spaces):
        a = l2_normalize(q[e]) / temperature
        views = jax.lax.stop_gradient(l2_normalize(keys[e]))
        own = views[e]
        negatives = [] if queues is None else [
            jax.lax.stop_gradient(l2_normalize(queues[e]))]
        if e > 0:  # subspace 0 is invariant to every view: no batch keys of other views
            negatives += [views[j] for j in range(num_spaces) if j != e]
        columns = ([own] if batch_negatives else []) + negatives
        if num_chunks == 1:
            # Literal form; for batch_negatives=False the reference's [pos, neg] layout.
            if batch_negatives:
                logits = a @ jnp.concatenate(columns).T
                pos = jnp.take_along_axis(logits, jnp.clip(ids, 0, num_cols - 1)[:, None],
                                          axis=1)[:, 0]
            else:
                pos = jnp.sum(a * jnp.take(own, ids, axis=0, mode="clip"), axis=1)
                logits = pos[:, None]
                if negatives:
                    logits = jnp.concatenate([logits, a @ jnp.concatenate(negatives).T],
                                             axis=1)
            lse = jax.nn.logsumexp(logits, axis=1)
        else:
            pos = jnp.sum(a * jnp.take(own, ids, axis=0, mode="clip"), axis=1)
            if columns:
                lse = logsumexp_rows(a, jnp.concatenate(columns), num_chunks=num_chunks)
                if not batch_negatives:  # the positive is a column of its own row only
                    lse = jnp.logaddexp(pos, lse)
            else:
                lse = pos
        total = total + mean_rows(lse - pos, has_pos)
    return total

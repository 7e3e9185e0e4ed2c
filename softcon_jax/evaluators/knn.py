"""Weighted kNN classification of frozen features (DINO's `knn_classifier` vote)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from softcon_jax.losses.blockwise import l2_normalize


def knn_scores(bank: jax.Array, bank_targets: jax.Array, queries: jax.Array, *, k: int = 20,
               temperature: float = 0.07, weighting: str = "dino") -> jax.Array:
    """Class scores (M, C) of `queries` (M, D) from their k nearest `bank` rows (N, D).

    Cosine similarity; each neighbour adds its target row (one-hot or multi-hot, (N, C)),
    weighted by exp(sim / temperature) (`weighting='dino'`, as DINO's `knn_classifier`) or
    by 1 (`'majority'`). Pure jnp: usable inside jit.
    """
    if weighting not in ("dino", "majority"):
        raise ValueError(f"knn weighting={weighting!r}; expected 'dino' or 'majority'.")
    sim = l2_normalize(queries) @ l2_normalize(bank).T
    top_sim, top_idx = jax.lax.top_k(sim, min(k, bank.shape[0]))
    weights = jnp.exp(top_sim / temperature) if weighting == "dino" else jnp.ones_like(top_sim)
    return jnp.einsum("mk,mkc->mc", weights, bank_targets.astype(jnp.float32)[top_idx])


_knn_scores_jit = jax.jit(knn_scores, static_argnames=("k", "weighting"))


def knn_scores_chunked(bank: np.ndarray, bank_targets: np.ndarray, queries: np.ndarray, *,
                       k: int, temperature: float, weighting: str,
                       chunk: int = 1024) -> np.ndarray:
    """`knn_scores` over query chunks of a fixed size (one compilation, bounded memory)."""
    bank, targets = jnp.asarray(bank), jnp.asarray(bank_targets, jnp.float32)
    chunk = min(chunk, len(queries))
    out = []
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]
        n = len(q)
        if n < chunk:
            q = np.concatenate([q, np.zeros((chunk - n,) + q.shape[1:], q.dtype)])
        out.append(np.asarray(_knn_scores_jit(bank, targets, jnp.asarray(q), k=k,
                                              temperature=temperature,
                                              weighting=weighting))[:n])
    return np.concatenate(out)

"""Row reductions of a contrastive logit matrix, computed directly or in column blocks.

Every loss in this package reduces the matrix ``x = a @ k.T`` row by row, where ``a`` (n, D)
holds this device's (scaled) queries and ``k`` (M, D) the keys of the global batch. Two
reductions cover all of them:

* :func:`logsumexp_rows`: ``log sum_j exp(x_ij)``, the softmax normaliser of a
  cross-entropy;
* :func:`sum_rows`: ``sum_j f(x_ij, ...)`` for a function ``f`` that is elementwise in ``x``
  (binary cross-entropy, squared error).

With ``num_chunks=1`` both build the full (n, M) matrix and JAX differentiates it. With
``num_chunks > 1`` they scan over column blocks of ``ceil(M / num_chunks)`` columns and never
hold more than one (n, block) matrix, in the forward or the backward pass: the forward scan
accumulates the gradient with respect to ``a`` alongside the value (an online softmax with a
running maximum, as in flash attention), and the backward pass only scales that stored
(n, D) gradient by the incoming cotangent. Nothing is recomputed, so the blockwise form does
the same two matrix products per block as the direct form does for the full matrix. Column
counts that ``num_chunks`` does not divide are padded with masked columns.

Both forms treat ``k`` as a constant (``stop_gradient``): the reference methods give keys no
gradient, and the blockwise backward pass computes only the gradient with respect to ``a``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["l2_normalize", "logsumexp_rows", "sum_rows", "check_num_chunks"]

# f(x_block, row_data, col_data_block, params) -> values, same shape as x_block.
ElementwiseFn = Callable[[jax.Array, Any, Any, Any], jax.Array]


def _as_float(x: Any) -> jax.Array:
    """Returns ``x`` as an array of at least float32 precision (bf16 inputs are upcast)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """Divides ``x`` by its L2 norm along ``axis`` (at least ``eps``, as torch's F.normalize)."""
    x = _as_float(x)
    # rsqrt of the clamped squared norm: same value as x / max(||x||, eps), but an all-zero
    # row (e.g. a collapsed embedding) gets a zero gradient, where sqrt's would be NaN.
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def check_num_chunks(num_chunks: Any) -> int:
    """Returns ``num_chunks`` as an int, or raises ValueError unless it is a positive int."""
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, (int, np.integer)):
        raise ValueError(
            f"num_chunks must be a positive Python int (a static value), got {num_chunks!r}")
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    return int(num_chunks)


def _check_rows_cols(a: jax.Array, k: jax.Array) -> None:
    if a.ndim != 2 or k.ndim != 2 or a.shape[1] != k.shape[1]:
        raise ValueError(
            f"expected rows a of shape (n, D) and columns k of shape (M, D), "
            f"got a {a.shape} and k {k.shape}")


def _zero_cotangent(x: jax.Array) -> jax.Array:
    """A zero cotangent for ``x`` (float0 for integer and boolean inputs)."""
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


def _split_columns(k: jax.Array, col_data: Any, num_chunks: int):
    """Pads the M columns to ``nb * chunk`` and reshapes them into ``nb`` blocks.

    Returns ``(k_blocks (nb, chunk, D), valid (nb, chunk) bool, col_blocks)``. The padded
    columns are zeros and are masked out by ``valid``.
    """
    m = k.shape[0]
    chunk = -(-m // num_chunks)
    nb = -(-m // chunk)
    pad = nb * chunk - m

    def blocks(x):
        x = jnp.asarray(x)
        if pad:
            x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((nb, chunk) + x.shape[1:])

    valid = (np.arange(nb * chunk) < m).reshape(nb, chunk)
    return blocks(k), jnp.asarray(valid), jax.tree.map(blocks, col_data)


# ---------------------------------------------------------------- logsumexp over columns


def _lse_scan(a, kb, valid, with_grad: bool):
    """Online logsumexp over column blocks; optionally also ``softmax(x) @ k`` per row."""
    m0 = jnp.full_like(a[:, 0], -jnp.inf)
    s0 = jnp.zeros_like(a[:, 0])
    acc0 = jnp.zeros_like(a) if with_grad else None

    def body(carry, block):
        m, s, acc = carry
        kc, vc = block
        x = jnp.where(vc[None, :], a @ kc.T, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(x, axis=1))
        # Rescale what was accumulated under the old running maximum.
        scale = jnp.exp(m - m_new)
        e = jnp.exp(x - m_new[:, None])
        s = s * scale + jnp.sum(e, axis=1)
        if with_grad:
            acc = acc * scale[:, None] + e @ kc
        return (m_new, s, acc), None

    (m, s, acc), _ = jax.lax.scan(body, (m0, s0, acc0), (kb, valid))
    lse = m + jnp.log(s)
    grad = acc / s[:, None] if with_grad else None
    return lse, grad


@jax.custom_vjp
def _lse_blocks(a, kb, valid):
    return _lse_scan(a, kb, valid, with_grad=False)[0]


def _lse_blocks_fwd(a, kb, valid):
    lse, grad = _lse_scan(a, kb, valid, with_grad=True)
    return lse, (grad, kb, valid)


def _lse_blocks_bwd(res, ct):
    grad, kb, valid = res
    return ct[:, None] * grad, _zero_cotangent(kb), _zero_cotangent(valid)


_lse_blocks.defvjp(_lse_blocks_fwd, _lse_blocks_bwd)


def logsumexp_rows(a: jax.Array, k: jax.Array, *, num_chunks: int = 1) -> jax.Array:
    """Returns ``log sum_j exp(a_i . k_j)`` for every row ``i`` of ``a``, shape (n,).

    ``num_chunks=1`` evaluates the full (n, M) matrix; ``num_chunks > 1`` evaluates blocks of
    ``ceil(M / num_chunks)`` columns with an online maximum and never holds more than one
    block (see the module docstring). ``k`` is a constant: gradients flow to ``a`` only. With
    no columns (M = 0) the result is ``-inf``.
    """
    num_chunks = check_num_chunks(num_chunks)
    a = _as_float(a)
    k = jax.lax.stop_gradient(_as_float(k))
    _check_rows_cols(a, k)
    if k.shape[0] == 0:
        return jnp.full_like(a[:, 0], -jnp.inf)
    if num_chunks == 1:
        return jax.nn.logsumexp(a @ k.T, axis=1)
    kb, valid, _ = _split_columns(k, None, num_chunks)
    return _lse_blocks(a, kb, valid)


# ---------------------------------------------------------- sums of elementwise functions


def _sum_scan(fn, a, kb, valid, row_data, col_blocks, params, with_grad: bool):
    """Per-row sums of ``fn`` over column blocks; optionally also ``sum_j f'(x_ij) k_j``."""
    tot0 = jnp.zeros_like(a[:, 0])
    acc0 = jnp.zeros_like(a) if with_grad else None

    def body(carry, block):
        tot, acc = carry
        kc, vc, cc = block
        x = a @ kc.T
        vals, vjp = jax.vjp(lambda x_: fn(x_, row_data, cc, params), x)
        tot = tot + jnp.sum(jnp.where(vc[None, :], vals, 0.0), axis=1)
        if with_grad:
            # fn is elementwise in x, so the VJP with ones gives d f(x_ij) / d x_ij.
            (dx,) = vjp(jnp.ones_like(vals))
            acc = acc + jnp.where(vc[None, :], dx, 0.0) @ kc
        return (tot, acc), None

    (tot, acc), _ = jax.lax.scan(body, (tot0, acc0), (kb, valid, col_blocks))
    return tot, acc


def _make_sum_blocks():
    """Builds the custom-VJP blockwise sum (``fn`` is a static, non-differentiable input)."""

    def primal(fn, a, kb, valid, row_data, col_blocks, params):
        return _sum_scan(fn, a, kb, valid, row_data, col_blocks, params, False)[0]

    def fwd(fn, a, kb, valid, row_data, col_blocks, params):
        tot, grad = _sum_scan(fn, a, kb, valid, row_data, col_blocks, params, True)
        return tot, (grad, kb, valid, row_data, col_blocks, params)

    def bwd(fn, res, ct):
        grad, kb, valid, row_data, col_blocks, params = res
        zeros = lambda tree: jax.tree.map(_zero_cotangent, tree)  # noqa: E731
        return (ct[:, None] * grad, _zero_cotangent(kb), _zero_cotangent(valid),
                zeros(row_data), zeros(col_blocks), zeros(params))

    f = jax.custom_vjp(primal, nondiff_argnums=(0,))
    f.defvjp(fwd, bwd)
    return f


_sum_blocks = _make_sum_blocks()


def sum_rows(fn: ElementwiseFn, a: jax.Array, k: jax.Array, *, row_data: Any = None,
             col_data: Any = None, params: Any = None, num_chunks: int = 1) -> jax.Array:
    """Returns ``sum_j fn(x, row_data, col_data, params)_ij`` with ``x = a @ k.T``, shape (n,).

    ``fn(x, row_data, col_data, params)`` must be elementwise in ``x``: entry (i, j) of its
    result depends on ``x_ij`` only (and on row ``i`` of the ``row_data`` leaves, row ``j`` of
    the ``col_data`` leaves, and the ``params``). It must close over no traced values; pass
    them through ``row_data`` (leaves of leading size n), ``col_data`` (leading size M) or
    ``params`` (anything). With ``num_chunks > 1``, ``fn`` is called on blocks of columns with
    the matching slice of ``col_data``. ``k``, ``row_data``, ``col_data`` and ``params`` are
    constants: gradients flow to ``a`` only.
    """
    num_chunks = check_num_chunks(num_chunks)
    a = _as_float(a)
    k = jax.lax.stop_gradient(_as_float(k))
    _check_rows_cols(a, k)
    row_data, col_data, params = jax.lax.stop_gradient((row_data, col_data, params))
    if num_chunks == 1 or k.shape[0] == 0:
        return jnp.sum(fn(a @ k.T, row_data, col_data, params), axis=1)
    kb, valid, col_blocks = _split_columns(k, col_data, num_chunks)
    return _sum_blocks(fn, a, kb, valid, row_data, col_blocks, params)

"""GPU planning on a machine without a GPU, and cuDNN attention at any token count.

The compile tests need JAX's CUDA plugin and ptxas (`pip install -e .[gpu-plan]`); they are
skipped without it. The attention test runs everywhere: it checks the padding and masking
that make cuDNN accept 257 tokens, with XLA's implementation of the same masked call.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softcon_jax.models import vit


def _attention64(q, k, v):
    """Softmax attention in float64 NumPy over (B, N, H, D)."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("n,multiple", [(17, 2), (17, 8), (16, 8), (257, 2)])
def test_padded_masked_attention_equals_plain_attention(n, multiple):
    q, k, v = jax.random.normal(jax.random.key(n), (3, 2, n, 2, 8))
    got = vit.padded_attention(q, k, v, implementation="xla", multiple=multiple)
    assert got.shape == q.shape
    np.testing.assert_allclose(got, _attention64(q, k, v), rtol=1e-5, atol=1e-5)

    def loss(qkv, fn):
        return jnp.sum(jnp.sin(fn(*qkv)))

    plain = jax.grad(loss)((q, k, v), lambda *t: vit.padded_attention(
        *t, implementation="xla", multiple=1))
    padded = jax.grad(loss)((q, k, v), lambda *t: vit.padded_attention(
        *t, implementation="xla", multiple=multiple))
    for a, b in zip(padded, plain):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    if n % multiple:  # the mask matters: zero keys left in would take softmax weight
        pad = -n % multiple
        unmasked = jax.nn.dot_product_attention(
            *(jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (q, k, v)))[:, :n]
        assert np.abs(np.asarray(unmasked) - _attention64(q, k, v)).max() > 1e-3

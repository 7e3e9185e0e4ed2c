"""The loss registry, and the "Adding a loss" example of docs/extending.md, run verbatim."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import doc_block

from softcon_jax import losses
from softcon_jax.losses import registry

EXAMPLE = doc_block("docs/extending.md", "Adding a loss")


@pytest.fixture
def clean_registry():
    """Restores the registry after a test that registers losses."""
    saved = dict(registry.LOSSES._entries)
    yield
    registry.LOSSES._entries.clear()
    registry.LOSSES._entries.update(saved)


def _np_smoothed_infonce(q, k, tau, smoothing):
    """float64 reference: cross-entropy against (1 - s) * onehot + s / N, explicit loops."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    kn = k / np.linalg.norm(k, axis=1, keepdims=True)
    total = 0.0
    for i in range(len(q)):
        logits = qn[i] @ kn.T / tau
        log_p = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
        target = np.full(len(k), smoothing / len(k))
        target[i] += 1 - smoothing
        total += -np.sum(target * log_p)
    return total / len(q)


def test_readme_example_runs_and_is_correct(clean_registry):
    namespace: dict = {}
    exec(compile(EXAMPLE, "docs/extending.md:Adding a loss", "exec"), namespace)
    assert "smoothed_infonce" in losses.available()
    q = np.asarray(namespace["q"], np.float64)
    k = np.asarray(namespace["k"], np.float64)
    np.testing.assert_allclose(float(namespace["value"]),
                               _np_smoothed_infonce(q, k, 0.2, 0.1), rtol=1e-5)
    # Registered losses are called by name, blockwise or not, and smoothing=0 is InfoNCE.
    direct = losses.call("smoothed_infonce", namespace["q"], namespace["k"],
                         temperature=0.2, smoothing=0.0, labels_q=None)
    np.testing.assert_allclose(float(direct), float(losses.infonce(
        namespace["q"], namespace["k"], temperature=0.2)), rtol=1e-6)


def test_unknown_name_lists_available_losses():
    with pytest.raises(KeyError) as info:
        losses.get("softcon_v2")
    message = str(info.value)
    assert "unknown loss 'softcon_v2'" in message
    for name in ("infonce", "seasonal_infonce", "soft_contrastive"):
        assert name in message


def test_builtin_losses_are_registered():
    assert losses.available() == sorted(losses.available())
    assert losses.get("infonce") is losses.infonce
    assert losses.get("soft_contrastive") is losses.soft_contrastive
    assert losses.get("seasonal_infonce") is losses.seasonal_infonce


def test_register_rejects_a_taken_name(clean_registry):
    with pytest.raises(ValueError, match="'infonce' is already registered"):
        losses.register("infonce")(lambda q, k: 0.0)
    replacement = losses.register("infonce", lambda q, k, **kw: 0.0, overwrite=True)
    assert losses.get("infonce") is replacement


def test_call_passes_only_declared_keywords(clean_registry):
    @losses.register("alignment")
    def alignment(q, k, *, row_offset=0):
        return jnp.mean(jnp.sum((q - k[row_offset:row_offset + q.shape[0]]) ** 2, axis=1))

    seen = {}

    @losses.register("greedy")
    def greedy(q, k, **kwargs):
        seen.update(kwargs)
        return 0.0

    q = jnp.ones((2, 3))
    k = jnp.zeros((4, 3))
    offered = dict(labels_q=None, labels_k=None, temperature=0.2, row_offset=2,
                   num_chunks=1, soft_weight=0.5)
    assert float(losses.call("alignment", q, k, **offered)) == 3.0
    losses.call(losses.get("greedy"), q, k, **offered)
    assert seen == offered


def test_call_fails_loudly_on_a_missing_argument():
    q = jnp.ones((2, 3))
    with pytest.raises(TypeError, match="soft_contrastive.*labels_k"):
        losses.call("soft_contrastive", q, q, labels_q=jnp.ones((2, 4)), temperature=0.2)

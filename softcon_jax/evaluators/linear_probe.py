"""Linear probe: logistic regression on frozen, standardised features (optax)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass
class LinearProbe:
    """Logistic regression on standardised features: logits = ((x - mean) / std) @ w + b."""

    w: np.ndarray
    b: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    final_loss: float

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float32) - self.mean) / self.std) @ self.w + self.b


def train_linear_probe(x: np.ndarray, y: np.ndarray, *, num_classes: int, multilabel: bool,
                       epochs: int = 100, lr: float = 1e-2, weight_decay: float = 1e-4,
                       batch_size: int = 256, seed: int = 0,
                       min_steps: int = 2000) -> LinearProbe:
    """Trains a linear classifier on frozen features with optax.

    x (N, D) features; y (N,) integer labels, or (N, C) multi-hot when `multilabel`.
    Minibatches of `batch_size` (the whole set when N is smaller), a fresh permutation per
    epoch (one jitted `lax.scan` per epoch), AdamW (no decay on the bias), cosine decay
    from `lr` to 0. Small training sets get more epochs, so that there are at least
    `min_steps` updates. Loss: softmax cross-entropy, or mean per-class sigmoid BCE.
    """
    x = np.asarray(x, np.float32)
    n, d = x.shape
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    std = (x.std(axis=0, dtype=np.float64) + 1e-6).astype(np.float32)
    xs = jnp.asarray((x - mean) / std)
    ys = jnp.asarray(y, jnp.float32 if multilabel else jnp.int32)
    bs = min(batch_size, n)
    steps = max(n // bs, 1)
    epochs = max(epochs, -(-min_steps // steps))
    tx = optax.adamw(optax.cosine_decay_schedule(lr, epochs * steps),
                     weight_decay=weight_decay, mask={"w": True, "b": False})
    params = {"w": jnp.zeros((d, num_classes)), "b": jnp.zeros((num_classes,))}
    opt_state = tx.init(params)

    def loss_fn(p, xb, yb):
        logits = xb @ p["w"] + p["b"]
        if multilabel:
            return optax.sigmoid_binary_cross_entropy(logits, yb).mean()
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def run_epoch(params, opt_state, xs, ys, key):
        batches = jax.random.permutation(key, n)[:steps * bs].reshape(steps, bs)

        def step(carry, idx):
            p, s = carry
            loss, grads = jax.value_and_grad(loss_fn)(p, xs[idx], ys[idx])
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), batches)
        return params, opt_state, losses.mean()

    key = jax.random.key(seed)
    loss = jnp.nan
    for epoch in range(epochs):
        params, opt_state, loss = run_epoch(params, opt_state, xs, ys,
                                            jax.random.fold_in(key, epoch))
    return LinearProbe(np.asarray(params["w"]), np.asarray(params["b"]), mean, std,
                       float(loss))

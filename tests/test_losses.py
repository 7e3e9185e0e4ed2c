"""Losses against independent float64 NumPy references, sharded and blockwise.

The references below are written from the papers' definitions (InfoNCE as MoCo-v3, Chen et
al. 2021; the soft contrastive loss, Wang, Albrecht, Zhu 2024; SeCo's seasonal InfoNCE,
Manas et al. 2021) with explicit loops, and their gradients are float64 central finite
differences, so they share no code or algebra with softcon_jax.losses.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from softcon_jax import losses

# ----------------------------------------------------------- float64 NumPy references


def np_normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_logsumexp(v):
    m = np.max(v)
    return m + np.log(np.sum(np.exp(v - m)))


def np_label_cosine(labels_q, labels_k):
    """S_ij = cosine of the label vectors, 0 when either is empty (explicit loops)."""
    s = np.zeros((len(labels_q), len(labels_k)))
    for i, a in enumerate(labels_q):
        for j, b in enumerate(labels_k):
            if a.any() and b.any():
                s[i, j] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return s


def np_infonce(q, k, tau, row_offset):
    qn, kn = np_normalize(q), np_normalize(k)
    total = 0.0
    for i in range(len(q)):
        logits = np.array([qn[i] @ kn[j] / tau for j in range(len(k))])
        total += np_logsumexp(logits) - logits[row_offset + i]
    return total / len(q)


def np_soft(q, k, sim, tau, soft_weight, variant, bias, row_offset):
    qn, kn = np_normalize(q), np_normalize(k)
    n, num_cols = sim.shape
    total = 0.0
    for i in range(n):
        target = np.array([1.0 if j == row_offset + i else soft_weight * sim[i, j]
                           for j in range(num_cols)])
        cos = np.array([qn[i] @ kn[j] for j in range(num_cols)])
        logits = cos / tau
        if variant == "soft_ce":
            p = target / target.sum()
            total += -np.sum(p * (logits - np_logsumexp(logits)))
        elif variant == "bce":  # torch BCEWithLogits, summed over columns
            x, y = logits + bias, np.minimum(target, 1.0)
            total += np.sum(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x))))
        else:
            total += np.mean((cos - np.minimum(target, 1.0)) ** 2)
    return total / n


def np_seasonal(q, keys, queues, tau, batch_negatives, row_offset):
    num_spaces, n, _ = q.shape
    num_cols = keys.shape[2]
    total = 0.0
    for e in range(num_spaces):
        zq = np_normalize(q[e])
        zk = np_normalize(keys[e])
        space = 0.0
        for i in range(n):
            pos = zq[i] @ zk[e, row_offset + i]
            negs = []
            if queues is not None:
                negs += [zq[i] @ u for u in np_normalize(queues[e])]
            if e > 0:
                negs += [zq[i] @ zk[j, m] for j in range(num_spaces) if j != e
                         for m in range(num_cols)]
            if batch_negatives:
                negs += [zq[i] @ zk[e, m] for m in range(num_cols) if m != row_offset + i]
            logits = np.array([pos] + negs) / tau
            space += np_logsumexp(logits) - logits[0]
        total += space / n
    return total


def np_seco_reference(q, keys, queues, tau):
    """The reference SeCo MoCo-v2 forward + loss, transcribed to NumPy (one device).

    Mirrors ServiceNow/seasonal-contrast models/moco2_module.py: queue stored (D, K),
    z_neg = cat([queue, other keys^T]) for i > 0, logits = cat([l_pos, l_neg]) / T,
    cross-entropy with target 0, summed over subspaces.
    """
    num_spaces = q.shape[0]
    queue = np.stack([np_normalize(u).T for u in queues])  # (E, D, K)
    loss = 0.0
    for i in range(num_spaces):
        z_q = np_normalize(q[i])
        z_k = [np_normalize(keys[i, j]) for j in range(num_spaces)]
        z_pos = z_k[i]
        z_neg = queue[i]
        if i > 0:
            z_neg = np.concatenate([z_neg] + [z_k[j].T for j in range(num_spaces) if j != i],
                                   axis=1)
        l_pos = np.einsum("nc,nc->n", z_q, z_pos)[:, None]
        l_neg = np.einsum("nc,ck->nk", z_q, z_neg)
        logits = np.concatenate([l_pos, l_neg], axis=1) / tau
        log_prob = logits - np.array([np_logsumexp(row) for row in logits])[:, None]
        loss += np.mean(-log_prob[:, 0])
    return loss


def np_grad(f, x, h=1e-6):
    """Central finite differences of a float64 function."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + h
        up = f(x)
        x[idx] = old - h
        down = f(x)
        x[idx] = old
        g[idx] = (up - down) / (2 * h)
    return g


def assert_close(actual, expected, rtol):
    expected = np.asarray(expected, np.float64)
    atol = rtol * max(np.max(np.abs(expected)), 1e-3)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------ data

# Global-batch labels (N = 12, C = 4): rows 0 and 5 have no label, rows 1 and 2 and rows 3
# and 7 have identical label sets, row 8 shares a class with every labelled row (several
# positives per row).
LABELS = np.array([
    [0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0],
    [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1], [0, 1, 0, 0], [1, 0, 1, 0],
], np.float32)
# The query view's labels (another season): a few rows differ from LABELS.
LABELS_Q = LABELS.copy()
LABELS_Q[[2, 6, 9]] = [[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 0, 1]]

# (n, row_offset): all rows on one device, or a slice of rows with a non-zero offset.
ROWS = [(12, 0), (5, 4)]


def _embeddings(seed, n, num_cols, dim):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n, dim)).astype(np.float32)
    k = rng.normal(size=(num_cols, dim)).astype(np.float32)
    return q, k


# ------------------------------------------------------------------ NumPy comparisons


@pytest.mark.parametrize("num_chunks", [1, 5])
@pytest.mark.parametrize("n,row_offset", ROWS)
def test_infonce_matches_numpy(n, row_offset, num_chunks):
    q, k = _embeddings(0, n, 12, 6)
    tau = 0.2
    fn = lambda q_: losses.infonce(q_, k, temperature=tau, row_offset=row_offset,  # noqa: E731
                                   num_chunks=num_chunks)
    value, grad = jax.jit(jax.value_and_grad(fn))(q)
    ref = lambda q_: np_infonce(q_, k.astype(np.float64), tau, row_offset)  # noqa: E731
    assert_close(value, ref(q.astype(np.float64)), 1e-5)
    assert_close(grad, np_grad(ref, q), 1e-4)


@pytest.mark.parametrize("num_chunks", [1, 5])
@pytest.mark.parametrize("soft_weight", [0.6, 2.5])
@pytest.mark.parametrize("n,row_offset", ROWS)
@pytest.mark.parametrize("variant", ["soft_ce", "bce", "mse"])
def test_soft_contrastive_matches_numpy(variant, n, row_offset, soft_weight, num_chunks):
    q, k = _embeddings(1, n, 12, 6)
    labels_q = LABELS_Q[row_offset:row_offset + n]
    tau, bias = 0.3, -1.5
    sim = np_label_cosine(labels_q.astype(np.float64), LABELS.astype(np.float64))

    def fn(q_):
        return losses.soft_contrastive(
            q_, k, labels_q, LABELS, temperature=tau, soft_weight=soft_weight,
            variant=variant, bias=bias, row_offset=row_offset, num_chunks=num_chunks)

    def ref(q_):
        return np_soft(q_, k.astype(np.float64), sim, tau, soft_weight, variant, bias,
                       row_offset)

    value, grad = jax.jit(jax.value_and_grad(fn))(q)
    assert_close(value, ref(q.astype(np.float64)), 1e-5)
    assert_close(grad, np_grad(ref, q), 1e-4)


def test_soft_weight_zero_is_exactly_infonce():
    q, k = _embeddings(2, 12, 12, 6)
    for num_chunks in (1, 5):
        soft = jax.jit(jax.value_and_grad(lambda q_: losses.soft_contrastive(
            q_, k, LABELS_Q, LABELS, temperature=0.1, soft_weight=0.0,
            num_chunks=num_chunks)))
        hard = jax.jit(jax.value_and_grad(lambda q_: losses.infonce(
            q_, k, temperature=0.1, num_chunks=num_chunks)))
        (v_soft, g_soft), (v_hard, g_hard) = soft(q), hard(q)
        assert float(v_soft) == float(v_hard)
        np.testing.assert_array_equal(np.asarray(g_soft), np.asarray(g_hard))


SEASONAL_CASES = [  # (n, num_cols, row_offset)
    (6, 6, 0), (4, 7, 3)]


@pytest.mark.parametrize("num_chunks", [1, 4])
@pytest.mark.parametrize("with_queues", [False, True])
@pytest.mark.parametrize("batch_negatives", [True, False])
@pytest.mark.parametrize("n,num_cols,row_offset", SEASONAL_CASES)
def test_seasonal_infonce_matches_numpy(n, num_cols, row_offset, batch_negatives,
                                        with_queues, num_chunks):
    rng = np.random.default_rng(3)
    num_spaces, dim, tau = 3, 4, 0.07
    q = rng.normal(size=(num_spaces, n, dim)).astype(np.float32)
    keys = rng.normal(size=(num_spaces, num_spaces, num_cols, dim)).astype(np.float32)
    queues = rng.normal(size=(num_spaces, 5, dim)).astype(np.float32) if with_queues else None

    def fn(q_):
        return losses.seasonal_infonce(q_, keys, temperature=tau, queues=queues,
                                       batch_negatives=batch_negatives,
                                       row_offset=row_offset, num_chunks=num_chunks)

    def ref(q_):
        return np_seasonal(q_, keys.astype(np.float64),
                           None if queues is None else queues.astype(np.float64),
                           tau, batch_negatives, row_offset)

    value, grad = jax.jit(jax.value_and_grad(fn))(q)
    assert_close(value, ref(q.astype(np.float64)), 1e-5)
    assert_close(grad, np_grad(ref, q), 1e-4)


@pytest.mark.parametrize("num_chunks", [1, 3])
def test_seasonal_without_batch_negatives_is_reference_seco(num_chunks):
    rng = np.random.default_rng(4)
    num_spaces, n, dim, tau = 3, 8, 16, 0.07
    q = rng.normal(size=(num_spaces, n, dim)).astype(np.float32)
    keys = rng.normal(size=(num_spaces, num_spaces, n, dim)).astype(np.float32)
    queues = rng.normal(size=(num_spaces, 32, dim)).astype(np.float32)
    value = losses.seasonal_infonce(q, keys, temperature=tau, queues=queues,
                                    batch_negatives=False, num_chunks=num_chunks)
    ref = np_seco_reference(q.astype(np.float64), keys.astype(np.float64),
                            queues.astype(np.float64), tau)
    assert_close(value, ref, 1e-5)


# ------------------------------------------------------------------- training semantics


def test_keys_and_labels_get_no_gradient():
    q, k = _embeddings(5, 12, 12, 6)
    grads = jax.grad(
        lambda k_, lab: losses.soft_contrastive(q, k_, LABELS_Q, lab, temperature=0.2),
        argnums=(0, 1))(k, LABELS)
    assert not np.any(np.asarray(grads[0])) and not np.any(np.asarray(grads[1]))
    for num_chunks in (1, 3):
        g = jax.grad(lambda k_: losses.infonce(q, k_, temperature=0.2,
                                               num_chunks=num_chunks))(k)
        assert not np.any(np.asarray(g))


def test_temperature_gradient_matches_numpy():
    """A traced temperature (e.g. a schedule or a learned one) gets its exact gradient."""
    q, k = _embeddings(6, 12, 12, 6)
    for num_chunks in (1, 4):
        g = jax.jit(jax.grad(lambda t: losses.infonce(q, k, temperature=t,
                                                      num_chunks=num_chunks)))(jnp.float32(0.2))
        ref = np_grad(lambda t: np_infonce(q.astype(np.float64), k.astype(np.float64),
                                           t[()], 0), np.array(0.2))
        assert_close(g, ref, 1e-4)


# ------------------------------------------------------------------ blockwise vs direct


def _loss_zoo(labels_q, labels_k, k, row_offset):
    """Every loss configuration as a function of (q, num_chunks); seasonal uses 2 subspaces
    built from the same arrays."""
    ks = jnp.stack([jnp.stack([k, k[::-1]]), jnp.stack([k[:, ::-1], k])])
    queues = jnp.stack([k[:7], k[3:10]])
    zoo = {"infonce": lambda q, c: losses.infonce(
        q, k, temperature=0.1, row_offset=row_offset, num_chunks=c)}
    for variant in losses.contrastive.SOFT_VARIANTS:
        zoo[variant] = lambda q, c, v=variant: losses.soft_contrastive(
            q, k, labels_q, labels_k, temperature=0.1, variant=v, soft_weight=0.7,
            bias=-2.0, row_offset=row_offset, num_chunks=c)
    for bn in (True, False):
        zoo[f"seasonal_bn{bn}"] = lambda q, c, bn=bn: losses.seasonal_infonce(
            jnp.stack([q, q[:, ::-1]]), ks, temperature=0.1, queues=queues,
            batch_negatives=bn, row_offset=row_offset, num_chunks=c)
    return zoo


@pytest.mark.parametrize("name", ["infonce", "soft_ce", "bce", "mse", "seasonal_bnTrue",
                                  "seasonal_bnFalse"])
def test_blockwise_equals_direct(name):
    """Values and query gradients agree to 1e-5, also when num_chunks does not divide the
    number of columns (64 columns; seasonal: 128 + 7 negatives)."""
    rng = np.random.default_rng(7)
    n, num_cols, dim, row_offset = 24, 64, 16, 20
    q = rng.normal(size=(n, dim)).astype(np.float32)
    k = jnp.asarray(rng.normal(size=(num_cols, dim)).astype(np.float32))
    labels = (rng.random((num_cols, 5)) < 0.4).astype(np.float32)
    loss = _loss_zoo(labels[row_offset:row_offset + n], labels, k, row_offset)[name]
    step = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    v_direct, g_direct = step(q, 1)
    for num_chunks in (2, 7, 200):
        v_block, g_block = step(q, num_chunks)
        assert_close(v_block, v_direct, 1e-5)
        assert_close(g_block, g_direct, 1e-5)


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name", ["infonce", "soft_ce", "bce", "seasonal"])
def test_blockwise_bounds_memory(name):
    """Forward + backward of the blockwise form needs far less scratch than one (n, N)
    logit matrix; the direct form needs at least that matrix."""
    n = num_cols = 1024
    dim, num_chunks = 8, 16
    q = jnp.ones((n, dim))
    k = jnp.ones((num_cols, dim))
    labels = jnp.ones((num_cols, 3))

    def loss(q_, chunks):
        if name == "infonce":
            return losses.infonce(q_, k, temperature=0.1, num_chunks=chunks)
        if name == "seasonal":
            return losses.seasonal_infonce(q_[None], k[None, None], temperature=0.1,
                                           num_chunks=chunks)
        return losses.soft_contrastive(q_, k, labels, labels, temperature=0.1,
                                       variant=name, num_chunks=chunks)

    logits_bytes = n * num_cols * 4
    direct = _temp_bytes(jax.value_and_grad(lambda q_: loss(q_, 1)), q)
    blockwise = _temp_bytes(jax.value_and_grad(lambda q_: loss(q_, num_chunks)), q)
    assert direct >= logits_bytes
    assert blockwise < logits_bytes / 2


# --------------------------------------------------------------------- row_offset


def test_traced_row_offset_equals_static():
    q, k = _embeddings(8, 5, 12, 6)
    for num_chunks in (1, 4):
        f = jax.jit(lambda q_, off: losses.soft_contrastive(
            q_, k, LABELS_Q[4:9], LABELS, temperature=0.2, row_offset=off,
            num_chunks=num_chunks))
        assert_close(f(q, jnp.int32(4)),
                     losses.soft_contrastive(q, k, LABELS_Q[4:9], LABELS, temperature=0.2,
                                             row_offset=4, num_chunks=num_chunks), 1e-6)
        # A traced offset past the last column cannot raise, so it must not pass silently.
        assert np.isnan(float(f(q, jnp.int32(9))))


def test_static_row_offset_out_of_range_raises():
    q, k = _embeddings(9, 5, 12, 6)
    with pytest.raises(ValueError, match="row_offset=8 with 5 rows"):
        losses.infonce(q, k, temperature=0.2, row_offset=8)


def test_bad_inputs_raise_clear_errors():
    q, k = _embeddings(10, 12, 12, 6)
    with pytest.raises(ValueError, match="variant 'focal'.*soft_ce, bce, mse"):
        losses.soft_contrastive(q, k, LABELS, LABELS, temperature=0.2, variant="focal")
    with pytest.raises(ValueError, match=r"labels_k must have shape \(12, 4\)"):
        losses.soft_contrastive(q, k, LABELS, LABELS[:, :3], temperature=0.2)
    with pytest.raises(ValueError, match=r"k must have shape \(\?, 6\)"):
        losses.infonce(q, k[:, :5], temperature=0.2)
    with pytest.raises(ValueError, match="num_chunks must be >= 1"):
        losses.infonce(q, k, temperature=0.2, num_chunks=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        losses.infonce(q, k, temperature=0.0)
    with pytest.raises(ValueError, match=r"keys must have shape \(2, 2, \?, 6\)"):
        losses.seasonal_infonce(np.stack([q, q]), np.stack([k, k])[None], temperature=0.2)


# ------------------------------------------------------------------- 8-device sharding


def _sharded_vs_single(loss, q, k, labels_q, labels_k):
    """Returns (value, grad) of the shard_map'd loss and of the single-device loss.

    As in the trainer: rows and columns are split over the 8 devices; each device gathers
    all columns, uses row_offset = axis_index * n and the results are averaged.
    """
    mesh = jax.make_mesh((8,), ("data",))
    rows = P("data")

    def local(q_, k_, lq, lk):
        k_all = jax.lax.all_gather(k_, "data", axis=0, tiled=True)
        lk_all = jax.lax.all_gather(lk, "data", axis=0, tiled=True)
        offset = jax.lax.axis_index("data") * q_.shape[0]
        return jax.lax.pmean(loss(q_, k_all, lq, lk_all, offset), "data")

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, rows),
                            out_specs=P())
    args = [jax.device_put(x, NamedSharding(mesh, rows)) for x in (q, k, labels_q, labels_k)]
    v_sharded, g_sharded = jax.jit(jax.value_and_grad(sharded))(*args)
    v_single, g_single = jax.jit(jax.value_and_grad(
        lambda q_: loss(q_, k, labels_q, labels_k, 0)))(q)
    return (v_sharded, g_sharded), (v_single, g_single)


SHARDED_LOSSES = {
    "infonce": lambda q, k, lq, lk, off, c: losses.infonce(
        q, k, temperature=0.2, row_offset=off, num_chunks=c),
    "soft_ce": lambda q, k, lq, lk, off, c: losses.soft_contrastive(
        q, k, lq, lk, temperature=0.2, row_offset=off, num_chunks=c),
    "bce": lambda q, k, lq, lk, off, c: losses.soft_contrastive(
        q, k, lq, lk, temperature=0.2, variant="bce", bias=-1.0, row_offset=off,
        num_chunks=c),
    "mse": lambda q, k, lq, lk, off, c: losses.soft_contrastive(
        q, k, lq, lk, temperature=0.2, variant="mse", row_offset=off, num_chunks=c),
}


@pytest.mark.parametrize("num_chunks", [1, 3])
@pytest.mark.parametrize("name", sorted(SHARDED_LOSSES))
def test_sharded_loss_equals_single_device(name, num_chunks):
    assert jax.device_count() == 8
    rng = np.random.default_rng(11)
    global_batch, dim = 16, 8
    q = rng.normal(size=(global_batch, dim)).astype(np.float32)
    k = rng.normal(size=(global_batch, dim)).astype(np.float32)
    labels = (rng.random((global_batch, 4)) < 0.4).astype(np.float32)
    labels_q = np.roll(labels, 1, axis=1)
    fn = SHARDED_LOSSES[name]
    (v_sh, g_sh), (v_one, g_one) = _sharded_vs_single(
        lambda q_, k_, lq, lk, off: fn(q_, k_, lq, lk, off, num_chunks), q, k, labels_q,
        labels)
    assert_close(v_sh, v_one, 1e-5)
    assert_close(g_sh, g_one, 1e-5)


@pytest.mark.parametrize("num_chunks", [1, 3])
@pytest.mark.parametrize("batch_negatives", [True, False])
def test_sharded_seasonal_equals_single_device(batch_negatives, num_chunks):
    rng = np.random.default_rng(12)
    num_spaces, global_batch, dim = 3, 16, 8
    q = rng.normal(size=(num_spaces, global_batch, dim)).astype(np.float32)
    keys = rng.normal(size=(num_spaces, num_spaces, global_batch, dim)).astype(np.float32)
    queues = jnp.asarray(rng.normal(size=(num_spaces, 6, dim)).astype(np.float32))

    # Batch axis first, so the rows and columns shard like every other array.
    q_b = np.moveaxis(q, 1, 0)
    keys_b = np.moveaxis(keys, 2, 0)

    def loss(q_, k_, lq, lk, off):
        del lq, lk
        return losses.seasonal_infonce(
            jnp.moveaxis(q_, 0, 1), jnp.moveaxis(k_, 0, 2), temperature=0.07, queues=queues,
            batch_negatives=batch_negatives, row_offset=off, num_chunks=num_chunks)

    dummy = np.zeros((global_batch, 1), np.float32)
    (v_sh, g_sh), (v_one, g_one) = _sharded_vs_single(loss, q_b, keys_b, dummy, dummy)
    assert_close(v_sh, v_one, 1e-5)
    assert_close(g_sh, g_one, 1e-5)


def test_all_zero_embedding_gives_finite_gradients():
    """A collapsed (all-zero) query or key row must not turn the whole step into NaN."""
    import jax
    import jax.numpy as jnp
    from softcon_jax import losses as L

    q = jnp.zeros((4, 8)).at[1:].set(jax.random.normal(jax.random.key(0), (3, 8)))
    k = jnp.zeros((4, 8)).at[:2].set(jax.random.normal(jax.random.key(1), (2, 8)))
    labels = jnp.eye(4, 9)
    for fn in (lambda q: L.infonce(q, k, temperature=0.2),
               lambda q: L.soft_contrastive(q, k, labels, labels, temperature=0.2)):
        value, grad = jax.value_and_grad(fn)(q)
        assert jnp.isfinite(value)
        # Finite, as torch's F.normalize (a zero row is scaled by 1/eps), never NaN.
        assert bool(jnp.all(jnp.isfinite(grad)))

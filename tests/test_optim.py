"""Optimizers against torch: MoCo-v3 LARS, AdamW and SGD with the reference decay sets."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from softcon_jax import optim

torch = pytest.importorskip("torch")


class TorchMocoLARS(torch.optim.Optimizer):
    """Transcription of facebookresearch/moco-v3 `optimizer.py` LARS (also in
    zhu-xlab/SSL4EO-S12): decay and trust ratio for p.ndim > 1 only, lr after momentum."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0,
                                                (g["trust_coefficient"] * param_norm
                                                 / update_norm), one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


# Flax-like names: kernels, biases, a norm scale, a ViT token (3-d, as cls_token).
SHAPES = {"conv": {"kernel": (3, 3, 4, 8), "bias": (8,)}, "norm": {"scale": (8,)},
          "dense": {"kernel": (8, 5), "bias": (5,)}, "cls_token": (1, 1, 5)}
STEPS, WARMUP = 12, 6


def _config(name, **opt):
    c = ml_collections.ConfigDict()
    c.total_steps, c.global_batch_size = STEPS, 256
    c.optimizer = ml_collections.ConfigDict(dict(name=name, lr=0.6, lr_scale_batch=0,
                                                 weight_decay=0.05, momentum=0.9, **opt))
    c.schedule = ml_collections.ConfigDict(dict(name="cosine", warmup_steps=WARMUP,
                                                end_factor=0.0))
    return c


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), SHAPES,
                        is_leaf=lambda x: isinstance(x, tuple))


def _grads(step):
    rng = np.random.default_rng(100 + step)
    return jax.tree.map(lambda s: (rng.normal(size=s) * 0.1).astype(np.float32), SHAPES,
                        is_leaf=lambda x: isinstance(x, tuple))


def _run_optax(config):
    tx, schedule = optim.make_optimizer(config)
    params = jax.tree.map(jnp.asarray, _params())
    state = tx.init(params)
    out = []
    for step in range(STEPS):
        updates, state = tx.update(jax.tree.map(jnp.asarray, _grads(step)), state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        out.append(jax.tree.map(np.asarray, params))
    return out, schedule


def _run_torch(make_opt, schedule, groups=None):
    """`make_opt(param_groups)`; the lr of step s is set from `schedule(s)` before the step,
    as MoCo-v3's per-iteration `adjust_learning_rate`."""
    names = jax.tree_util.tree_flatten_with_path(_params())[0]
    keys = [jax.tree_util.keystr(k) for k, _ in names]
    tp = {k: torch.tensor(v, requires_grad=True) for k, (_, v) in zip(keys, names)}
    if groups is None:
        opt = make_opt([{"params": list(tp.values())}])
    else:
        opt = make_opt([{"params": [tp[k] for k in keys if groups(k, tp[k])]},
                        {"params": [tp[k] for k in keys if not groups(k, tp[k])],
                         "weight_decay": 0.0}])
    out = []
    for step in range(STEPS):
        grads = [g for _, g in jax.tree_util.tree_flatten_with_path(_grads(step))[0]]
        for k, g in zip(keys, grads):
            tp[k].grad = torch.tensor(g)
        for group in opt.param_groups:
            group["lr"] = float(schedule(step))
        opt.step()
        out.append({k: v.detach().numpy().copy() for k, v in tp.items()})
    return out


def _flat(params):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _compare(ours, theirs, rtol=2e-5, atol=1e-6):
    p0 = _flat(_params())
    for step, (a, b) in enumerate(zip(ours, theirs)):
        a = _flat(a)
        assert set(a) == set(b)
        for k in a:
            # Compare the accumulated change, which is what the optimizer produced.
            np.testing.assert_allclose(a[k] - p0[k], b[k] - p0[k], rtol=rtol, atol=atol,
                                       err_msg=f"step {step}, {k}")


def test_lars_moco_matches_the_official_lars_update_by_update_under_warmup():
    config = _config("lars_moco", decay_mask="all")
    ours, schedule = _run_optax(config)
    assert float(schedule(0)) == 0.0 and float(schedule(WARMUP)) == pytest.approx(0.6)
    theirs = _run_torch(lambda g: TorchMocoLARS(g, lr=0.0, weight_decay=0.05, momentum=0.9),
                        schedule)
    _compare(ours, theirs)
    # optax.lars (lr before the momentum buffer) is a different optimizer under warm-up.
    other, _ = _run_optax(_config("lars", decay_mask="all"))
    p0 = _flat(_params())
    k = "['dense']['kernel']"
    rel = (np.linalg.norm((_flat(other[7])[k] - p0[k]) - (theirs[7][k] - p0[k]))
           / np.linalg.norm(theirs[7][k] - p0[k]))
    assert rel > 0.3


def test_lars_moco_gives_one_dimensional_parameters_neither_decay_nor_adaptation():
    tx = optim.lars_moco(1.0, weight_decay=0.5, momentum=0.0)
    params = {"b": jnp.full((4,), 2.0), "w": jnp.full((2, 2), 2.0)}
    grads = {"b": jnp.full((4,), 0.1), "w": jnp.full((2, 2), 0.1)}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["b"], -0.1)  # plain gradient step
    d = 0.1 + 0.5 * 2.0  # decayed direction, then trust ratio 0.001 * |p| / |d|
    np.testing.assert_allclose(updates["w"], -d * 0.001 * 4.0 / (d * 2.0), rtol=1e-6)


@pytest.mark.parametrize("mask", ["all", "no_bias_norm"])
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_adamw_and_sgd_match_torch_with_the_decay_set(name, mask):
    config = _config(name, decay_mask=mask, b1=0.9, b2=0.95)
    ours, schedule = _run_optax(config)
    if name == "adamw":
        make = lambda g: torch.optim.AdamW(g, lr=0.0, betas=(0.9, 0.95), weight_decay=0.05)
    else:
        make = lambda g: torch.optim.SGD(g, lr=0.0, momentum=0.9, weight_decay=0.05)
    # Official SeCo / MoCo-v3: one group, model.parameters(). timm-style: kernels only.
    groups = None if mask == "all" else (
        lambda key, p: p.ndim > 1 and "cls_token" not in key)
    theirs = _run_torch(make, schedule, groups)
    _compare(ours, theirs, rtol=1e-4, atol=1e-6)


def test_decay_masks_and_unknown_names():
    params = _params()
    assert all(jax.tree.leaves(optim.decay_all(params)))
    m = optim.decay_mask(params)
    assert m["conv"]["kernel"] and m["dense"]["kernel"]
    assert not (m["conv"]["bias"] or m["norm"]["scale"] or m["cls_token"])
    with pytest.raises(ValueError, match="config.optimizer.decay_mask='none'"):
        optim.make_optimizer(_config("sgd", decay_mask="none"))

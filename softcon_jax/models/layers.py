"""Layers with PyTorch semantics shared by the backbones and heads.

`BatchNorm` follows `torch.nn.BatchNorm*d`: eps 1e-5, running statistics updated as
`running = momentum * running + (1 - momentum) * batch` with momentum 0.9 (torch's 0.1),
the running variance from the *unbiased* batch variance, normalisation with the biased one.
`bn_groups` splits the batch into contiguous groups that each get their own statistics.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
# Names the batch-norm statistics (and, under a sharded batch, the all-reduces XLA makes of
# them) in the compiled program, where `softcon_jax.hlo` counts them.
BN_STATISTICS_SCOPE = "bn_statistics"

# torch.nn.Linear / Conv default init: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# torchvision ResNet conv init: kaiming_normal(mode='fan_out', nonlinearity='relu').
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BatchNorm(nn.Module):
    """BatchNorm over all axes but the last, with torch semantics and grouped statistics.

    Attributes:
      bn_groups: 1 = statistics over the whole batch (sync-BN when the batch is sharded
        under jit); G > 1 = statistics per contiguous group of B/G samples, which emulates
        per-device BN when G is the number of data shards. Running statistics are the mean
        over groups of the per-group statistics.
      use_scale / use_bias: torch's `affine` (both False for MoCo-v3's last BN).
      dtype: output dtype; statistics are always computed in float32.

    Variables: params `scale`, `bias` (torch `weight`, `bias`); batch_stats `mean`, `var`
    (torch `running_mean`, `running_var`).
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    bn_groups: int = 1
    use_scale: bool = True
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        xf = x.astype(jnp.float32)
        if not train:
            y = (xf - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
        else:
            batch, groups = x.shape[0], self.bn_groups
            if groups < 1 or batch % groups:
                raise ValueError(f"BatchNorm: batch size {batch} is not divisible by "
                                 f"bn_groups={groups}.")
            xg = xf.reshape((groups, batch // groups) + x.shape[1:])
            axes = tuple(range(1, xg.ndim - 1))
            count = math.prod(xg.shape[1:-1])
            if count < 2:
                # torch raises too: the unbiased running variance needs two values.
                raise ValueError(f"BatchNorm in train mode needs more than one value per "
                                 f"channel and group; got input {x.shape} with "
                                 f"bn_groups={groups}. Use a larger batch or fewer groups.")
            with jax.named_scope(BN_STATISTICS_SCOPE):
                mean = jnp.mean(xg, axis=axes, keepdims=True)
                # Two-pass variance: E[(x - mean)^2] is more accurate than E[x^2] - mean^2.
                var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
            y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
            if not self.is_initializing():
                m = self.momentum
                batch_mean = mean.reshape(groups, features).mean(axis=0)
                unbiased = (var.reshape(groups, features) * (count / (count - 1))).mean(axis=0)
                ra_mean.value = m * ra_mean.value + (1.0 - m) * batch_mean
                ra_var.value = m * ra_var.value + (1.0 - m) * unbiased
        if self.use_scale:
            y = y * self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        return y.astype(self.dtype)


class LayerScale(nn.Module):
    """Per-channel scale `x * gamma` (DINOv2 / timm `ls1`, `ls2`; init 1e-5)."""

    init_values: float = 1e-5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param("gamma", nn.initializers.constant(self.init_values),
                           (x.shape[-1],), self.param_dtype)
        return x * gamma.astype(x.dtype)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm `DropPath`); needs the 'dropout' rng when active."""

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))

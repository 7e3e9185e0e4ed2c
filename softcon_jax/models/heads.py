"""Projection / prediction heads.

- `MoCoV3MLP`: MoCo-v3 `_build_mlp`: num_layers bias-free Linears; BN + ReLU after every one
  but the last; the last is followed by a BN without affine parameters when `last_bn`.
- `SeCoHead`: SeCo's per-subspace Linear-ReLU-Linear (with biases). SeCo uses one head per
  embedding subspace: build one `SeCoHead` per subspace.

Linear layers use torch's default init (U(+-1/sqrt(fan_in))).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from softcon_jax.models.layers import BatchNorm, torch_default_init

Dtype = Any


class MoCoV3MLP(nn.Module):
    """MoCo-v3 MLP: [Linear(no bias) - BN - ReLU] x (num_layers - 1) - Linear(no bias) [- BN].

    MoCo-v3 (ViT): projector num_layers=3, predictor num_layers=2, both last_bn=True;
    MoCo-v3 (ResNet): projector 2 layers, predictor 2 layers with last_bn=False.
    The final BN has no scale or bias (torch `affine=False`).
    Called as `head.apply(vars, feats, train=bool, mutable=['batch_stats'] when train)`.
    """

    hidden_dim: int
    out_dim: int
    num_layers: int = 3
    last_bn: bool = True
    bn_groups: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if self.num_layers < 1:
            raise ValueError(f"MoCoV3MLP: num_layers must be >= 1, got {self.num_layers}.")
        x = x.astype(self.dtype)
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = nn.Dense(self.out_dim if last else self.hidden_dim, use_bias=False,
                         dtype=self.dtype, param_dtype=jnp.float32,
                         kernel_init=torch_default_init, name=f"linear{i}")(x)
            if not last:
                x = BatchNorm(bn_groups=self.bn_groups, dtype=self.dtype, name=f"bn{i}")(
                    x, train=train)
                x = nn.relu(x)
            elif self.last_bn:
                x = BatchNorm(bn_groups=self.bn_groups, use_scale=False, use_bias=False,
                              dtype=self.dtype, name=f"bn{i}")(x, train=train)
        return x


class SeCoHead(nn.Module):
    """SeCo projection head for one subspace: Linear - ReLU - Linear (both with bias)."""

    hidden_dim: int
    out_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no BN or dropout; accepted for a uniform head interface
        x = x.astype(self.dtype)
        x = nn.Dense(self.hidden_dim, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=torch_default_init, bias_init=nn.initializers.zeros,
                     name="fc1")(x)
        x = nn.relu(x)
        return nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=torch_default_init, name="fc2")(x)

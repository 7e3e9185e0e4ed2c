"""Experiment configs: `get_config(arg)` in each file returns an `ml_collections.ConfigDict`.

Configs import only `configs.common` and `softcon_jax.defaults` (plain ml_collections), so
loading one never loads JAX or the training stack.
"""

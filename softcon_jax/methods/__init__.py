"""Pretraining methods, chosen by `config.method`.

A method owns what differs between SoftCon and SeCo: which networks exist, how a batch
becomes a loss, and what happens to the non-trained networks (EMA teacher, queues) after
each update. The trainer (`softcon_jax.train`) owns everything else. A method is a class
with this interface:

    method = METHODS.get(name)(config, mesh)      # @METHODS.register("name") on the class
    params, model_state = method.init(rng, batch)          # trainable / non-trainable trees
    loss, (model_state, metrics) = method.loss(params, model_state, batch, rng, step)
    model_state, metrics = method.after_update(params, model_state, step)
    variables = method.backbone_variables(model_state, params, which="teacher"|"student")
    params, model_state = method.with_backbone(params, model_state, variables)  # warm start
    batch = method.example_batch(n)                         # zeros, for initialisation
    method.backbone                                         # the flax backbone module
"""

from __future__ import annotations

from softcon_jax.methods.common import METHODS
from softcon_jax.methods.seco import SeCo
from softcon_jax.methods.softcon import SoftCon


def get(name: str):
    """The method class registered under `name` (`config.method`)."""
    return METHODS.get(name)


__all__ = ["METHODS", "SeCo", "SoftCon", "get"]

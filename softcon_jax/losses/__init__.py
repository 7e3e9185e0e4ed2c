"""Contrastive losses over the global batch, chosen by name from the config.

Public API:

* :func:`infonce`, :func:`soft_contrastive` (SoftCon, this project's reading of
  arXiv 2405.20462) and :func:`seasonal_infonce` (SeCo), each taking ``num_chunks`` for
  blockwise evaluation;
* the registry: :func:`register`, :func:`get`, :func:`available` and :func:`call` (passes
  a loss the framework arguments it declares, and the user's options strictly);
* :mod:`softcon_jax.losses.blockwise`: the direct/blockwise row reductions
  (``logsumexp_rows``, ``sum_rows``, ``l2_normalize``) to build new losses from.
"""

from softcon_jax.losses import blockwise
from softcon_jax.losses.contrastive import infonce, soft_contrastive
from softcon_jax.losses.registry import (LOSSES, UnknownLossError, available, call,
                                         check_options, get, register)
from softcon_jax.losses.seasonal import seasonal_infonce

__all__ = [
    "infonce", "soft_contrastive", "seasonal_infonce", "register", "get", "available",
    "call", "check_options", "LOSSES", "UnknownLossError", "blockwise",
]

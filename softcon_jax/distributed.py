"""Multi-host start-up: call `jax.distributed.initialize()` when the environment asks for it."""

from __future__ import annotations

import importlib.util
import os

import jax
from absl import logging


def _explicit_coordinator() -> dict | None:
    """JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, as launch/ scripts set."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        return None
    missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in os.environ]
    if missing:
        raise RuntimeError(f"JAX_COORDINATOR_ADDRESS is set to {address!r} but {missing} "
                           "are not; set all three (see launch/multinode.sh).")
    kwargs = dict(coordinator_address=address,
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
    if os.environ.get("JAX_LOCAL_DEVICE_IDS"):
        kwargs["local_device_ids"] = [int(i) for i in
                                      os.environ["JAX_LOCAL_DEVICE_IDS"].split(",")]
    return kwargs


def _on_cloud_tpu_vm() -> bool:
    # TPU VMs expose the chips as /dev/accel* (v2-v4) or /dev/vfio (v5+). JAX finds the
    # slice's other hosts from the metadata server, so initialize() needs no arguments.
    # libtpu (installed by jax[tpu]) guards against other machines that have /dev/vfio.
    has_chips = os.path.exists("/dev/accel0") or os.path.isdir("/dev/vfio")
    return has_chips and importlib.util.find_spec("libtpu") is not None


def _needs_auto_initialize() -> bool:
    """A SLURM job with several tasks, or a Cloud TPU VM (single- or multi-host)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return _on_cloud_tpu_vm()


def maybe_initialize() -> None:
    """Initialises the multi-controller runtime once, where the environment calls for it."""
    if jax.distributed.is_initialized():
        return
    explicit = _explicit_coordinator()
    if explicit is not None:
        logging.info("jax.distributed.initialize(%s)", explicit)
        jax.distributed.initialize(**explicit)
    elif _needs_auto_initialize():
        logging.info("jax.distributed.initialize() from the SLURM/TPU environment")
        jax.distributed.initialize()

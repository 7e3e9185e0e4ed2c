"""The one sharding story: a named mesh, the batch on the data axes, parameters on `fsdp`.

Every array in the trainer is placed with a `NamedSharding` on the mesh built here. The mesh
has two axes, both with explicit `Auto` axis types (GSPMD propagation):

- `data`: pure data parallelism; parameters are replicated along it.
- `fsdp`: the batch is split along it too, and large parameters (and their optimizer state)
  are sharded along it, ZeRO-3 style. Size 1 (the default) turns it off.

The same code runs on 1 CPU, 8 fake CPU devices, one GPU and a multi-host pod: the mesh is
built from `jax.devices()`, which spans all processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from softcon_jax.cli import UserValueError

MESH_AXES = ("data", "fsdp")
# The batch dimension is split over every mesh axis.
BATCH_AXES = MESH_AXES


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp) mesh from `config.mesh`.

    `mesh_config.data` may be -1: it then takes every device that `fsdp` leaves.
    """
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = int(mesh_config.get("data", -1)), int(mesh_config.get("fsdp", 1))
    unknown = set(mesh_config.keys()) - set(MESH_AXES)
    if unknown:
        raise UserValueError(
            f"config.mesh has unknown axes {sorted(unknown)}; the mesh axes are {MESH_AXES}.")
    if fsdp < 1 or (data < 1 and data != -1):
        raise UserValueError(f"config.mesh: axis sizes must be positive (data may be -1), got "
                             f"data={data}, fsdp={fsdp}.")
    if data == -1:
        if len(devices) % fsdp:
            raise UserValueError(f"config.mesh.fsdp={fsdp} does not divide the {len(devices)} "
                                 "available devices.")
        data = len(devices) // fsdp
    if data * fsdp != len(devices):
        raise UserValueError(f"config.mesh asks for data={data} x fsdp={fsdp} = {data * fsdp} "
                             f"devices, but {len(devices)} are available.")
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:
        # Multislice: `data` spans the slices (DCN), `fsdp` stays inside a slice (ICI).
        from jax.experimental import mesh_utils

        if data % slices:
            raise UserValueError(f"config.mesh.data={data} is not divisible by the {slices} "
                                 "slices; data parallelism spans them.")
        grid = mesh_utils.create_hybrid_device_mesh((data // slices, fsdp), (slices, 1),
                                                    devices)
        return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 2)
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * 2,
                         devices=devices)


def num_batch_shards(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch_divides(global_batch_size: int, mesh: Mesh, key: str = "config.global_batch_size"):
    """A clear error when the mesh cannot split the global batch evenly."""
    shards = num_batch_shards(mesh)
    if global_batch_size % shards:
        raise UserValueError(
            f"{key}={global_batch_size} is not divisible by the {shards} batch shards of the "
            f"mesh (data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}). Choose a multiple "
            f"of {shards}, or change config.mesh.")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over all mesh axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 2**14) -> P:
    """Shards the largest dimension divisible by `fsdp_size`; small arrays stay replicated."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state, mesh: Mesh):
    """NamedShardings for a pytree of ShapeDtypeStructs: FSDP rule for arrays, scalars replicated."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp_size)), abstract_state)


def host_batch_to_global(batch: dict, mesh: Mesh) -> dict:
    """Host-local numpy batch -> global `jax.Array`s split over the batch axes.

    Works on one host and on many: each process contributes its own rows.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)

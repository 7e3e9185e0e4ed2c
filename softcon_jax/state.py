"""The train state: its layout, its creation on a mesh, and restoring parts of it.

Every tool that needs the state's structure (the trainer, `export`, `evaluate`, `plan`)
builds it here, so the layout is defined once and no module imports the trainer.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from softcon_jax import cli, data, losses, methods, optim, sharding
from softcon_jax.checkpoint import Checkpointer, abstract_with_shardings
from softcon_jax.cli import UserValueError
from softcon_jax.methods.common import compute_dtype


@flax.struct.dataclass
class TrainState:
    step: jax.Array           # number of updates applied so far
    params: dict              # trainable (student) parameters
    opt_state: optax.OptState
    model_state: dict         # non-trained: BN statistics, EMA teacher, queues
    num_nonfinite: jax.Array  # steps whose loss or gradient was not finite (never applied)


_POSITIVE = ("global_batch_size", "total_steps", "log_every_steps", "checkpoint.every_steps",
             "checkpoint.keep", "optimizer.lr", "loss.temperature")


def validate(config, mesh):
    """Fails early (before compiling), naming the config key, on settings that cannot work."""
    for key in _POSITIVE:
        value = config
        for part in key.split("."):
            value = value.get(part) if value is not None else None
        if value is not None and not value > 0:
            raise UserValueError(f"config.{key}={value}; expected a positive value.")
    sharding.check_batch_divides(config.global_batch_size, mesh)
    accum = int(config.get("grad_accum_steps", 1))
    if accum < 1:
        raise UserValueError(f"config.grad_accum_steps={accum}; expected a positive integer.")
    if accum > 1:
        sharding.check_batch_divides(config.global_batch_size // accum, mesh,
                                     key="config.global_batch_size / config.grad_accum_steps")
        if config.global_batch_size % accum:
            raise UserValueError(f"config.global_batch_size={config.global_batch_size} is not "
                                 f"divisible by config.grad_accum_steps={accum}.")
    compute_dtype(config)  # config.model.dtype
    losses.check_options(config.loss.name, config.loss.get("kwargs"),
                         framework=("temperature", "num_chunks", "row_offset"))
    data.input_dtype(config)  # config.data.dtype
    methods.get(config.method)  # config.method
    if config.data.get("views"):
        data.VIEWS.get(config.data.views)  # config.data.views (default: the method's own)
    if config.nonfinite not in ("stop", "skip"):
        raise UserValueError(f"config.nonfinite={config.nonfinite!r}; expected 'stop' or 'skip'.")
    if config.global_batch_size % jax.process_count():
        raise UserValueError(f"config.global_batch_size={config.global_batch_size} is not "
                             f"divisible by the {jax.process_count()} processes.")


def create_train_state(config, method, tx, mesh):
    """Initialises the state directly in its sharded layout (jit with out_shardings)."""
    example = method.example_batch(sharding.num_batch_shards(mesh))

    def init(rng):
        params, model_state = method.init(rng, example)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), model_state=model_state,
                          num_nonfinite=jnp.zeros((), jnp.int32))

    rng = jax.random.key(config.seed)
    abstract = jax.eval_shape(init, rng)
    shardings = sharding.state_shardings(abstract, mesh)
    return jax.jit(init, out_shardings=shardings), rng, abstract, shardings


def load_pretrained_backbone(config, method, state, state_shardings):
    """Continual pretraining: both backbones start from a local PyTorch file.

    `config.init.weights` is a timm / torchvision / DINOv2 `.safetensors` or `.pth`;
    `config.init.first_layer` is 'reinit' (SoftCon's choice when the band count differs) or
    'from_rgb'. DINOv2's position embedding is resampled to `config.data.image_size`.
    """
    from softcon_jax import interop  # reading .pth needs torch, imported lazily there

    kwargs = config.model.get("backbone_kwargs", {}).to_dict()
    img_size = kwargs.pop("img_size", config.data.image_size)
    _, variables = interop.import_torch(
        config.init.weights, config.model.backbone, config.data.in_channels,
        first_layer=config.init.get("first_layer", "reinit"), img_size=img_size,
        pos_embed_interpolation=config.init.get("pos_embed_interpolation", "timm"),
        seed=config.seed, **kwargs)
    params, model_state = method.with_backbone(state.params, state.model_state, variables)
    # Student and teacher now hold the same arrays, and one array placed twice can stay one
    # device buffer, which the donating train step cannot take twice: copy each repeat.
    seen = set()

    def own(x):
        if id(x) in seen:
            return jnp.array(x, copy=True)
        seen.add(id(x))
        return x

    params, model_state = jax.tree.map(own, (params, model_state))
    # Optimizer state is zeros for every optimizer here, so it stays valid.
    return jax.device_put(state.replace(params=params, model_state=model_state),
                          state_shardings)


def restore_backbone(workdir: str, step: int | None = None, which: str = "teacher"):
    """Returns (backbone module, its variables, config, step) from a training checkpoint.

    The state is restored onto a single device, whatever mesh it was trained on. Nothing is
    created in `workdir`.
    """
    ckpt = Checkpointer(workdir, async_save=False, create=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise cli.UserFileNotFoundError(
                f"No checkpoint in {ckpt.directory}; train first (python -m "
                f"softcon_jax.train ... --workdir {workdir}).")
        if step not in ckpt.all_steps():
            raise cli.UserFileNotFoundError(
                f"--step={step}: no such checkpoint in {ckpt.directory}; available steps: "
                f"{ckpt.all_steps()}.")
        config = ml_collections.ConfigDict(ckpt.restore_config(step))
        mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
        method = methods.get(config.method)(config, mesh)
        tx, _ = optim.make_optimizer(config)
        _, _, abstract, shardings = create_train_state(config, method, tx, mesh)
        state = ckpt.restore(step, abstract_with_shardings(abstract, shardings))
    finally:
        ckpt.close()
    variables = method.backbone_variables(state.model_state, state.params, which)
    return method.backbone, jax.device_get(variables), config, step

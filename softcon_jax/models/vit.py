"""Vision Transformer with the DINOv2 structure (timm `vit_*_patch14_dinov2`).

CLS token, learned position embedding (1, 1 + num_patches, D) added to CLS and patches,
pre-norm blocks with LayerNorm eps 1e-6, fused qkv with bias, exact-erf GELU MLP (ratio 4),
LayerScale (init 1e-5) on both branches, no register tokens, final LayerNorm, CLS output.
Submodule names mirror the timm keys (`blocks_3` is torch `blocks.3`).

Siamese masking: `keep_indices` (B, n_keep) selects, per sample, the patch tokens that enter
the blocks. They are gathered after the position embedding is added; CLS is always kept.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from softcon_jax.models.layers import DropPath, LayerScale, torch_default_init
from softcon_jax.models.pos_embed import dinov2_interpolate_pos_embed, resample_pos_embed
from softcon_jax.models.registry import BACKBONES, BackboneSpec, TorchLayout

Dtype = Any

_dense_init = nn.initializers.truncated_normal(0.02)  # timm init_weights_vit_timm


def _dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=_dense_init,
                    name=name)


def _layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32,
                        use_fast_variance=False, name=name)


# JAX's cuDNN attention (jax 0.10, `jax._src.cudnn.fused_attention_stablehlo.
# check_is_flash_attention`) refuses training shapes with an odd token count ("Unsupported
# sequence length Q 257, KV 257"; its rule for a bias, and the empty placeholder it passes
# without one counts as one): the ViT recipes' 16 x 16 patches + CLS. An even count passes.
CUDNN_TOKEN_MULTIPLE = 2


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                     implementation: str = "cudnn",
                     multiple: int = CUDNN_TOKEN_MULTIPLE) -> jax.Array:
    """`jax.nn.dot_product_attention` over (B, N, H, D) at a token count the kernel accepts.

    N is padded with zeros to a multiple of `multiple`; the real length goes in as
    `query_seq_lengths` / `key_value_seq_lengths` (a key padding mask: cuDNN's PADDING mask
    type, so no query attends to a padding key) and the padded query rows are cut off. The
    result equals attention over the N real tokens. No padding when N is a multiple already.
    """
    n = q.shape[1]
    padded = -(-n // multiple) * multiple
    if padded == n:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    widths = ((0, 0), (0, padded - n), (0, 0), (0, 0))
    lengths = jnp.full((q.shape[0],), n, jnp.int32)
    y = jax.nn.dot_product_attention(
        *(jnp.pad(t, widths) for t in (q, k, v)), query_seq_lengths=lengths,
        key_value_seq_lengths=lengths, implementation=implementation)
    return y[:, :n]


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv (timm layout: [q | k | v], heads inner).

    `implementation`: None (XLA: einsum, float32 softmax, einsum; any device) or 'cudnn'
    (cuDNN flash attention through `jax.nn.dot_product_attention`; NVIDIA GPUs, bf16/fp16;
    any token count, see `padded_attention`).
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        head_dim = d // self.num_heads
        qkv = _dense(3 * d, self.dtype, "qkv")(x).reshape(b, n, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (b, n, h, hd)
        if self.implementation == "cudnn":
            y = padded_attention(q, k, v, implementation="cudnn")
        elif self.implementation is None:
            logits = jnp.einsum("bqhd,bkhd->bhqk", q * head_dim ** -0.5, k)
            # Softmax in float32 so bf16 compute stays stable.
            attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
            y = jnp.einsum("bhqk,bkhd->bqhd", attn, v)
        else:
            raise ValueError(f"attention={self.implementation!r}: expected None (XLA) or "
                             "'cudnn' (config.model.backbone_kwargs.attention).")
        return _dense(d, self.dtype, "proj")(y.reshape(b, n, d))


class Mlp(nn.Module):
    """fc1 - GELU (exact erf, torch nn.GELU default) - fc2."""

    hidden_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        x = _dense(self.hidden_dim, self.dtype, "fc1")(x)
        x = nn.gelu(x, approximate=False)
        return _dense(d, self.dtype, "fc2")(x)


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale: x + ls1(attn(norm1(x))), same for MLP."""

    num_heads: int
    mlp_ratio: float = 4.0
    init_values: float = 1e-5
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        d = x.shape[-1]
        dp = DropPath(self.drop_path)
        y = _layer_norm(self.dtype, "norm1")(x)
        y = Attention(self.num_heads, self.dtype, self.attention, name="attn")(y)
        x = x + dp(LayerScale(self.init_values, name="ls1")(y), train=train)
        y = _layer_norm(self.dtype, "norm2")(x)
        y = Mlp(int(d * self.mlp_ratio), self.dtype, name="mlp")(y)
        return x + dp(LayerScale(self.init_values, name="ls2")(y), train=train)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> (B, num_patches, D) (timm `patch_embed.proj`)."""

    embed_dim: int
    patch_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        y = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    param_dtype=jnp.float32, kernel_init=torch_default_init, name="proj")(x)
        return y.reshape(y.shape[0], -1, self.embed_dim)


class VisionTransformer(nn.Module):
    """DINOv2-structured ViT for any number of input channels.

    Methods `embed(x, keep_indices)` and `encode(tokens, train=)` split `__call__` for tests
    and feature extraction (`module.apply(v, x, method=VisionTransformer.embed)`).

    Attributes:
      arch: registry / timm name, e.g. 'vit_small_patch14_dinov2'.
      img_size: square input size the position embedding is built for (input must match).
      patch_size, embed_dim, depth, num_heads, mlp_ratio: architecture.
      in_channels: input bands.
      init_values: LayerScale init.
      drop_path_rate: stochastic depth, linear over depth as timm; > 0 needs a 'dropout' rng
        in train mode.
      dtype: compute dtype (parameters stay float32).
      attention: None (XLA, the default) or 'cudnn' (cuDNN flash attention through
        `jax.nn.dot_product_attention`: NVIDIA GPUs, bf16 compute; not CPU/TPU/float32; an
        odd token count such as 16 x 16 patches + CLS is padded and masked).
      remat: recompute each block's activations in the backward pass (`nn.remat`); the
        parameters and outputs are unchanged.
    """

    arch: str = "vit_small_patch14_dinov2"
    img_size: int = 224
    patch_size: int = 14
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    in_channels: int = 3
    init_values: float = 1e-5
    drop_path_rate: float = 0.0
    bn_groups: int = 1  # accepted for a uniform build_backbone signature; a ViT has no BN
    dtype: Dtype = jnp.float32
    attention: str | None = None
    remat: bool = False

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (without CLS)."""
        return self.grid_size ** 2

    @property
    def num_features(self) -> int:
        """Feature dimension D of the CLS output."""
        return int(self.embed_dim)

    def timm_kwargs(self) -> dict:
        """kwargs such that `timm.create_model(arch, num_classes=0, **kw)` rebuilds this net."""
        kw: dict = {"in_chans": int(self.in_channels), "img_size": int(self.img_size)}
        defaults = BACKBONES.get(self.arch).defaults if self.arch in BACKBONES else {}
        for field in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"):
            if getattr(self, field) != defaults.get(field):
                kw[field] = getattr(self, field)
        return kw

    def setup(self) -> None:
        d = self.embed_dim
        if d % self.num_heads:
            raise ValueError(f"{self.arch}: embed_dim={d} is not divisible by "
                             f"num_heads={self.num_heads}.")
        self.patch_embed = PatchEmbed(d, self.patch_size, self.dtype)
        self.cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d),
                                    jnp.float32)
        self.pos_embed = self.param("pos_embed", nn.initializers.truncated_normal(0.02),
                                    (1, 1 + self.num_patches, d), jnp.float32)
        # A list attribute names its modules blocks_0, blocks_1, ... (torch blocks.0, ...).
        block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        self.blocks = [
            block_cls(self.num_heads, self.mlp_ratio, self.init_values,
                  self.drop_path_rate * i / max(self.depth - 1, 1), self.dtype,
                  self.attention)
            for i in range(self.depth)]
        self.norm = _layer_norm(self.dtype, None)

    def embed(self, x: jax.Array, keep_indices: jax.Array | None = None) -> jax.Array:
        """Patch + position embedding (+ masking) -> tokens (B, 1 + n_keep, D), CLS first."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"{self.arch}: expected NHWC input with {self.in_channels} "
                             f"channels, got shape {x.shape}.")
        if x.shape[1] != self.img_size or x.shape[2] != self.img_size:
            raise ValueError(f"{self.arch}: built for img_size={self.img_size}, got input "
                             f"{x.shape[1]}x{x.shape[2]}; build the backbone for the input size "
                             f"(position embeddings are resampled on import, not per call).")
        d = self.embed_dim
        tokens = self.patch_embed(x.astype(self.dtype))
        b = tokens.shape[0]
        tokens = tokens + self.pos_embed[:, 1:].astype(self.dtype)
        if keep_indices is not None:
            if keep_indices.ndim != 2 or keep_indices.shape[0] != b:
                raise ValueError(f"{self.arch}: keep_indices must be (batch={b}, n_keep), got "
                                 f"shape {keep_indices.shape}.")
            if keep_indices.shape[1] > self.num_patches:
                raise ValueError(f"{self.arch}: keep_indices keeps {keep_indices.shape[1]} "
                                 f"tokens but the image has {self.num_patches} patches.")
            tokens = jnp.take_along_axis(tokens, keep_indices[:, :, None].astype(jnp.int32),
                                         axis=1)
        cls = (self.cls_token + self.pos_embed[:, :1]).astype(self.dtype)
        return jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), tokens], axis=1)

    def encode(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
        """Transformer blocks + final norm -> all tokens (B, N, D)."""
        for block in self.blocks:
            tokens = block(tokens, train)
        return self.norm(tokens)

    def __call__(self, x: jax.Array, *, train: bool = False,
                 keep_indices: jax.Array | None = None) -> jax.Array:
        """x (B, H, W, C) -> CLS features (B, embed_dim) after the final norm."""
        return self.encode(self.embed(x, keep_indices), train=train)[:, 0]


# ==== PyTorch layout and registration =====================================================

_DINOV2_HUB = {"vit_small_patch14_dinov2": "dinov2_vits14",
               "vit_base_patch14_dinov2": "dinov2_vitb14",
               "vit_large_patch14_dinov2": "dinov2_vitl14"}


class ViTLayout(TorchLayout):
    """timm `vit_*_patch14_dinov2` names; DINOv2-native files are timm's plus `mask_token`.

    DINOv2 checkpoints saved with `block_chunks > 0` name blocks `blocks.<chunk>.<i>.`;
    those are renamed to `blocks.<i>.`. A position embedding of another square grid is
    resampled (bicubic, `softcon_jax.models.pos_embed`).
    """

    first_layer = "patch_embed.proj.weight"
    anchors = ("patch_embed.proj.weight", "cls_token")
    ignored = r"^(mask_token|head\.(weight|bias))$"
    formats = ("timm", "dinov2")

    def first_layer_init(self):
        return torch_default_init

    def normalize_keys(self, state_dict):
        if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in state_dict):
            state_dict = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v
                          for k, v in state_dict.items()}
        return state_dict

    def adaptable(self, key, got, want):
        return (key == "pos_embed" and len(got) == 3 and got[::2] == want[::2]
                and int(round((got[1] - 1) ** 0.5)) ** 2 == got[1] - 1)

    def adapt(self, state_dict, model, spec, *, pos_embed_antialias=True,
              pos_embed_interpolation="timm", log=None, **_):
        # NumPy only. 'timm': timm's resample_abs_pos_embed to the exact size; 'dinov2':
        # DINOv2's interpolate_pos_encoding (offset 0.1, no antialias).
        want = spec["pos_embed"][3]
        if state_dict["pos_embed"].shape != want:
            if log is not None:
                log(f"resampling pos_embed {state_dict['pos_embed'].shape} -> {want} "
                    f"({pos_embed_interpolation})")
            pos = np.asarray(state_dict["pos_embed"], np.float32)
            grid = (model.grid_size, model.grid_size)
            if pos_embed_interpolation == "dinov2":
                pos = dinov2_interpolate_pos_embed(pos, grid)
            else:
                pos = resample_pos_embed(pos, grid, antialias=pos_embed_antialias)
            state_dict = {**state_dict, "pos_embed": pos}
        return state_dict

    def export_extras(self, model, format, state_dict, sidecar):
        if format != "dinov2":
            return
        state_dict["mask_token"] = np.zeros((1, model.embed_dim), np.float32)
        kw = sidecar["timm_kwargs"]
        if set(kw) <= {"in_chans", "img_size"} and model.arch in _DINOV2_HUB:
            sidecar["dinov2_hub"] = {"model": _DINOV2_HUB[model.arch],
                                     "kwargs": {"img_size": kw["img_size"],
                                                "in_chans": kw["in_chans"],
                                                "init_values": 1e-5, "block_chunks": 0}}

    def describe(self, model):
        return f"{model.arch} (in_channels={model.in_channels}, img_size={model.img_size})"

    def describe_file(self, state_dict):
        keys = set(state_dict)
        if not {"cls_token", "patch_embed.proj.weight"} <= keys:
            return None
        w = state_dict["patch_embed.proj.weight"]
        depth = 1 + max((int(m.group(1)) for k in keys
                         if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
        return (f"ViT embed_dim={w.shape[0]} depth={depth} patch_size={w.shape[-1]} "
                f"in_chans={w.shape[1]} pos_embed tokens={state_dict['pos_embed'].shape[1]}"
                if "pos_embed" in keys else f"ViT embed_dim={w.shape[0]} depth={depth}")


LAYOUT = ViTLayout()
for _name, _dims in {"vit_small_patch14_dinov2": (384, 12, 6),
                     "vit_base_patch14_dinov2": (768, 12, 12),
                     "vit_large_patch14_dinov2": (1024, 24, 16)}.items():
    BACKBONES.register(_name, BackboneSpec(VisionTransformer, dict(
        patch_size=14, embed_dim=_dims[0], depth=_dims[1], num_heads=_dims[2], mlp_ratio=4.0,
        img_size=224), LAYOUT))

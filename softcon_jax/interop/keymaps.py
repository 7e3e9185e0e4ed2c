"""Name and layout maps between Flax variables and PyTorch (timm / torchvision / DINOv2) keys.

The Flax modules are named after the torch modules (`layer1_0` = `layer1.0`, `blocks_3` =
`blocks.3`, `downsample_0` = `downsample.0`), so one rule set serves every backbone:

  params .../kernel (4-D)  <-> ....weight   conv, HWIO <-> OIHW
  params .../kernel (2-D)  <-> ....weight   Dense (in, out) <-> Linear (out, in)
  params .../scale         <-> ....weight   LayerNorm / BatchNorm
  params .../bias, gamma, cls_token, pos_embed: same name, same layout
  batch_stats .../mean, var <-> ....running_mean, running_var (+ num_batches_tracked, int64)

Import also normalises the file's names: wrapper prefixes (`module.`, `backbone.`,
`teacher.backbone.`, ...), DINOv2 chunked blocks (`blocks.0.3.` -> `blocks.3.`), and drops
keys that are not part of the backbone (classifier `fc.*` / `head.*`, DINOv2 `mask_token`,
`num_batches_tracked`).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

_INDEXED = re.compile(r"^(blocks|layer\d+|downsample)_(\d+)$")
_PARAM_LEAF = {"scale": "weight", "bias": "bias", "gamma": "gamma"}
_STAT_LEAF = {"mean": "running_mean", "var": "running_var"}
_TOP_PARAMS = ("cls_token", "pos_embed")

def _module_path(parts: tuple[str, ...]) -> str:
    out = []
    for p in parts:
        m = _INDEXED.match(p)
        out.append(f"{m.group(1)}.{m.group(2)}" if m else p)
    return ".".join(out)


def torch_name(collection: str, path: tuple[str, ...], ndim: int) -> tuple[str, str]:
    """(torch key, layout kind) of one Flax leaf; kind is 'conv', 'dense' or 'plain'."""
    *mods, leaf = path
    prefix = _module_path(tuple(mods))
    join = lambda name: f"{prefix}.{name}" if prefix else name
    if collection == "params":
        if leaf == "kernel":
            return join("weight"), {4: "conv", 2: "dense"}.get(ndim, "plain")
        if leaf in _PARAM_LEAF:
            return join(_PARAM_LEAF[leaf]), "plain"
        if leaf in _TOP_PARAMS and not mods:
            return leaf, "plain"
    elif collection == "batch_stats" and leaf in _STAT_LEAF:
        return join(_STAT_LEAF[leaf]), "plain"
    raise ValueError(f"No PyTorch name for Flax variable {collection}/{'/'.join(path)}.")


def to_torch_layout(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return np.transpose(x, (3, 2, 0, 1))  # HWIO -> OIHW
    if kind == "dense":
        return np.transpose(x)  # (in, out) -> (out, in)
    return x


def from_torch_layout(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return np.transpose(x, (2, 3, 1, 0))  # OIHW -> HWIO
    if kind == "dense":
        return np.transpose(x)
    return x


def torch_spec(variables: Any) -> dict[str, tuple[str, tuple[str, ...], str, tuple[int, ...]]]:
    """{torch key: (collection, flax path, kind, torch shape)} for 'params' and 'batch_stats'.

    `variables` may hold arrays or `jax.ShapeDtypeStruct`s (from `jax.eval_shape`).
    """
    spec = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in flatten_dict(dict(variables.get(collection, {}))).items():
            key, kind = torch_name(collection, path, len(leaf.shape))
            shape = tuple(leaf.shape)
            if kind == "conv":
                shape = (shape[3], shape[2], shape[0], shape[1])
            elif kind == "dense":
                shape = shape[::-1]
            spec[key] = (collection, path, kind, shape)
    return spec


def bn_modules(spec: dict) -> list[str]:
    """torch prefixes of the BatchNorm modules (those with a running_mean)."""
    return [k[: -len(".running_mean")] for k in spec if k.endswith(".running_mean")]


def flax_to_torch(variables: Any) -> dict[str, np.ndarray]:
    """Flax variables -> torch state dict (NumPy) with torch names and layouts.

    BatchNorm modules also get `num_batches_tracked` (int64 scalar, 0: torch uses a fixed
    momentum, so the count is not read).
    """
    import jax  # local: keep this module importable in light tooling

    variables = jax.device_get(variables)
    out: dict[str, np.ndarray] = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in flatten_dict(dict(variables.get(collection, {}))).items():
            arr = np.asarray(leaf, dtype=np.float32)
            key, kind = torch_name(collection, path, arr.ndim)
            out[key] = np.ascontiguousarray(to_torch_layout(kind, arr))
    for prefix in bn_modules({k: None for k in out}):
        out[f"{prefix}.num_batches_tracked"] = np.array(0, dtype=np.int64)
    return out


def torch_to_flax(state_dict: dict[str, np.ndarray], spec: dict) -> dict:
    """Builds Flax variables from a matched torch state dict (keys exactly those of `spec`)."""
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for key, (collection, path, kind, _) in spec.items():
        arr = np.asarray(state_dict[key], dtype=np.float32)
        flat[(collection,) + path] = np.ascontiguousarray(from_torch_layout(kind, arr))
    return unflatten_dict(flat)


def find_prefix(keys: list[str], layout: Any, key_prefix: str | None = None) -> str:
    """The wrapper prefix before the backbone names ('' if none); prefers the EMA teacher."""
    if key_prefix is not None:
        return key_prefix
    keyset = set(keys)
    first, second = layout.anchors
    candidates = sorted({k[: -len(first)] for k in keys if k.endswith(first)
                         and k[: -len(first)] + second in keyset
                         and (k == first or k[: -len(first)].endswith("."))})
    if "" in candidates or not candidates:
        return ""
    if len(candidates) == 1:
        return candidates[0]
    teacher = [c for c in candidates if "teacher" in c]
    if len(teacher) == 1:
        return teacher[0]
    raise ValueError(f"the file holds several backbones under prefixes {candidates}; pass "
                     f"key_prefix= to choose one.")


def normalize(state_dict: dict[str, np.ndarray], layout: Any,
              key_prefix: str | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """Strips the wrapper prefix, applies the layout's renames, drops non-backbone keys.

    `layout` is the backbone's `models.TorchLayout`. Returns (normalised state dict, names
    of the dropped keys).
    """
    prefix = find_prefix(list(state_dict), layout, key_prefix)
    if prefix:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    state_dict = layout.normalize_keys(state_dict)
    ignored = sorted(k for k in state_dict if layout.is_ignored(k))
    return {k: v for k, v in state_dict.items() if k not in set(ignored)}, ignored


def describe(state_dict: dict[str, np.ndarray]) -> str:
    """A one-line guess of the architecture a state dict holds (for error messages)."""
    from softcon_jax.models import BACKBONES  # the registered layouts know their files

    for layout in {id(spec.layout): spec.layout for _, spec in BACKBONES.items()}.values():
        if (found := layout.describe_file(state_dict)) is not None:
            return found
    return "unrecognised architecture"

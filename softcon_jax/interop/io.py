"""Reading and writing PyTorch state dicts as NumPy arrays.

`.safetensors` goes through `safetensors.numpy` (no torch needed). `.pth` / `.pt` / `.bin`
import torch lazily and load with `weights_only=True` (no pickled code runs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
# Wrappers seen in released checkpoints: {'state_dict': ...} (Lightning, MoCo),
# {'model': ...} (DINOv2 training, timm), {'teacher': ...} (DINO full checkpoints).
_WRAPPER_KEYS = ("state_dict", "model", "teacher", "module")


def _is_array_like(v: Any) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype")


def _unwrap(obj: Any, path: str) -> dict:
    while isinstance(obj, dict) and not all(_is_array_like(v) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        else:
            tensors = [k for k, v in obj.items() if _is_array_like(v)]
            others = sorted(k for k in obj if k not in tensors)
            if tensors:  # tensors next to metadata (e.g. 'epoch'): keep the tensors
                return {k: obj[k] for k in tensors}
            raise ValueError(f"{path}: no state dict found; top-level keys are {others[:20]}, "
                             f"expected tensors or one of {list(_WRAPPER_KEYS)}.")
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}.")
    return obj


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch  # lazy: torch is an optional extra

    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.to(torch.float32)
    return t.numpy()


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a `.safetensors` or `.pth` file into {torch key: NumPy array}."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file.")
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(path))
    if suffix in TORCH_SUFFIXES:
        try:
            import torch
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"{path}: reading {suffix} files needs torch "
                              f"(pip install 'softcon-jax[torch]'), or convert it to "
                              f".safetensors.") from e
        obj = torch.load(path, map_location="cpu", weights_only=True)
        sd = _unwrap(obj, path)
        return {k: _torch_to_numpy(v) for k, v in sd.items()}
    raise ValueError(f"{path}: unsupported checkpoint suffix {suffix!r}; expected .safetensors "
                     f"or one of {list(TORCH_SUFFIXES)}.")


def write_state_dict(state_dict: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """Writes {torch key: array} as `.safetensors` (no torch needed) or `.pth` (needs torch).

    The file appears atomically: it is written under a temporary name in the same directory
    and renamed, so an interrupted export never replaces a good file with a partial one.
    """
    path = str(path)
    suffix = Path(path).suffix.lower()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # np.require keeps 0-d arrays 0-d (torch's num_batches_tracked has shape []);
    # np.ascontiguousarray would make them shape [1].
    arrays = {k: np.require(v, requirements="C") for k, v in state_dict.items()}
    tmp = f"{path}.tmp-{os.getpid()}"
    if suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(arrays, tmp, metadata={"format": "pt"})
    elif suffix in TORCH_SUFFIXES:
        import torch  # lazy: torch is an optional extra

        torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, tmp)
    else:
        raise ValueError(f"{path}: unsupported output suffix {suffix!r}; expected .safetensors "
                         f"or one of {list(TORCH_SUFFIXES)}.")
    os.replace(tmp, path)

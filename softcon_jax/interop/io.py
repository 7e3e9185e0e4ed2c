"""Reading and writing PyTorch state dicts as NumPy arrays.

`.safetensors` goes through `safetensors.numpy` (no torch needed). `.pth` / `.pt` / `.bin`
import torch lazily and load with `weights_only=True` (no pickled code runs).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from softcon_jax import cli

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
# Wrappers seen in released checkpoints: {'state_dict': ...} (Lightning, MoCo),
# {'model': ...} (DINOv2 training, timm), {'teacher': ...} (DINO full checkpoints).
_WRAPPER_KEYS = ("state_dict", "model", "teacher", "module")


def _is_array_like(v: Any) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype")


def umask_mode(mode: int = 0o666) -> int:
    """`mode` as the process umask lets new files have it (0644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def replace_atomic(tmp: str, path: str) -> None:
    """Gives finished file `tmp` the usual mode (per umask) and renames it to `path`.

    Writers that create files 0600 (temporary files) would otherwise leave the final file
    unreadable to the group; a crash before the rename leaves `path` untouched.
    """
    os.chmod(tmp, umask_mode())
    os.replace(tmp, path)


class WriteError(cli.UserError, OSError):
    """A file could not be written (disk full, permission denied, a library's own error);
    the message names the path and what was being written."""


@contextlib.contextmanager
def staged(path: str | os.PathLike, what: str):
    """Yields a temporary name beside `path`; renames it to `path` when the block succeeds.

    On any error the temporary file is removed and `path` keeps what it held; an error that
    is not already a user error becomes one `WriteError` naming `what` and `path`.
    """
    path = str(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        replace_atomic(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, Exception) and not isinstance(e, cli.UserError):
            raise WriteError(f"could not write {what} to {path} "
                             f"({cli.storage_error_cause(e)}); {path} is unchanged.") from e
        raise


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
            raise cli.UserValueError(
                f"{path}: no state dict found; top-level keys are {others[:20]}, "
                f"expected tensors or one of {list(_WRAPPER_KEYS)}.")
    if not isinstance(obj, dict):
        raise cli.UserValueError(f"{path}: expected a dict of tensors, got "
                                 f"{type(obj).__name__}.")
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
        raise cli.UserFileNotFoundError(f"{path}: no such checkpoint file.")
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except Exception as e:  # safetensors raises its own SafetensorError
            raise cli.UserValueError(
                f"{path}: not a readable .safetensors file ({type(e).__name__}: {e}); "
                f"expected a state dict written by safetensors (e.g. an export of this "
                f"project or a timm/Hugging Face release).") from None
    if suffix in TORCH_SUFFIXES:
        try:
            import torch
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"{path}: reading {suffix} files needs torch "
                              f"(pip install 'softcon-jax[torch]'), or convert it to "
                              f".safetensors.") from e
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a file that is no torch.save output fails in many ways
            cause = " ".join(str(e).split())[:200]
            raise cli.UserValueError(
                f"{path}: not a PyTorch checkpoint that torch.load(weights_only=True) can "
                f"read ({type(e).__name__}: {cause}); expected a state dict saved with "
                f"torch.save (a .pth/.pt/.bin of tensors), or a .safetensors file.") from None
        sd = _unwrap(obj, path)
        return {k: _torch_to_numpy(v) for k, v in sd.items()}
    raise cli.UserValueError(f"{path}: unsupported checkpoint suffix {suffix!r}; expected "
                             f".safetensors or one of {list(TORCH_SUFFIXES)}.")


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
    if suffix != ".safetensors" and suffix not in TORCH_SUFFIXES:
        raise cli.UserValueError(f"{path}: unsupported output suffix {suffix!r}; expected "
                                 f".safetensors or one of {list(TORCH_SUFFIXES)}.")
    # Renamed into place with the mode per umask (0644), like any file the user writes.
    with staged(path, "the weights") as tmp:
        if suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file(arrays, tmp, metadata={"format": "pt"})
        else:
            import torch  # lazy: torch is an optional extra

            torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, tmp)

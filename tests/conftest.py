"""Test setup: 8 simulated CPU devices, so every test exercises the sharded path."""

import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

# TensorFlow (which tensorflow-datasets needs) and Triton (which torchvision pulls in) each
# bundle LLVM; when TensorFlow loads first, Triton's import aborts the process ("Option ...
# registered more than once"). Loading torchvision first is safe, so do it before any test
# module can import TensorFlow.
import torchvision  # noqa: E402,F401

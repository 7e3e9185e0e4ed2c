"""NVIDIA GPU clusters for the planner: XLA's description of each GPU and its datasheet rates.

`python -m softcon_jax.plan --accelerator-type h100-16` compiles for 2 hosts x 8 H100 on a
machine with no GPU: JAX's CUDA plugin (`pip install softcon-jax[gpu-plan]`) describes the
devices from a `GpuTargetConfigProto` (`jax.experimental.topologies.get_topology_desc(
platform="cuda", target_config=TEXT, topology="<partitions>x<hosts>x<GPUs per host>")`)
and XLA:GPU compiles for them on the CPU. The `*.txtpb` files beside this module are XLA's
own descriptions (openxla/xla `xla/backends/gpu/target_config/specs/`), each naming its
source and what was changed.

Rates (per GPU, from NVIDIA's datasheets; "dense" = without 2:4 sparsity, which the
datasheets' headline figures assume; NVLink one direction = half the datasheet's total):
  a100: A100 80GB SXM (A100 datasheet): 312 TFLOP/s bf16, 2,039 GB/s HBM2e, NVLink 600 GB/s
        total; DGX A100: one 200 Gb/s HDR InfiniBand adapter per GPU.
  h100: H100 SXM (H100 Tensor Core GPU datasheet): 989 TFLOP/s bf16 (1,979 sparse), 3.35 TB/s
        HBM3, NVLink 900 GB/s total; DGX H100: one 400 Gb/s ConnectX-7 per GPU.
  h200: H200 SXM (H200 datasheet): 989 TFLOP/s bf16, 4.8 TB/s HBM3e, NVLink 900 GB/s total;
        DGX H200: one 400 Gb/s ConnectX-7 per GPU.
  b200: HGX B200 (datasheet: 36 PFLOP/s sparse bf16 per 8 GPUs = 2.25 dense per GPU), 8 TB/s
        HBM3e, NVLink 5 1.8 TB/s total; DGX B200: one 400 Gb/s ConnectX-7 per GPU.
The HBM capacity is the description's `device_memory_size` (what XLA compiles against).

Usable memory: JAX preallocates `XLA_PYTHON_CLIENT_MEM_FRACTION` of the GPU's memory (0.75
by default; JAX docs "GPU memory allocation"), and with preallocation off that fraction is
still the allocator's limit. A step fits when XLA's `memory_analysis()` total is within it:
XLA:GPU compiles oversized programs without complaint, so the planner checks.
"""

from __future__ import annotations

import dataclasses
import os
import re

from softcon_jax import cli

MEM_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
DEFAULT_MEM_FRACTION = 0.75  # JAX's default preallocation
DEFAULT_GPUS_PER_HOST = 8
NO_TRITON_GEMM = {"xla_gpu_enable_triton_gemm": False}  # matmuls through cuBLAS


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str                  # accelerator-type prefix
    target_file: str           # the GpuTargetConfigProto text beside this module
    peak_bf16_flops: float     # dense tensor-core rate
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float  # per GPU, one direction
    network_bytes_per_s: float  # per GPU across hosts, one direction

    def target_config(self) -> str:
        with open(os.path.join(os.path.dirname(__file__), self.target_file)) as f:
            return f.read()

    def hbm_bytes(self) -> int:
        return int(re.search(r"device_memory_size:\s*(\d+)", self.target_config()).group(1))


GPUS = {
    "a100": Gpu("a100", "a100_sxm_80.txtpb", 312e12, 2039e9, 300e9, 200e9 / 8),
    "h100": Gpu("h100", "h100_sxm.txtpb", 989e12, 3350e9, 450e9, 400e9 / 8),
    "h200": Gpu("h200", "h200.txtpb", 989e12, 4800e9, 450e9, 400e9 / 8),
    "b200": Gpu("b200", "b200.txtpb", 2250e12, 8000e9, 900e9, 400e9 / 8),
}


@dataclasses.dataclass(frozen=True)
class Cluster:
    gpu: Gpu
    num_gpus: int
    gpus_per_host: int

    @property
    def hosts(self) -> int:
        return max(1, self.num_gpus // self.gpus_per_host)

    @property
    def topology(self) -> str:  # <partitions>x<hosts>x<GPUs per host>
        return f"1x{self.hosts}x{min(self.num_gpus, self.gpus_per_host)}"

    def report_fields(self) -> dict:
        fraction = memory_fraction()
        return {"gpus_per_host": self.gpus_per_host, "hosts": self.hosts,
                "memory_fraction": fraction, "usable_bytes": int(fraction * self.gpu.hbm_bytes())}

    def rates(self) -> tuple[float, float]:
        return self.gpu.peak_bf16_flops, self.gpu.hbm_bytes_per_s

    def collective_seconds(self, sent: int) -> dict:
        """Time for the bytes a GPU sends per step at NVLink, and at the network across hosts
        (NCCL's rings and trees cross each host boundary; one NIC per GPU)."""
        return {"collective_s_at_nvlink": sent / self.gpu.nvlink_bytes_per_s,
                "collective_s_at_network": (sent / self.gpu.network_bytes_per_s
                                            if self.hosts > 1 else None)}

    @staticmethod
    def compile(lowered, report: dict):
        """`lowered.compile()`, or without Triton GEMMs where XLA cannot tile one.

        Without a device XLA:GPU cannot autotune and takes default Triton tilings; for some
        fusions it finds none ("Couldn't find output tile sizes", seen with the ViT recipes'
        steps at 64 and 512 per GPU). On a GPU the autotuner would fall back to cuBLAS; so
        does this (`xla_gpu_enable_triton_gemm=False`), and the report says so
        (`compiler_options`).
        """
        try:
            return lowered.compile()
        except Exception as e:  # jax.errors.JaxRuntimeError: INTERNAL
            if "Couldn't find output tile sizes" not in str(e):
                raise
        report["compiler_options"] = dict(NO_TRITON_GEMM)
        return lowered.compile(dict(NO_TRITON_GEMM))

    @staticmethod
    def bytes_accessed(compiled) -> float:
        """XLA's "bytes accessed" of the optimised per-GPU program (fused as it will run)."""
        modules = compiled.runtime_executable().hlo_modules()
        return float(_cost(modules[0]).get("bytes accessed", 0.0))

    def devices(self):
        from jax.experimental import topologies

        try:
            return topologies.get_topology_desc(
                platform="cuda", topology_name="", target_config=self.gpu.target_config(),
                topology=self.topology).devices
        except Exception as e:  # no CUDA plugin, or one that cannot describe the GPU
            raise cli.UserValueError(
                f"Cannot describe {self.num_gpus} x {self.gpu.name} ({self.topology}): "
                f"{str(e).splitlines()[0][:200]}. Install JAX's CUDA plugin and ptxas: "
                "pip install 'softcon-jax[gpu-plan]'.") from None


def is_gpu_type(text: str) -> bool:
    return text.strip().split("-")[0] in GPUS


def valid_types(gpus_per_host: int = DEFAULT_GPUS_PER_HOST) -> str:
    sizes = sorted({n for n in (1, 2, 4, 8) if n <= gpus_per_host} | {gpus_per_host})
    return (", ".join(f"{g}-N" for g in GPUS) + f" (N GPUs: {', '.join(map(str, sizes))} or "
            f"a multiple of {gpus_per_host}, the GPUs per host)")


def parse_accelerator_type(text: str, gpus_per_host: int | None = None,
                           num_slices: int = 1) -> Cluster:
    """'h100-16' -> 16 H100 on 2 hosts of 8 (N < gpus_per_host: one host of N)."""
    if num_slices != 1:
        raise cli.UserValueError(f"--num-slices={num_slices}: slices are for TPUs; a GPU "
                                 "cluster's hosts are in --accelerator-type (h100-16 = 2 hosts "
                                 "x 8, see --gpus-per-host).")
    per_host = gpus_per_host or DEFAULT_GPUS_PER_HOST
    if per_host < 1:
        raise cli.UserValueError(f"--gpus-per-host={per_host}; expected a positive integer.")
    m = re.fullmatch(r"([a-z]\d+)-(\d+)", text.strip())
    gpu = GPUS.get(m.group(1)) if m else None
    n = int(m.group(2)) if m else 0
    if gpu is None or n < 1 or (n > per_host and n % per_host) or (
            n < per_host and per_host % n):
        raise cli.UserValueError(
            f"--accelerator-type={text!r}: unknown GPU cluster. Valid types: "
            f"{valid_types(per_host)}.")
    return Cluster(gpu, n, per_host)


def report_text(r: dict) -> tuple[str, list[str]]:
    """(the collective time, notes) of a GPU plan's report, for `plan.format_report`."""
    at = f"{r['collective_s_at_nvlink'] * 1e3:.3g} ms at NVLink"
    if r["collective_s_at_network"] is not None:
        at += f", {r['collective_s_at_network'] * 1e3:.3g} ms at the network between hosts"
    notes = []
    if r.get("flops_loops_counted_once"):
        notes.append(f"  ({r['flops_loops_counted_once']} loops: their FLOPs are counted for "
                     "one iteration)")
    if r.get("compiler_options"):
        notes.append(f"  (compiled with {r['compiler_options']}: XLA found no Triton tiling "
                     "for a matmul without a device to autotune on)")
    return at, notes


def memory_fraction() -> float:
    """The share of a GPU's memory a JAX process may use (see the module docstring)."""
    text = os.environ.get(MEM_FRACTION_ENV)
    if text is None:
        return DEFAULT_MEM_FRACTION
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise cli.UserValueError(f"{MEM_FRACTION_ENV}={text!r}: expected a number in (0, 1] "
                                 "(JAX's share of each GPU's memory).")
    return value


# ==== What a deviceless GPU executable does not say ======================================

def _cost(hlo_module) -> dict:
    """XLA's cost analysis of an HLO module, run by the CPU client (any module parses)."""
    import jax
    from jax._src.lib import xla_client

    return xla_client._xla.hlo_module_cost_analysis(jax.devices("cpu")[0].client, hlo_module)


def flops_per_device(lowered, jaxpr, num_devices: int) -> tuple[float, int]:
    """(FLOPs per device per step, while loops XLA counted once) of a jit program.

    A deviceless GPU executable has no `cost_analysis()`, and in the optimised program XLA
    cannot see into cuDNN convolutions or attention (custom calls). So: XLA's cost analysis
    of the program before optimisation (`lowered`: the whole SPMD program, convolutions
    and matmuls still plain ops), plus cuDNN attention counted from its shapes in the
    program's `jaxpr` (`hlo.cudnn_attention_flops`), divided by the devices: the batch is
    split evenly, so each device computes its share. What every device repeats (the
    replicated optimizer update) is counted once; it is small next to the model. A loop
    body is counted once whatever its trip count (XLA's convention); the count of such
    loops comes back.
    """
    from softcon_jax.hlo import cudnn_attention_flops

    computation = lowered.compiler_ir("hlo")
    text = computation.as_hlo_text()
    flops = float(_cost(computation.get_hlo_module()).get("flops", 0.0))
    flops += cudnn_attention_flops(jaxpr)
    return flops / num_devices, len(re.findall(r"\swhile\(", text))


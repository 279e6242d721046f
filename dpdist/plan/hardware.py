"""The devices ``dpdist plan --hardware`` knows: capacity, peak rates and links, from the vendors' data sheets.

Capacities are what ``torch.cuda.get_device_properties`` reports (a little below the marketing GB).
Peak FLOP/s are dense (no sparsity); fp32 is the plain fp32 rate, since PyTorch leaves TF32 matmuls off
by default.  Link rates are per GPU and per direction: NVLink inside a node, the NIC between nodes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

GIB = 2**30
# What a rank cannot use for tensors: the CUDA context, NCCL's buffers and the caching allocator's
# fragmentation.  A plan "fits" when its peak is at most (1 - RESERVE) of the capacity.
RESERVE = 0.08
# The fraction of the peak FLOP/s, memory bandwidth and link rate a step reaches: a stated guess for
# well-shaped transformer matmuls until a GPU measurement fits it (``--efficiency`` overrides it).
DEFAULT_EFFICIENCY = 0.5
# A CPU rank's memory beyond its tensors once its first step has run (oneDNN's and the thread pools'
# buffers, autograd's engine): what ``dpdist bench --backend`` measured beyond the tensors of the bench
# model here, 25-80 MiB per process over native, ZeRO and fsdp at (1,1), (2,1) and (1,2).
CPU_RUNTIME_BYTES = 64 * 2**20
# Bytes of device memory the GPU's keyed noise (torch's ChaCha20 in int64 and the float64 Box-Muller of
# ``dpdist.privacy.noise``, run op by op) reads and writes per normal: what a dispatch-level count of
# its operators' tensors gives (tests/test_plan_collectives.py recounts it).  Every op is elementwise,
# so the draw runs at the memory bandwidth; unmeasured on a GPU.
DEVICE_NOISE_BYTES_PER_NORMAL = 9829
# The CPU's keyed normals per second and rank: OpenSSL's ChaCha20 and the same transform, 1 thread
# (BENCHMARKS.md "Noise generator", benchmarks/noise_rate.py, median).
CPU_NOISE_NORMALS_PER_S = 57.4e6


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_bytes: float  # per device
    bf16_flops: float  # peak dense FLOP/s
    fp32_flops: float
    memory_bandwidth: float  # bytes/s
    intra_node_bandwidth: float  # bytes/s per device and direction (NVLink)
    inter_node_bandwidth: float  # bytes/s per device and direction (network)
    devices_per_node: int
    runtime_bytes: float = 0.0  # what a process holds beyond its tensors, where the device's tensors share it
    noise_rate: float | None = None  # keyed normals per second; None: the GPU path at the memory bandwidth

    def peak_flops(self, precision: str) -> float:
        return self.bf16_flops if precision == "bf16" else self.fp32_flops

    @property
    def noise_normals_per_s(self) -> float:
        return self.noise_rate if self.noise_rate is not None else self.memory_bandwidth / DEVICE_NOISE_BYTES_PER_NORMAL

    @property
    def usable_bytes(self) -> float:
        return self.memory_bytes * (1 - RESERVE)


def _cpu() -> Hardware:
    """This machine: its RAM, and rates of the project's 2-core CPU (AVX2 FMA at about 2.5 GHz: 2 cores x
    32 fp32 FLOP/cycle; bf16 matmuls run no faster there); loopback gloo stands in for the links."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware("cpu", float(memory), 160e9, 160e9, 20e9, 5e9, 5e9, os.cpu_count() or 1, CPU_RUNTIME_BYTES,
                    CPU_NOISE_NORMALS_PER_S)


HARDWARE = {
    "h100-80gb": Hardware("h100-80gb", 79.1 * GIB, 989e12, 67e12, 3.35e12, 450e9, 50e9, 8),
    "h200-141gb": Hardware("h200-141gb", 139.8 * GIB, 989e12, 67e12, 4.8e12, 450e9, 50e9, 8),
    "a100-80gb": Hardware("a100-80gb", 79.2 * GIB, 312e12, 19.5e12, 2.039e12, 300e9, 25e9, 8),
}
NAMES = (*HARDWARE, "cpu")


def hardware(name: str) -> Hardware:
    if name == "cpu":
        return _cpu()
    if name not in HARDWARE:
        raise ValueError(f"--hardware must be one of {', '.join(NAMES)}; got {name!r}")
    return HARDWARE[name]

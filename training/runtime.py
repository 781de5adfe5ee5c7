"""Where and how the computation runs: device, precision, processes, memory readings."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None = fp32
    channels_last: bool
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` on this runtime's device, in its memory format."""
        return model.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)


def cpu_info() -> tuple[str, set[str] | None]:
    """/proc/cpuinfo's first model name and flags: ('unknown CPU', None) where it cannot be read."""
    model, flags = "unknown CPU", None
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and flags is None:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: where bf16 autocast pays off on the CPU; elsewhere it is emulated and
    slower than fp32 (docs/training.md)."""
    flags = cpu_info()[1] or set()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_isa(flags: set[str]) -> str:
    """The vector instructions that set this model's CPU speed, from /proc/cpuinfo's flags:
    int8 and bf16 speeds differ severalfold between them, so a CPU figure means little without
    them (docs/benchmark.md)."""
    if "amx_int8" in flags:
        return "AMX"
    if "avx512_vnni" in flags:
        return "AVX-512 VNNI"
    if "avx512f" in flags:
        return "AVX-512, no VNNI"
    if "avx_vnni" in flags:
        return "AVX2 + AVX-VNNI"
    if "avx2" in flags:
        return "AVX2, no VNNI"
    return "no AVX2"


def hardware_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' or '2-core AMD EPYC (AVX2, no VNNI)': what a README figure should name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model, flags = cpu_info()
    return f"{os.cpu_count()}-core {model}" + (f" ({cpu_isa(flags)})" if flags is not None else "")


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def make_runtime(device: str, amp: str, channels_last: str) -> Runtime:
    """`amp`/`channels_last`: 'auto' picks what was measured to help on this device."""
    rank, world = 0, 1
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dev = select_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if amp == "auto":
        bf16 = torch.cuda.is_bf16_supported() if dev.type == "cuda" else cpu_has_bf16()
        amp_dtype = torch.bfloat16 if bf16 else None
    else:
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    cl = channels_last != "off"  # auto = on: faster convolutions on CPUs and GPUs (docs/decisions.md)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(dev, amp_dtype, cl, rank, world)


def all_reduce_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return (read_status_kb("VmHWM") or 0) / 1024


def read_status_kb(field: str) -> int | None:
    """A field of /proc/self/status in kB (VmRSS, VmHWM), or None off Linux."""
    try:
        found = re.search(rf"^{field}:\s+(\d+)", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(found[1]) if found else None


def reset_peak_rss() -> bool:
    """Reset VmHWM (peak RSS) to the current RSS (Linux: 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False

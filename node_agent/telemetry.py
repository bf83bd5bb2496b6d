"""Host readings for status: memory (unified on Apple silicon), load, uptime."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass

import psutil

UNIFIED_MEMORY = platform.system() == "Darwin" and platform.machine() == "arm64"


def _chip() -> str:
    """The processor's name: Apple's chip ("Apple M2 Ultra", from sysctl) or the CPU model
    (/proc/cpuinfo); the machine type when neither says. Read once, at import."""
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


CHIP = _chip()
CPU_CORES = os.cpu_count() or 0


@dataclass(frozen=True)
class HostMemory:
    total_bytes: int
    available_bytes: int
    process_rss_bytes: int
    unified: bool


def host_memory() -> HostMemory:
    vm = psutil.virtual_memory()
    rss = psutil.Process(os.getpid()).memory_info().rss
    return HostMemory(vm.total, vm.available, rss, UNIFIED_MEMORY)


def cpu_load_1m() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization: float  # 0..1, over nvidia-smi's last sample period


_NVIDIA_QUERY = (
    "nvidia-smi",
    "--query-gpu=index,name,memory.used,memory.total,utilization.gpu",
    "--format=csv,noheader,nounits",
)


def parse_nvidia_smi(text: str) -> list[GpuReading]:
    """nvidia-smi's CSV (MiB and percent) as readings; rows it could not read are skipped."""
    out = []
    for row in text.splitlines():
        cells = [c.strip() for c in row.split(",")]
        if len(cells) != 5:
            continue
        try:
            index, used, total = int(cells[0]), float(cells[2]), float(cells[3])
        except ValueError:
            continue
        try:
            util = float(cells[4]) / 100.0
        except ValueError:  # "[N/A]" on some boards
            util = 0.0
        out.append(GpuReading(index, cells[1], int(used * 2**20), int(total * 2**20), util))
    return out


def gpu_readings(timeout_s: float = 5.0) -> list[GpuReading]:
    """NVIDIA GPUs on this host (empty without nvidia-smi, e.g. on a Mac). Blocking: call
    it off the event loop."""
    import shutil
    import subprocess

    if shutil.which(_NVIDIA_QUERY[0]) is None:
        return []
    try:
        done = subprocess.run(
            _NVIDIA_QUERY, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_nvidia_smi(done.stdout) if done.returncode == 0 else []

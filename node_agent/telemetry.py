"""Host readings for status: memory (unified on Apple silicon), load, uptime."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import psutil

UNIFIED_MEMORY = platform.system() == "Darwin" and platform.machine() == "arm64"


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

"""What a run was computed with, beyond its config: the things that move the last bits of the weights.

A run is bit-identical to another of the same config only on the same torch build, device kind and
intra-op thread count (docs/reproducibility.md). Each checkpoint keeps this record and summary.json
shows it; a resumed run compares its own with the checkpoint's and warns when they differ.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch


def usable_cores() -> int:
    """Cores this process may run on (a container or `taskset` may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def environment(device: torch.device) -> dict[str, Any]:
    """The torch build, device, thread counts and determinism settings of this process."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "torch": str(torch.__version__),  # a plain str: TorchVersion is not weights_only-loadable
        "python": platform.python_version(),
        "device": f"{device.type}: {name}",
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key old -> new` for every recorded setting that differs."""
    return [f"{k} {saved.get(k)} -> {current.get(k)}" for k in current if saved.get(k) != current.get(k)]

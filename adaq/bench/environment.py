"""Where a benchmark ran: the GPU (name, clocks, memory, driver), the software versions and the command line."""

import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

NVIDIA_SMI_FIELDS = ("name", "driver_version", "memory.total", "clocks.sm", "clocks.mem", "clocks.max.sm",
                     "clocks.max.mem", "power.limit", "temperature.gpu", "pstate")
PACKAGES = ("adaq", "torch", "transformers", "triton", "nvidia-cutlass", "compressed-tensors", "numpy")


def describe(device: torch.device) -> dict:
    return {
        "device": gpu_description(device) if device.type == "cuda" else {"name": "CPU", "type": "cpu",
                                                                         "processor": platform.processor() or platform.machine()},
        "versions": versions(),
        "command": command_line(),
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "kernel_sources": kernel_sources(),
    }


def gpu_description(device: torch.device) -> dict:
    properties = torch.cuda.get_device_properties(device)
    return {
        "name": properties.name, "type": "cuda", "compute_capability": f"{properties.major}.{properties.minor}",
        "multiprocessors": properties.multi_processor_count, "memory_bytes": properties.total_memory,
        "cuda_runtime": torch.version.cuda, "nvidia_smi": nvidia_smi(device.index or 0),
    }


def nvidia_smi(index: int) -> dict:
    """Clocks, power limit and driver as nvidia-smi reports them now ({} where nvidia-smi is missing)."""
    query = ["nvidia-smi", f"--id={index}", f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}", "--format=csv,noheader"]
    try:
        line = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(zip(NVIDIA_SMI_FIELDS, (value.strip() for value in line.split(","))))


def versions() -> dict:
    found = {"python": sys.version.split()[0]}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    found["torch_cuda"] = torch.version.cuda
    return found


def command_line() -> str:
    program = Path(sys.argv[0]).name if sys.argv else "adaq"
    return shlex.join(["adaq" if program in ("adaq", "-c", "__main__.py", "cli.py") else program, *sys.argv[1:]])


def git_dirty() -> bool | None:
    """Whether the tree differs from that commit (a copied tree may carry an older .git: the sources hash says)."""
    try:
        root = Path(__file__).resolve().parents[2]
        result = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        return bool(result.stdout.strip()) if result.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def kernel_sources() -> dict:
    """Hashes of the CUDA sources the run was built from (the build caches' keys)."""
    from adaq.kernels import build, fp8_gemm

    return {"kernels": build.source_hash(), "fp8": fp8_gemm.source_hash()}


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        result = subprocess.run(["git", "-C", str(root), "rev-parse", "--verify", "-q", "HEAD"],
                                capture_output=True, text=True, timeout=10)
        return result.stdout.strip() if result.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None

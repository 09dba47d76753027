"""Building adaq's CUDA kernels: one torch extension for `8.9+PTX`, and an nvcc-only compile check.

The extension (sm_89 machine code + compute_89 PTX, so an H100 runs the same Ada instruction stream through the
PTX) is built on first use into `$ADAQ_CACHE/kernels/<hash of the sources and flags>/` and reused after. The .cu
files include no torch header, so `compile_check` compiles them with plain nvcc on machines without a GPU and reads
the PTX (and, where cuobjdump exists, the SASS) for the instructions each kernel is meant to use.
"""

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
CUDA_SOURCES = ("nvfp4_gemm.cu", "attention.cu", "elementwise.cu", "moe.cu", "gated_delta.cu")
BINDING = "binding.cpp"
HEADERS = ("common.cuh",)
ARCH_LIST = "8.9+PTX"
NVCC_FLAGS = ("-O3", "-lineinfo", "--expt-relaxed-constexpr")
STANDALONE_FLAGS = ("-std=c++17",)  # torch picks the standard for the extension build

# What each source must contain in its PTX, and what no Ada path may contain (Hopper-only instructions).
REQUIRED_PTX = {
    "nvfp4_gemm.cu": ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
                      "ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32", "fma.rn.bf16x2", "shf.r.wrap.b32"),
    "attention.cu": ("cvt.rn.f16x2.e4m3x2", "ld.global.nc.v4", "shfl.sync.bfly", "div.rn.f32",
                     "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
                     "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", "movmatrix.sync.aligned.m8n8.trans.b16",
                     "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16", "ldmatrix.sync.aligned.m8n8.x4.shared.b16"),
    "elementwise.cu": ("rsqrt.approx.f32",),
    "moe.cu": ("shfl.sync.bfly",),
    "gated_delta.cu": ("ld.global.cs.f32", "st.global.cs.f32", "shfl.sync.bfly"),
}
REQUIRED_SASS = {
    "nvfp4_gemm.cu": ("HMMA.16816.F32.BF16", "HFMA2.BF16_V2", "SHF.R.W.U32", "LDG.E.NA.128"),
    "attention.cu": ("F2FP", "HMMA.16816.F32", "MOVM.16.MT88", "LDSM.16.MT88.4", "LDSM.16.M88.4"),
}
FORBIDDEN_PTX = ("wgmma", "cp.async.bulk", "setmaxnreg", "cluster", "mbarrier.try_wait", "tcgen05")


def cache_root() -> Path:
    return Path(os.environ.get("ADAQ_CACHE") or Path.home() / ".cache" / "adaq") / "kernels"


def source_hash() -> str:
    digest = hashlib.sha256()
    for name in (*CUDA_SOURCES, BINDING, *HEADERS):
        digest.update(name.encode())
        digest.update((CSRC / name).read_bytes())
    digest.update(" ".join((ARCH_LIST, *NVCC_FLAGS)).encode())
    return digest.hexdigest()[:16]


_EXTENSION = None
_LOAD_ERROR: str | None = None


def load(verbose: bool = False):
    """Build (first use) or load (cached) the extension; raises AdaqError with the reason when it cannot."""
    global _EXTENSION, _LOAD_ERROR
    if _EXTENSION is not None:
        return _EXTENSION
    from adaq.errors import AdaqError

    if _LOAD_ERROR is not None:
        raise AdaqError(_LOAD_ERROR)
    try:
        _EXTENSION = _build(verbose)
    except Exception as error:  # the compiler's and loader's errors come in many types
        _LOAD_ERROR = f"adaq's CUDA kernels could not be built: {str(error).strip().splitlines()[-1][:500]}"
        raise AdaqError(_LOAD_ERROR) from error
    return _EXTENSION


def _build(verbose: bool):
    import torch
    from torch.utils import cpp_extension

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    digest = source_hash()
    build_dir = cache_root() / digest
    build_dir.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = ARCH_LIST
    try:
        return cpp_extension.load(
            name=f"adaq_kernels_{digest}",
            sources=[str(CSRC / name) for name in (BINDING, *CUDA_SOURCES)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=list(NVCC_FLAGS),
            build_directory=str(build_dir),
            verbose=verbose,
        )
    finally:
        if previous is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous


def available() -> bool:
    """True when a CUDA GPU is visible and the extension builds or is cached."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        load()
        return True
    except Exception:
        return False


# ---- compile check (no GPU needed) -----------------------------------------------------------------------------

_PTXAS_FUNCTION = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _nvcc() -> str:
    from adaq.errors import AdaqError

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise AdaqError("nvcc not found on PATH: install the CUDA toolkit (12.4 or newer) to compile for sm_89")
    return nvcc


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def _parse_ptxas(text: str) -> dict[str, dict]:
    kernels, current = {}, None
    for line in text.splitlines():
        if match := _PTXAS_FUNCTION.search(line):
            current = match.group(1)
            kernels[current] = {}
        elif current and (match := _PTXAS_SPILL.search(line)):
            kernels[current].update(stack_bytes=int(match.group(1)), spill_stores=int(match.group(2)),
                                    spill_loads=int(match.group(3)))
        elif current and (match := _PTXAS_USAGE.search(line)):
            kernels[current]["registers"] = int(match.group(1))
    return kernels


def _check_source(name: str, arch: str, workdir: Path, sass: bool) -> dict:
    nvcc = _nvcc()
    ptx = workdir / f"{name}.ptx"
    compute = arch.replace("sm_", "compute_")
    result = _run([nvcc, f"-arch={compute}", "-ptx", *NVCC_FLAGS, *STANDALONE_FLAGS, str(CSRC / name), "-o", str(ptx)])
    if result.returncode != 0:
        return {"ok": False, "error": result.stderr.strip()[-2000:]}
    text = ptx.read_text()
    cubin = workdir / f"{name}.cubin"
    assembled = _run(["ptxas", f"-arch={arch}", "-v", "-O3", str(ptx), "-o", str(cubin)])
    if assembled.returncode != 0:
        return {"ok": False, "error": assembled.stderr.strip()[-2000:]}
    kernels = _parse_ptxas(assembled.stderr + assembled.stdout)
    present = {instr: instr in text for instr in REQUIRED_PTX.get(name, ())}
    forbidden = [instr for instr in FORBIDDEN_PTX if re.search(rf"\b{re.escape(instr)}\b", text)]
    entry = {"ptx_bytes": len(text), "kernels": kernels, "required_ptx": present, "forbidden_ptx": forbidden,
             "spills": sum(k.get("spill_stores", 0) + k.get("spill_loads", 0) for k in kernels.values())}
    ok = all(present.values()) and not forbidden
    if sass and shutil.which("cuobjdump"):
        dump = _run(["cuobjdump", "-sass", str(cubin)]).stdout
        entry["required_sass"] = {instr: instr in dump for instr in REQUIRED_SASS.get(name, ())}
        ok = ok and all(entry["required_sass"].values())
    entry["ok"] = ok
    return entry


def compile_check(arch: str = "sm_89", sass: bool = True, sources: tuple[str, ...] = CUDA_SOURCES,
                  progress=None) -> dict:
    """Compile every kernel source for `arch` with nvcc (PTX) and ptxas (machine code, -v); report registers and
    spills per kernel, which intended instructions the PTX (and SASS, where cuobjdump exists) holds, and that no
    Hopper-only instruction slipped in. Returns {"ok", "arch", "nvcc", "sources": {name: {...}}, "error"?}.
    `progress(name, entry)`, if given, is called (from a worker thread) as each source starts (entry None) and
    finishes."""
    from adaq.errors import AdaqError

    if not re.fullmatch(r"sm_\d+", arch):
        raise AdaqError(f"--arch must look like sm_89, got {arch!r}")
    nvcc = _nvcc()
    version = _run([nvcc, "--version"]).stdout.strip().splitlines()[-1]
    with tempfile.TemporaryDirectory(prefix="adaq-compile-") as tmp:
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            results = dict(zip(sources, pool.map(lambda s: _checked(s, arch, Path(tmp), sass, progress), sources)))
    ok = all(entry["ok"] for entry in results.values())
    report = {"ok": ok, "arch": arch, "nvcc": version, "sources": results}
    if not ok:
        failed = [name for name, entry in results.items() if not entry["ok"]]
        report["error"] = f"compile check for {arch} failed in {', '.join(failed)}: " + "; ".join(
            entry.get("error") or _missing(entry) for name, entry in results.items() if not entry["ok"])
    return report


def _checked(name: str, arch: str, workdir: Path, sass: bool, progress) -> dict:
    if progress is not None:
        progress(name, None)
    entry = _check_source(name, arch, workdir, sass)
    if progress is not None:
        progress(name, entry)
    return entry


def _missing(entry: dict) -> str:
    missing = [i for i, ok in {**entry.get("required_ptx", {}), **entry.get("required_sass", {})}.items() if not ok]
    parts = [f"missing {', '.join(missing)}"] if missing else []
    if entry.get("forbidden_ptx"):
        parts.append(f"Hopper-only {', '.join(entry['forbidden_ptx'])}")
    return " and ".join(parts) or "failed"

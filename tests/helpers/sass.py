"""Disassembling machine code in CPU tests: cuobjdump (it runs nvdisasm beside it) from PATH, else from the
nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm wheels (dev extra)."""

import os
import shutil
import subprocess
from pathlib import Path


def cuobjdump() -> str | None:
    if shutil.which("cuobjdump") and shutil.which("nvdisasm"):
        return shutil.which("cuobjdump")
    try:
        import nvidia
    except ImportError:
        return None
    found = [p for root in nvidia.__path__ for p in sorted(Path(root).glob("cu*/bin/cuobjdump"))
             if (p.parent / "nvdisasm").exists()]
    return str(found[0]) if found else None


def sass_of(cubin: Path) -> str:
    tool = Path(cuobjdump())
    env = {**os.environ, "PATH": f"{tool.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([str(tool), "-sass", str(cubin)], capture_output=True, text=True, check=True, env=env,
                          timeout=300).stdout

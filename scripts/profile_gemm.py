"""One decode GEMM launch for Nsight Compute (scripts/gpu_kernels.sh profiles it when PROFILE=1)."""
import sys

import torch

from adaq.bench import microbench
from adaq.kernels import ops

n, k, m = (int(a) for a in sys.argv[1:4]) if len(sys.argv) > 3 else (24576, 4096, 1)
weight = microbench._random_weight(n, k, torch.Generator(device="cuda").manual_seed(0))
x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
for _ in range(3):
    ops.nvfp4_linear(x, weight)
torch.cuda.synchronize()

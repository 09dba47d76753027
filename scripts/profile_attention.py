"""Prefill attention under Nsight Compute (device script): three eager calls of one case, for `ncu -k regex:...`.

    ncu --section SpeedOfLight --section WarpStateStats -k regex:prefill_flash --launch-skip 1 --launch-count 1 \
        python3 scripts/profile_attention.py fp8 1 2048
"""

import sys

import torch

from adaq.bench.microbench import prefill_attention_case

kv_dtype, seqs, seq_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ours, _, _ = prefill_attention_case(seqs, seq_len, kv_dtype=kv_dtype)
for _ in range(3):
    ours()
torch.cuda.synchronize()

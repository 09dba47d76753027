

PREFILL_PATH_HELP = ("NVFP4 prefill of many tokens: auto (the FP8 path on sm_89 / sm_90, else exact), fp8 (E4M3 GEMMs, "
                     "down_proj exact: +0.5% perplexity), exact (dequantize + cuBLAS bf16), nvfp4 (decode kernels). "
                     "Default: $ADAQ_PREFILL_PATH, else auto.")

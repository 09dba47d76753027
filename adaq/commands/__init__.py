

PREFILL_PATH_HELP = ("NVFP4 prefill of many tokens: auto (the FP8 path on sm_89 / sm_90, else exact), fp8 (E4M3 GEMMs, "
                     "down_proj exact: +0.5% perplexity), exact (dequantize + cuBLAS bf16), nvfp4 (decode kernels). "
                     "Default: $ADAQ_PREFILL_PATH, else auto.")
STRICT_HELP = ("Fail instead of falling back (CUDA graphs to eager, a kernel to the reference path, FP8 prefill to "
               "exact, auto to the CPU): every fallback becomes a one-line error. Env: ADAQ_STRICT=1.")
TP_HELP = ("Tensor parallelism: run the model sharded over N GPUs (cuda:0..N-1 from --device's index; gloo "
           "processes on the CPU), one process per rank started by adaq itself.")
LM_HEAD_HELP = ("Output layer: bf16 (as the checkpoint stores it), fp8 (E4M3 per output channel, activations per token) "
                "or nvfp4 (RTN), quantized at load: 1 or 0.56 B per weight read per decode step instead of 2.")

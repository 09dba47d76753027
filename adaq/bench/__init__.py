"""adaq bench: NVFP4 against its baselines, with the roofline beside every figure (see adaq.bench.suite)."""

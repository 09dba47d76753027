"""Quantizers: `adaq quantize`'s pipeline (pipeline.py), its method registry (methods.py), recipes and RTN."""

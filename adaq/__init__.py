"""adaq: NVFP4-first toolchain for GPUs with FP8 but no FP4 tensor cores."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # The engine pulls in torch and transformers: import it only when asked for.
    if name in ("LLM", "SamplingParams"):
        from adaq.engine import api

        return getattr(api, name)
    raise AttributeError(name)

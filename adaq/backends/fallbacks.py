"""Fallbacks: every place where adaq runs something slower or less exact than what was asked for says so here.

One `Fallbacks` record per engine (held by its backend, which exists first): the backend reports a kernel op that
runs on the reference path, `get_backend("auto")` a GPU it could not use, the model runner a decode step that runs
without CUDA graphs, the prefill routing an FP8 path that gave way to exact. Each distinct (what, cause) is kept
once, warned about once (with the cause and the setting that forces or avoids it), and shown by `adaq run`'s summary
line, `adaq serve`'s ready line and /metrics, and every `adaq bench` row. A strict record (`--strict`,
`EngineConfig.strict`) raises an AdaqError instead: the run stops before it measures or serves the wrong thing.

`report` is a dict lookup when the fallback is already known, so it may sit on a per-call path; it never touches
the device (a fallback seen while a CUDA graph is being captured costs no sync).
"""

import warnings
from dataclasses import asdict, dataclass

from adaq.errors import AdaqError


class FallbackError(AdaqError):
    """A fallback under --strict."""


class FallbackWarning(UserWarning):
    """A fallback, reported once per (what, cause)."""


@dataclass(frozen=True)
class Fallback:
    what: str  # what gave way to what, e.g. "decode CUDA graphs -> eager"
    cause: str  # why, one line
    setting: str  # the setting that avoids it or asks for it explicitly

    def line(self) -> str:
        return f"{self.what}: {self.cause} ({self.setting})"


class Fallbacks:
    """The fallbacks of one engine, in the order they happened."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self._seen: dict[tuple[str, str], Fallback] = {}

    def report(self, what: str, cause: str, setting: str) -> None:
        key = (what, cause)
        if key in self._seen:
            return
        fallback = Fallback(what, _one_line(cause), setting)
        if self.strict:
            raise FallbackError(f"--strict: {fallback.line()}")
        self._seen[key] = fallback
        warnings.warn(f"adaq fallback: {fallback.line()}", FallbackWarning, stacklevel=3)

    def make_strict(self) -> None:
        """From now on every fallback is an error, and one already seen is reported as one now."""
        self.strict = True
        if self._seen:
            first = next(iter(self._seen.values()))
            more = f" (and {len(self._seen) - 1} more)" if len(self._seen) > 1 else ""
            raise FallbackError(f"--strict: {first.line()}{more}")

    def __iter__(self):
        return iter(list(self._seen.values()))

    def __len__(self) -> int:
        return len(self._seen)

    def as_dicts(self) -> list[dict]:
        return [asdict(fallback) for fallback in self]

    def names(self) -> list[str]:
        """Short labels for tables: what gave way, without the cause."""
        return [fallback.what for fallback in self]

    def summary(self) -> str:
        """'no fallbacks', or 'fallbacks: a (cause); b (cause)' for one-line summaries."""
        if not self._seen:
            return "no fallbacks"
        return "FALLBACKS: " + "; ".join(f"{f.what} ({f.cause})" for f in self)


def _one_line(text: str) -> str:
    lines = str(text).strip().splitlines()
    return lines[0][:300] if lines else "unknown cause"


def backend_fallbacks(backend) -> Fallbacks:
    """The record a backend reports into (a backend made without one gets a fresh, non-strict record)."""
    record = getattr(backend, "fallbacks", None)
    if record is None:
        record = Fallbacks()
        if backend is not None:
            backend.fallbacks = record
    return record


# The settings named by the warnings: one place, so that every message points at the same flags.
CUDA_GRAPHS_SETTING = "ADAQ_CUDA_GRAPHS=0 (or EngineConfig enforce_eager) decodes eagerly on purpose"
KERNEL_SETTING = "--backend reference runs every op on the reference path on purpose; --dtype bf16 for the kernels"
BACKEND_SETTING = "--backend reference --device cpu asks for the CPU; --backend cuda fails instead of falling back"
PREFILL_SETTING = "--prefill-path exact asks for exact prefill; fp8 fails where the FP8 path cannot run"

__all__ = ["Fallback", "FallbackError", "FallbackWarning", "Fallbacks", "backend_fallbacks"]

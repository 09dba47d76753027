"""What the GPU tests share: poisoned memory before a kernel runs, the relative error they bound, and a helper that
runs requests through an engine to the end."""

import torch


def poison_allocator(nbytes: int = 1 << 28, device: str | torch.device = "cuda") -> None:
    """Fill free cached memory with NaN so that an output the kernel forgets to write is caught."""
    junk = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    junk.fill_(float("nan"))
    del junk


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


def run_requests(engine, token_lists, params) -> list:
    """Each prompt (token ids) as a request, the engine stepped until all finish; their final outputs, in order."""
    ids = [engine.add_request(list(tokens), params) for tokens in token_lists]
    final = {}
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                final[output.request_id] = output
    return [final[i] for i in ids]

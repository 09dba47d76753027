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


def check_divergences(reference, prompts, ref_tokens, out_tokens, near_tie_nats: float) -> list[str]:
    """Greedy tokens against the reference engine's: where a sequence first differs, the reference's log-probability
    gap between its token and ours must be a near-tie (<= near_tie_nats), else an assertion fails. One line per
    sequence."""
    from adaq.engine.sampling_params import SamplingParams

    report = []
    for prompt, ref, out in zip(prompts, ref_tokens, out_tokens):
        same = next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), len(ref))
        if same == len(ref):
            report.append(f"{len(ref)}/{len(ref)} equal")
            continue
        prefix = list(prompt) + list(ref[:same])
        score = SamplingParams(max_tokens=0, prompt_logprobs=True)
        scored = run_requests(reference, [prefix + [ref[same]], prefix + [out[same]]], score)
        gap = (scored[0].prompt_logprobs[-1] - scored[1].prompt_logprobs[-1]).item()
        report.append(f"diverges at token {same}, reference top-2 gap {gap:.4f} nats")
        assert gap <= near_tie_nats, f"divergence at token {same} without a near-tie (gap {gap:.3f} nats)"
    return report


def check_decode_against_fp32(out, q, caches, ctx, lens, scale: float, bound: float) -> None:
    """Each sequence's decode attention output against fp32 attention over its dequantized cache rows
    (adaq.backends.numerics.attention): finite, relative error below `bound`. caches: (k, k_scale, v, v_scale)."""
    from adaq.backends.numerics import attention

    k_cache, k_scale, v_cache, v_scale = caches
    for b, n in enumerate(lens):
        keys = attention.gather_kv(k_cache, k_scale, ctx.block_tables[b], n)
        values = attention.gather_kv(v_cache, v_scale, ctx.block_tables[b], n)
        ref = attention.attend(q[b:b + 1], keys, values, n - 1, scale, None, None)  # fp32
        assert torch.isfinite(out[b]).all()
        error = rel_error(out[b:b + 1], ref)
        assert error < bound, f"sequence {b} ({n} keys): relative error {error:.2e}"

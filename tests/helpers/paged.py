"""A minimal stand-in for the engine's model runner: a paged KV cache per layer and hand-built step contexts.

Sequence b owns blocks [b * blocks_per_seq, (b + 1) * blocks_per_seq), listed in reverse order in its block table
so that a gather that ignores the table would read the wrong tokens. Hybrid models (Gated DeltaNet layers) get a
state cache too: sequence b owns state slot num_seqs - b, and slot 0, never owned, plus every slot before its
sequence's first step hold NaN, so a read of a state that is not the sequence's own shows.
"""

import torch

from adaq.backends.context import Context, reset_context, set_context
from adaq.backends.numerics.attention import nvfp4_kv_row_bytes


class PagedRunner:
    def __init__(self, model, num_seqs: int, max_len: int, block_size: int = 4,
                 kv_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.model = model
        self.device = torch.device(device)
        self.block_size = block_size
        self.blocks_per_seq = -(-max_len // block_size)
        num_blocks = num_seqs * self.blocks_per_seq
        self.block_tables = torch.tensor(
            [list(reversed(range(b * self.blocks_per_seq, (b + 1) * self.blocks_per_seq))) for b in range(num_seqs)],
            dtype=torch.int32, device=self.device)
        self.cached = [0] * num_seqs
        for layer in model.attention_layers():
            nvfp4 = kv_dtype == torch.uint8  # the NVFP4 cache: packed rows, E8M0 exponents as its scales
            width = nvfp4_kv_row_bytes(layer.head_dim) if nvfp4 else layer.head_dim
            shape = (num_blocks, block_size, layer.num_kv_heads, width)
            layer.k_cache = torch.zeros(shape, dtype=kv_dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=kv_dtype, device=self.device)
            scaled = kv_dtype == torch.float8_e4m3fn or nvfp4
            scale_dtype = torch.uint8 if nvfp4 else torch.float32
            layer.k_scale = torch.zeros(shape[:-1], dtype=scale_dtype, device=self.device) if scaled else None
            layer.v_scale = torch.zeros(shape[:-1], dtype=scale_dtype, device=self.device) if scaled else None
        self.state_layers = model.state_layers() if hasattr(model, "state_layers") else []
        self.state_slots = torch.arange(num_seqs, 0, -1, device=self.device)
        for layer in self.state_layers:
            nan = float("nan")
            layer.conv_state = torch.full((num_seqs + 1, *layer.conv_state_shape()), nan, dtype=model.dtype,
                                          device=self.device)
            layer.ssm_state = torch.full((num_seqs + 1, *layer.ssm_state_shape()), nan, device=self.device)

    def slot(self, seq: int, position: int) -> int:
        block = int(self.block_tables[seq, position // self.block_size])
        return block * self.block_size + position % self.block_size

    @torch.no_grad()
    def step(self, chunks: dict[int, list[int]], logits_for_all: bool = False) -> torch.Tensor:
        """Run one step with `chunks[seq]` = the next tokens of each listed sequence; fp32 logits of every token
        (logits_for_all) or of each sequence's last token."""
        seqs = list(chunks)
        ids, positions, slots, lens = [], [], [], []
        for seq in seqs:
            start = self.cached[seq]
            tokens = chunks[seq]
            ids += tokens
            positions += range(start, start + len(tokens))
            slots += [self.slot(seq, p) for p in range(start, start + len(tokens))]
            lens.append(len(tokens))
            self.cached[seq] += len(tokens)
        device = self.device
        cu = torch.zeros(len(seqs) + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.tensor(lens, device=device).cumsum(0)
        context_lens = torch.tensor([self.cached[s] for s in seqs], dtype=torch.int32, device=device)
        decode = all(n == 1 for n in lens)
        set_context(is_prefill=not decode, cu_seqlens_q=None if decode else cu, max_seqlen_q=max(lens),
                    context_lens=context_lens, slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
                    block_tables=self.block_tables[seqs], max_context_len=int(context_lens.max()),
                    state_slots=self.state_slots[seqs] if self.state_layers else None)
        try:
            hidden = self.model(torch.tensor(ids, device=device), torch.tensor(positions, device=device))
        finally:
            reset_context()
        rows = torch.arange(len(ids), device=device) if logits_for_all else cu[1:].long() - 1
        return self.model.compute_logits(hidden[rows])


def prefill_logits(model, tokens: list[int], block_size: int = 4, kv_dtype: torch.dtype = torch.float32,
                   chunk: int | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """Logits [len(tokens), V] of one sequence run through the paged cache, in chunks of `chunk` tokens."""
    runner = PagedRunner(model, 1, len(tokens), block_size, kv_dtype, device)
    chunk = chunk or len(tokens)
    pieces = [runner.step({0: tokens[i:i + chunk]}, logits_for_all=True) for i in range(0, len(tokens), chunk)]
    return torch.cat(pieces)


def decode_context(lens: list[int], block_size: int, num_blocks: int, gen: torch.Generator,
                   device: str | torch.device = "cuda") -> Context:
    """A decode step's context over a shared pool of `num_blocks` blocks: sequence b holds lens[b] keys in blocks
    drawn at random without repeats (so a kernel that ignores the table reads the wrong keys), its table padded with
    two -1 entries past its last block."""
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    max_blocks = max(-(-n // block_size) for n in lens)
    perm = torch.randperm(num_blocks, device=device, generator=gen)
    tables = torch.full((len(lens), max_blocks + 2), -1, dtype=torch.int32, device=device)
    used = 0
    for b, n in enumerate(lens):
        count = -(-n // block_size)
        tables[b, :count] = perm[used:used + count]
        used += count
    return Context(is_prefill=False, context_lens=lens_t, block_tables=tables, max_context_len=max(lens))

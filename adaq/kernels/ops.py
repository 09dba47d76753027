"""Python entry points to the CUDA kernels: shapes in, tensors out, on torch's current stream.

Every op is graph-safe: outputs and workspaces come from torch's allocator, nothing reads device memory on the host.
The split-K arrival counters are the one persistent buffer (zero between launches; the kernel resets them).
"""

import os
from contextlib import contextmanager

import torch

from adaq.kernels.build import load
from adaq.kernels.layout import MAX_DECODE_ROWS, TILE_N, PackedNVFP4

COUNTERS = 1 << 16
_counters: dict[torch.device, torch.Tensor] = {}


DEFAULT_GEMM_VARIANT = 0  # per-shape choice (csrc/nvfp4_gemm.cu default_variant; H100 sweeps: docs/KERNELS.md)
_variant: int | None = None


def ext():
    module = load()
    if _variant is None:  # ADAQ_GEMM_VARIANT picks another GEMM variant (1..8; 0 = per shape), for comparisons
        set_gemm_variant(int(os.environ.get("ADAQ_GEMM_VARIANT", DEFAULT_GEMM_VARIANT)), module)
    return module


def set_gemm_variant(variant: int, module=None) -> None:
    global _variant
    _variant = variant
    (module or load()).gemm_set_variant(variant)


def gemm_variant() -> int:
    ext()
    return _variant


def counters(device: torch.device) -> torch.Tensor:
    """The split-K counters of a device; call once before any CUDA-graph capture (it allocates)."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _counters:
        _counters[device] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return _counters[device]


def nvfp4_linear(x: torch.Tensor, w: PackedNVFP4, bias: torch.Tensor | None = None, splits: int = 0) -> torch.Tensor:
    """y [M, N] = x [M, K] (bf16) @ W^T; rows beyond 64 run in chunks of 64 (each chunk reads the weights again)."""
    if x.stride(-1) != 1 or x.data_ptr() % 16 or x.stride(0) % 8:
        x = x.contiguous()
    if x.shape[0] <= MAX_DECODE_ROWS:
        return ext().gemm(x, w.wq, w.ws, w.colscale, bias, counters(x.device), w.out_features, w.in_features, splits)
    return torch.cat([nvfp4_linear(x[i:i + MAX_DECODE_ROWS], w, bias, splits)
                      for i in range(0, x.shape[0], MAX_DECODE_ROWS)])


def nvfp4_linear_mid(x: torch.Tensor, w: PackedNVFP4, bias: torch.Tensor | None = None,
                     splits: int = 0) -> torch.Tensor:
    """y [M, N] = x [M, K] (bf16) @ W^T for any M in one launch (csrc/nvfp4_gemm.cu nvfp4_gemm_mid_kernel: x staged in
    shared memory 64 rows at a time, the weights read once per 64 rows and dequantized in registers): the prefill
    form of `nvfp4_linear`, with no dense copy of the weight."""
    if x.stride(-1) != 1 or x.data_ptr() % 16 or x.stride(0) % 8:
        x = x.contiguous()
    return ext().gemm_mid(x, w.wq, w.ws, w.colscale, bias, counters(x.device), w.out_features, w.in_features, splits)


@contextmanager
def mid_override(rows: int = 0, tw: int = 0):
    """The mid-size kernel with a fixed row block (16, 32 or 64 rows; a grouped launch never below its largest group)
    and column tiles per warp (1 or 2) instead of its plan's, for measurements (the prefill sweep's variants)."""
    module = ext()
    module.gemm_mid_set_override(rows, tw)
    try:
        yield
    finally:
        module.gemm_mid_set_override(0, 0)


def nvfp4_dequantize(w: PackedNVFP4, out: torch.Tensor | None = None) -> torch.Tensor:
    """bf16 [N, K] = e2m1 x block_scale from the kernel layout (exact; 1/global_scale = colscale / 2^20 not applied),
    into `out` (>= N*K bf16 elements; a view of it is returned) or a new tensor. For dense-GEMM paths (prefill)."""
    n, k = w.out_features, w.in_features
    if out is None:
        out = torch.empty(n * k, dtype=torch.bfloat16, device=w.wq.device)
    ext().gemm_dequantize(w.wq, w.ws, out, n, k)
    return out.reshape(-1)[:n * k].view(n, k)


def nvfp4_expand_e4m3(w: PackedNVFP4, row_mul: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn [N, K] = e4m3((e2m1 x block_scale) x row_mul[n]) from the kernel layout, into `out` (>= N*K
    elements; a view is returned): the FP8 prefill path's weight (adaq.formats.fp8_prefill.expand_weight's spec)."""
    n, k = w.out_features, w.in_features
    ext().gemm_expand_e4m3(w.wq, w.ws, row_mul, out, n, k)
    return out.reshape(-1)[:n * k].view(n, k)


def store_kv(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping) -> None:
    """K/V [T, Hkv, D] bf16 into the cache: FP8 (fp32 scales), bf16, or NVFP4 (uint8 rows of D/2 + D/16 bytes, uint8
    E8M0 exponents as the scales; adaq.backends.numerics.attention.quantize_kv_nvfp4 bit for bit). Slot -1: skipped."""
    ext().store_kv(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping.long())


def qk_norm_rope_store(q, k, v, q_weight, k_weight, eps: float, unit_offset: bool, positions, inv_freq, k_cache,
                       v_cache, k_scale, v_scale, slot_mapping) -> torch.Tensor:
    """The decode prologue in one launch (csrc/attention.cu qk_norm_rope_store_kernel): q/k RMSNorm, RoPE, K/V into
    the cache (bf16, FP8 or NVFP4; slot -1 skipped); returns the queries [T, H, D]. q, k, v: [T, heads, D] views with
    dense heads (the fused qkv output's)."""
    return ext().qk_norm_rope_store(q, k, v, q_weight, k_weight, eps, unit_offset, positions.long(),
                                    inv_freq.float().contiguous(), k_cache, v_cache, k_scale, v_scale,
                                    slot_mapping.long())


def kv_format(fp8: bool, nvfp4: bool = False) -> int:
    """The kernels' cache format code: 0 bf16, 1 FP8, 2 NVFP4 (csrc/attention.cu KvFormat)."""
    return 2 if nvfp4 else int(bool(fp8))


def attention_splits(tokens: int, kv_heads: int, max_context: int, *, head_dim: int = 128, group: int = 4,
                     fp8: bool = True, block_size: int = 16, nvfp4: bool = False) -> int:
    """Context splits per (query token, KV head) for the kernel this shape runs (flash-decoding)."""
    return int(ext().attention_splits(tokens, kv_heads, max(1, max_context), head_dim, group, kv_format(fp8, nvfp4),
                                      block_size))


DEFAULT_ATTENTION_VARIANT = 0  # tensor cores where instantiated (csrc/attention.cu; docs/KERNELS.md "Attention v3")
ATTENTION_VARIANTS = {0: "default", 1: "v2 CUDA cores", 2: "v3 tensor cores, other chunks per step",
                      3: "v3, splits merged in-kernel by the last block",
                      4: "prefill: v3's kernel (queries as MMA columns) instead of the flash kernel",
                      5: "prefill: the flash kernel in 4-warp blocks instead of 8"}


def set_attention_variant(variant: int) -> None:
    """Pick the decode-attention kernel (for measurements and tests): 0 default, 1 v2, 2 v3 other tiling, 3 v3 with
    the split merge in the kernel."""
    if variant not in ATTENTION_VARIANTS:
        raise ValueError(f"attention variant must be one of {sorted(ATTENTION_VARIANTS)}, got {variant}")
    ext().attention_set_variant(int(variant))


@contextmanager
def attention_variant(variant: int | None):
    """Run the block with attention kernel `variant` (None: leave the default), the default restored after."""
    if variant is not None:
        set_attention_variant(variant)
    try:
        yield
    finally:
        if variant is not None:
            set_attention_variant(DEFAULT_ATTENTION_VARIANT)


def paged_attention(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens, *, scale: float,
                    sliding_window: int | None = None, softcap: float | None = None, query_seq=None, query_ctx=None,
                    splits: int = 1, query_blocks=None) -> torch.Tensor:
    """q [T, H, D] -> [T, H, D]; query t belongs to sequence query_seq[t] (default t) and sees query_ctx[t] keys
    (default context_lens[seq]). query_blocks (int32 [blocks, 3]: sequence, first query, count; from
    `prefill_query_blocks`) runs the prefill kernel, which serves several consecutive queries per block."""
    return ext().paged_attention(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens, query_seq,
                                 query_ctx, splits, int(sliding_window or 0), float(scale), float(softcap or 0.0),
                                 counters(q.device), query_blocks)


def prefill_block_tokens(head_dim: int, group: int, fp8: bool, block_size: int, nvfp4: bool = False) -> int:
    """Queries per block of the prefill attention kernel for this shape (0: none, the per-query kernel serves it)."""
    return int(ext().attention_prefill_block_tokens(head_dim, group, kv_format(fp8, nvfp4), block_size))


def prefill_query_blocks(query_offsets: torch.Tensor, tokens: int, block_tokens: int) -> torch.Tensor:
    """(sequence, first query, count) of every block of `block_tokens` consecutive queries of one sequence, for packed
    queries with offsets [B + 1]; on the device, no host sync: the grid is the upper bound tokens // block_tokens + B
    and blocks past the last have count <= 0."""
    offsets = query_offsets.long()
    seqs = offsets.numel() - 1
    q_lens = offsets[1:] - offsets[:-1]
    per_seq = (q_lens + block_tokens - 1) // block_tokens
    ends = torch.cumsum(per_seq, 0)
    ids = torch.arange(tokens // block_tokens + seqs, device=offsets.device)
    seq = torch.searchsorted(ends, ids, right=True).clamp(max=seqs - 1)
    first = offsets[seq] + (ids - (ends - per_seq)[seq]) * block_tokens
    count = torch.clamp(offsets[seq + 1] - first, max=block_tokens)
    return torch.stack([seq, first, count], dim=1).int().contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
    return ext().rms_norm(x, weight, float(eps), bool(unit_offset))


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool):
    """(x + delta, rms_norm(x + delta)) in one pass; the sum rounded to bf16 once, as torch's add."""
    total, normed = ext().add_rms_norm(x, delta, weight, float(eps), bool(unit_offset))
    return total, normed


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return ext().gated_activation(x, 0)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    return ext().gated_activation(x, 1)


def rotary(q, k, positions, inv_freq):
    q_out, k_out = ext().rotary(q, k, positions, inv_freq)
    return q_out, k_out


def router_topk(logits: torch.Tensor, top_k: int, renormalize: bool):
    weights, ids = ext().router_topk(logits, top_k, renormalize)
    return weights, ids


def moe_align(ids: torch.Tensor, experts: int):
    """(group_offsets [G+1], group_expert [G], row_ids [rows], num_groups [1]) with G = min(experts, rows)."""
    max_groups = min(experts, ids.numel())
    return ext().moe_align(ids.int().contiguous(), experts, max_groups)


def grouped_linear(x: torch.Tensor, x_row_div: int, experts: "StackedExperts", which: str, align, out_rows: int,
                   max_rows: int, splits: int = 0) -> torch.Tensor:
    wq, ws, colscale, n, k = experts.tensors(which)
    offsets, group_expert, row_ids, num_groups = align
    return ext().gemm_grouped(x, x_row_div, wq, ws, colscale, counters(x.device), offsets, group_expert, row_ids,
                              num_groups, group_expert.numel(), max_rows, out_rows, n, k, splits)


def grouped_linear_mid(x: torch.Tensor, x_row_div: int, experts: "StackedExperts", which: str, align, out_rows: int,
                       max_rows: int = MAX_DECODE_ROWS, splits: int = 0) -> torch.Tensor:
    """`grouped_linear` on the mid-size kernel: every group of the tables holds <= max_rows <= 64 rows
    (one_expert_table's, or an expert's rows cut by split_groups), all groups in one launch."""
    wq, ws, colscale, n, k = experts.tensors(which)
    offsets, group_expert, row_ids, num_groups = align
    return ext().gemm_mid_grouped(x, x_row_div, wq, ws, colscale, counters(x.device), offsets, group_expert, row_ids,
                                  num_groups, group_expert.numel(), max_rows, out_rows, n, k, splits)


def sort_by_expert(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows (token, slot) of `ids` [T, k] in expert order, stable: (their expert ids, the row numbers), int32."""
    sorted_ids, row_ids = torch.sort(ids.reshape(-1).int(), stable=True)
    return sorted_ids, row_ids.int()


def align_rows_sorted(ids: torch.Tensor, experts: int):
    """moe_align's layout from a stable sort (every expert is a group, empty ones too); no host sync:
    (offsets [E+1], group_expert [E], row_ids [rows] (ascending within an expert), num_groups [1]), int32."""
    sorted_ids, row_ids = sort_by_expert(ids)
    bounds = torch.arange(experts + 1, dtype=torch.int32, device=ids.device)
    offsets = torch.searchsorted(sorted_ids, bounds).int()
    group_expert = torch.arange(experts, dtype=torch.int32, device=ids.device)
    num_groups = torch.full((1,), experts, dtype=torch.int32, device=ids.device)
    return offsets, group_expert, row_ids, num_groups


def expert_pieces_reference(ids: torch.Tensor, experts: int, max_rows: int):
    """The grouped mid path's tables: the rows (token, slot) of `ids` [T, k] sorted by expert (stable), every
    expert's rows cut into pieces of <= max_rows (split_groups' layout and its unused pieces). Plain torch."""
    return split_groups(align_rows_sorted(ids, experts), ids.numel(), max_rows)


def expert_pieces(ids: torch.Tensor, experts: int, max_rows: int):
    """expert_pieces_reference on the GPU: the stable sort, then the whole table in one launch (moe.cu
    moe_piece_table) instead of ~35 small ops."""
    sorted_ids, row_ids = sort_by_expert(ids)
    offsets, group_expert, num_groups = ext().moe_piece_table(sorted_ids, experts, max_rows)
    return offsets, group_expert, row_ids, num_groups


def split_groups(align, rows: int, max_rows: int = MAX_DECODE_ROWS):
    """The grouped tables with every group cut into pieces of at most `max_rows` rows (same expert, same row order),
    on the device and without a host sync: a bound of ceil(rows / max_rows) + G groups, the count in use in
    num_groups. `align`: (offsets [G+1], group_expert [G], row_ids, num_groups [1]), groups >= num_groups unused."""
    offsets, group_expert, row_ids, num_groups = align
    device, groups = offsets.device, group_expert.numel()
    starts, ends = offsets[:-1].long(), offsets[1:].long()
    in_use = torch.arange(groups, device=device) < num_groups.long()
    pieces = torch.where(in_use, (ends - starts + max_rows - 1) // max_rows, 0)
    last = pieces.cumsum(0)  # one past each group's last piece
    bound = -(-rows // max_rows) + groups
    piece = torch.arange(bound, device=device)
    owner = torch.searchsorted(last, piece, right=True).clamp_(max=max(groups - 1, 0))
    total = last[-1:]
    end = offsets.long().gather(0, num_groups.long())
    first = starts[owner] + (piece - (last[owner] - pieces[owner])) * max_rows
    new_offsets = torch.cat([torch.where(piece < total, first, end), end]).int()
    return new_offsets, group_expert[owner], row_ids, total.int()


def moe_combine(y: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return ext().moe_combine(y, weights, ids)


class StackedExperts:
    """All experts' gate|up and down weights of one MoE layer in the kernel layout, stacked [E, ...]."""

    def __init__(self, gate_up: list[PackedNVFP4], down: list[PackedNVFP4]):
        self.num_experts = len(down)
        self.gate_up = self._stack(gate_up)
        self.down = self._stack(down)
        self.intermediate = gate_up[0].out_features // 2
        self.hidden = down[0].out_features

    @classmethod
    def from_concatenated(cls, gate_up: list[tuple[PackedNVFP4, int]],
                          down: list[tuple[PackedNVFP4, int]]) -> "StackedExperts":
        """The experts of one layer repacked a group at a time, each group's experts' rows one after another
        (gate|up [e * 2I, H], down [e * H, I]) with its expert count. Equal to stacking per-expert repacks when each
        expert's rows fill whole tiles of TILE_N (the layout walks rows in tiles, so tile t of expert j is tile
        j * tiles + t of the concatenation): a few repacks per layer instead of three per expert (a 512-expert model
        has tens of thousands)."""
        self = cls.__new__(cls)
        self.num_experts = sum(count for _, count in down)
        self.gate_up = cls._joined(gate_up)
        self.down = cls._joined(down)
        self.intermediate = self.gate_up[3] // 2
        self.hidden = self.down[3]
        return self

    @staticmethod
    def _joined(groups: list[tuple[PackedNVFP4, int]]):
        for packed, count in groups:
            if packed.out_features % (count * TILE_N):
                raise ValueError(f"{packed.out_features} rows of {count} experts do not fill whole tiles")
        parts = [(p.wq.reshape(n, -1), p.ws.reshape(n, -1), p.colscale.reshape(n, -1)) for p, n in groups]
        first, count = groups[0]
        return (*(torch.cat([part[i] for part in parts]) for i in range(3)), first.out_features // count,
                first.in_features)

    @staticmethod
    def _stack(packed: list[PackedNVFP4]):
        wq = torch.stack([p.wq.reshape(-1) for p in packed])
        ws = torch.stack([p.ws.reshape(-1) for p in packed])
        colscale = torch.stack([p.colscale for p in packed])
        return wq, ws, colscale, packed[0].out_features, packed[0].in_features

    def tensors(self, which: str):
        return self.gate_up if which == "gate_up" else self.down

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for part in (self.gate_up, self.down) for t in part[:3])


FUSED_MOE_MAX_TOKENS = 16  # the fused epilogues' limit: their TW 2 / combine kernels serve <= 16 rows per expert


def moe_route_fused(router_logits: torch.Tensor, experts: int, top_k: int, renormalize: bool, shared: bool,
                    expert_scale: torch.Tensor | None, max_groups: int):
    """(weights fp32 [T, S], ids [T, S], order [T, S], *align) with S = top_k (+ 1: the shared expert, expert
    `experts`, whose gate logit is column `experts` of the logits)."""
    return ext().moe_route_fused(router_logits, experts, top_k, renormalize, shared, expert_scale, max_groups)


def moe_gate_up_act(x: torch.Tensor, x_row_div: int, experts: "StackedExperts", align, activation: str,
                    out_rows: int, max_rows: int, splits: int = 0) -> torch.Tensor:
    """act(gate) * up [out_rows, I] straight from the grouped gate|up GEMM's epilogue (<= 16 rows per expert)."""
    wq, ws, colscale, n, k = experts.tensors("gate_up")
    offsets, group_expert, row_ids, num_groups = align
    return ext().moe_gate_up_act(x, x_row_div, wq, ws, colscale, counters(x.device), offsets, group_expert, row_ids,
                                 num_groups, group_expert.numel(), max_rows, out_rows, n, k,
                                 0 if activation == "silu" else 1, splits)


def moe_down_combine(hidden: torch.Tensor, experts: "StackedExperts", align, weights: torch.Tensor,
                     order: torch.Tensor, max_rows: int, splits: int = 0) -> torch.Tensor:
    """[T, H]: the grouped down GEMM, its last block per column block summing the tokens' slots in `order`."""
    wq, ws, colscale, n, k = experts.tensors("down")
    offsets, group_expert, row_ids, num_groups = align
    return ext().moe_down_combine(hidden, wq, ws, colscale, counters(hidden.device), offsets, group_expert, row_ids,
                                  num_groups, group_expert.numel(), max_rows, weights, order, n, k, splits)


def fused_moe_fits(experts: "StackedExperts", tokens: int) -> bool:
    """Whether the three-launch decode MoE serves this call: <= 16 tokens, gate and up each filling whole column
    tiles (I % 16), rows of 16-byte pieces for the combine (H % 8)."""
    return tokens <= FUSED_MOE_MAX_TOKENS and experts.intermediate % TILE_N == 0 and experts.hidden % 8 == 0


def moe_forward(x: torch.Tensor, router_logits: torch.Tensor, experts: StackedExperts, top_k: int,
                renormalize: bool, activation: str = "silu", expert_scale: torch.Tensor | None = None,
                shared: bool = False) -> torch.Tensor:
    """Decode MoE (<= 64 tokens per call; more run in chunks). Up to 16 tokens, three launches: the fused router
    (top-k, fp32 weights, the combine's order, rows grouped by expert), the grouped gate|up GEMM with the gated
    activation in its epilogue, the grouped down GEMM with the combine in its epilogue. Above, the gated activation
    and the combine are launches of their own. `expert_scale` [E] fp32 (Gemma 4) multiplies the routing weights in
    the router. `shared`: the last stacked expert is the shared expert and the logits' last column its gate logit
    (adaq.backends.numerics.moe.moe_shared_reference)."""
    tokens = x.shape[0]
    if tokens > MAX_DECODE_ROWS:
        return torch.cat([moe_forward(x[i:i + MAX_DECODE_ROWS], router_logits[i:i + MAX_DECODE_ROWS], experts,
                                      top_k, renormalize, activation, expert_scale, shared)
                          for i in range(0, tokens, MAX_DECODE_ROWS)])
    slots = top_k + int(shared)
    rows = tokens * slots
    weights, ids, order, *align = moe_route_fused(router_logits, experts.num_experts - int(shared), top_k,
                                                  renormalize, shared, expert_scale,
                                                  min(experts.num_experts, rows))
    x = x.contiguous()
    if fused_moe_fits(experts, tokens):
        hidden = moe_gate_up_act(x, slots, experts, align, activation, rows, tokens)
        return moe_down_combine(hidden, experts, align, weights, order, tokens)
    gate_up = grouped_linear(x, slots, experts, "gate_up", align, rows, tokens)
    y = grouped_linear(gated(gate_up, activation), 1, experts, "down", align, rows, tokens)
    return moe_combine(y, weights.to(torch.bfloat16), ids)


def gated(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up of gate|up rows: SiLU for "silu", else gelu-tanh (the MoE paths' one switch)."""
    return silu_and_mul(gate_up) if activation == "silu" else gelu_tanh_and_mul(gate_up)


def expert_forward(x: torch.Tensor, experts: StackedExperts, expert: int, activation: str = "silu",
                   mid: bool = False) -> torch.Tensor:
    """One stacked expert on every row of x [T, H] (the shared expert beside a prefill path that routes the rest):
    one grouped launch per projection, the rows cut into groups of 64 that all name this expert (a 2048-token
    prompt: 32 groups side by side, where a launch per 64 rows left most SMs idle and cost ~8 launches each), on
    the decode kernels or (mid) the mid-size kernel."""
    rows, per_group = x.shape[0], min(x.shape[0], MAX_DECODE_ROWS)
    table = one_expert_table(rows, expert, x.device)
    linear = grouped_linear_mid if mid else grouped_linear
    gate_up = linear(x.contiguous(), 1, experts, "gate_up", table, rows, per_group)
    return linear(gated(gate_up, activation), 1, experts, "down", table, rows, per_group)


def one_expert_table(rows: int, expert: int, device: torch.device):
    """The grouped GEMM's tables for `rows` rows in order through one expert: ceil(rows / 64) groups of 64 (the last
    shorter), each naming that expert."""
    groups = -(-rows // MAX_DECODE_ROWS)
    offsets = (torch.arange(groups + 1, dtype=torch.int32, device=device) * MAX_DECODE_ROWS).clamp_(max=rows)
    return (offsets, torch.full((groups,), expert, dtype=torch.int32, device=device),
            torch.arange(rows, dtype=torch.int32, device=device),
            torch.full((1,), groups, dtype=torch.int32, device=device))


# ---- Gated DeltaNet decode (csrc/gated_delta.cu) -------------------------------------------------------------------
def gdn_conv_update(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor | None,
                    slots: torch.Tensor | None, context_lens: torch.Tensor) -> torch.Tensor:
    """x [B, C] -> silu(conv) [B, C]; conv_state [slots, C, Kc-1] read (sequences with context_len > 1) and written
    in place at `slots` (int64 [B], -1 skipped); None state or slots: zero states, nothing written."""
    return ext().gdn_conv_update(x, weight, conv_state, slots, context_lens)


def gdn_conv_prefill(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor | None,
                     slots: torch.Tensor | None, context_lens: torch.Tensor | None,
                     offsets: torch.Tensor) -> torch.Tensor:
    """A packed prefill step: x [T, C] (sequences back to back at `offsets` int32 [B+1]) -> silu(conv) [T, C];
    a sequence continues its slot's state when context_len > q_len, and its slot gets its last Kc-1 inputs
    (numerics.gated_delta.conv_packed). No state (or no slots): zeros before each sequence, nothing written."""
    if conv_state is None or slots is None:
        conv_state = slots = context_lens = None
    return ext().gdn_conv_prefill(x, weight, conv_state, slots, context_lens, offsets)


def gdn_decode(q, k, v, a, b, a_log, dt_bias, ssm_state: torch.Tensor | None, slots: torch.Tensor | None,
               context_lens: torch.Tensor) -> torch.Tensor:
    """One token per row: q, k [B, Hk, Dk], v [B, Hv, Dv], raw gate inputs a, b [B, Hv] -> o [B, Hv, Dv]; the fp32
    states [slots, Hv, Dk, Dv] updated in place as for `gdn_conv_update`."""
    return ext().gdn_decode(q, k, v, a, b, a_log, dt_bias, ssm_state, slots, context_lens)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return ext().gated_rms_norm(x, z, weight, float(eps))

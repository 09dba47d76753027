"""CPU checks of adaq's kernels: every .cu compiles for sm_89 with the intended instructions and no Hopper-only
ones; the host bindings compile (g++ syntax check); the weight repacking is proven by emulating the kernel's bit
tricks; the package imports without a GPU."""

import shutil
from pathlib import Path
import types

import pytest
import torch

from adaq.formats import nvfp4
from adaq.formats.nvfp4 import NVFP4Weight
from adaq.kernels import build, layout

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("ptxas") is None,
                                reason="needs nvcc and ptxas")

# (N, K): exact tiles, padded N, padded K, the smallest NVFP4 weight, Qwen3-30B-A3B expert down (K = 768).
LAYOUT_SHAPES = [(8, 128), (24, 272), (5, 48), (64, 640), (1, 16), (40, 768), (13, 4112)]


@pytest.fixture(scope="module")
def report():
    finished = []
    result = build.compile_check("sm_89", sass=False, progress=lambda name, entry: finished.append((name, entry)))
    return {**result, "progress": finished}


@needs_nvcc
def test_every_kernel_compiles_for_sm89(report):
    assert report["ok"], report.get("error")
    assert set(report["sources"]) == set(build.CUDA_SOURCES)
    finished = sorted((name, entry) for name, entry in report["progress"] if entry is not None)
    assert finished == sorted(report["sources"].items()), "one progress call per source as it finishes"
    assert sorted(name for name, entry in report["progress"] if entry is None) == sorted(build.CUDA_SOURCES)


@needs_nvcc
@pytest.mark.parametrize("source", build.CUDA_SOURCES)
def test_intended_instructions_present(report, source):
    entry = report["sources"][source]
    missing = [instr for instr, found in entry["required_ptx"].items() if not found]
    assert not missing, f"{source}: PTX lacks {missing}"
    assert entry["forbidden_ptx"] == [], f"{source}: Hopper-only instructions {entry['forbidden_ptx']}"


@needs_nvcc
def test_no_register_spills_in_decode_kernels(report):
    for source in ("nvfp4_gemm.cu", "attention.cu"):
        kernels = report["sources"][source]["kernels"]
        assert kernels, f"ptxas reported no kernels for {source}"
        for name, usage in kernels.items():
            assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, f"{name} spills: {usage}"
            assert usage["registers"] <= 255


@needs_nvcc
def test_gemm_instantiations_exist(report):
    """Token tiles x ring depth x blocks per SM of every GEMM variant (csrc/nvfp4_gemm.cu, dispatch)."""
    names = report["sources"]["nvfp4_gemm.cu"]["kernels"]
    expected = [(nt, *cfg) for nt in (1, 2)
                for cfg in ((4, 2, 1), (3, 3, 1), (2, 4, 1), (3, 2, 2), (2, 1, 4), (1, 2, 4), (2, 2, 2))]
    expected += [(3, 2, 2, 1)] + [(nt, 2, 1, 1) for nt in range(4, 9)]
    for nt, st, minb, tw in expected:
        assert any(f"nvfp4_gemm_kernelILi{nt}ELi{st}ELi{minb}ELi{tw}E" in name for name in names), (nt, st, minb, tw)


@needs_nvcc
def test_gemm_register_budgets(report):
    """Each M <= 16 variant fits the blocks per SM its launch bounds promise (255 registers = 1 block)."""
    for name, usage in report["sources"]["nvfp4_gemm.cu"]["kernels"].items():
        if "nvfp4_gemm_kernel" not in name:
            continue
        minb = int(name.split("ELi")[2].split("E")[0])
        assert usage["registers"] * 256 * minb <= 65536, (name, usage)


@needs_nvcc
def test_attention_runs_on_tensor_cores(report):
    """Decode attention v3: QK^T and PV through f16 (FP8 KV) and bf16 (bf16 KV) mma.sync, P transposed in registers
    by movmatrix, for every head dim and GQA group it serves; none spills (checked above)."""
    entry = report["sources"]["attention.cu"]
    for instr in ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
                  "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", "movmatrix.sync.aligned.m8n8.trans.b16"):
        assert entry["required_ptx"].get(instr), f"attention.cu PTX lacks {instr}"
    names = entry["kernels"]
    decode = ((64, 4, 1), (128, 4, 1), (128, 2, 1), (256, 1, 1), (64, 1, 0), (128, 2, 0), (128, 1, 0))
    for dim, tiles, fp8 in decode:
        for group in (1, 2, 4, 8):
            assert any(f"paged_attention_mma_kernelILi{dim}ELi{group}ELi{tiles}ELb{fp8}ELi1E" in n for n in names), \
                (dim, group, tiles, fp8)
    for dim, group, tiles, fp8, queries in ((128, 4, 2, 1, 4), (128, 8, 1, 0, 2), (64, 1, 2, 1, 16), (256, 2, 1, 1, 4)):
        name = f"paged_attention_mma_kernelILi{dim}ELi{group}ELi{tiles}ELb{fp8}ELi{queries}E"
        assert any(name in n for n in names), name


@needs_nvcc
def test_head_dim_512_instantiations(report):
    """Gemma 4's global layers (head_dim 512, groups up to 8): the split-dims tensor-core kernel for decode and
    prefill over FP8, bf16 and NVFP4 caches, the split merge and both store kernels; none spills (checked above)."""
    names = report["sources"]["attention.cu"]["kernels"]

    def has(fragment: str) -> bool:
        return any(fragment in n for n in names)

    nvfp4_decode_tiles = {1: 4, 2: 4, 4: 2, 8: 4}
    for group in (1, 2, 4, 8):
        for tiles, fp8, nv4 in ((4, 1, 0), (2, 0, 0), (nvfp4_decode_tiles[group], 1, 1)):
            assert has(f"paged_attention_mma_kernelILi512ELi{group}ELi{tiles}ELb{fp8}ELi1ELb{nv4}E"), (group, fp8, nv4)
        for tiles, fp8, nv4 in ((2, 1, 0), (1, 0, 0), (2, 1, 1)):
            name = f"paged_attention_mma_kernelILi512ELi{group}ELi{tiles}ELb{fp8}ELi{16 // group}ELb{nv4}E"
            assert has(name), name
    for fragment in ("merge_splits_kernelILi512E", "store_kv_kernelILi512ELb1E", "store_kv_kernelILi512ELb0E",
                     "store_kv_nvfp4_kernelILi512E"):
        assert has(fragment), fragment



@needs_nvcc
def test_prefill_flash_kernels_fit_their_launch_bounds(report):
    """Prefill attention v4 (flash): a kernel per head dim 64 / 128, KV dtype and block size (4 warps, two blocks
    per SM; 8 warps, one), each within the registers its launch bounds promise."""
    kernels = report["sources"]["attention.cu"]["kernels"]
    for dim in (64, 128):
        for fp8 in (0, 1):
            for warps in (4, 8):
                names = [n for n in kernels if f"prefill_flash_kernelILi{dim}ELb{fp8}ELi{warps}E" in n]
                assert names, (dim, fp8, warps)
                usage = kernels[names[0]]
                assert usage["registers"] * 32 * warps * (8 // warps) <= 65536, usage

@needs_nvcc
def test_compile_error_is_reported(monkeypatch, tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text("__global__ void k() { this is not C++; }\n")
    monkeypatch.setattr(build, "CSRC", tmp_path)
    result = build.compile_check("sm_89", sass=False, sources=("bad.cu",))
    assert not result["ok"] and "bad.cu" in result["error"]


def random_weight(n: int, k: int, seed: int) -> NVFP4Weight:
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    exponent = torch.randint(-9, 9, (n, k // 16), generator=gen).float()
    scales = ((1 + torch.rand(n, k // 16, generator=gen)) * 2 ** exponent).clamp(max=448)
    scales[0, 0] = 2 ** -9  # the smallest E4M3 subnormal
    return NVFP4Weight(packed, scales.to(torch.float8_e4m3fn), torch.tensor([37.5]))


@pytest.mark.parametrize("n,k", LAYOUT_SHAPES)
def test_repack_emulated_fragments_equal_reference_dequantize(n, k):
    """The kernel's view of the repacked bytes (bf16 bit tricks included) is the reference weight, up to fp32
    rounding of (e2m1 * scale) * (128 / g) vs e2m1 * (scale / g)."""
    weight = random_weight(n, k, seed=n * k)
    packed = layout.repack(weight)
    assert packed.wq.shape == (-(-n // 16), -(-k // 128), 1024) and packed.ws.shape[-1] == 128
    emulated = layout.emulate_b_fragments(packed)
    reference = nvfp4.dequantize(weight)
    torch.testing.assert_close(emulated, reference, rtol=2e-7, atol=0)


@pytest.mark.parametrize("n,k", LAYOUT_SHAPES)
def test_unpack_inverts_repack(n, k):
    weight = random_weight(n, k, seed=n + k)
    codes, scales = layout.unpack_codes(layout.repack(weight))
    assert torch.equal(codes, nvfp4.unpack_nibbles(weight.packed))
    assert torch.equal(scales.view(torch.uint8), weight.block_scale.view(torch.uint8))


def test_repack_keeps_zero_negative_and_nan_scales_exact():
    """Scales the E5M3 re-encoding cannot hold as they are (zero, negative, -0, NaN) keep every product."""
    weight = random_weight(32, 256, seed=3)
    scales = weight.block_scale.float()
    scales[0, :4] = 0.0
    scales[1, :4] = -scales[1, :4]
    scales[2, 0] = -0.0
    scales[3, 1] = float("nan")
    weight.block_scale = scales.to(torch.float8_e4m3fn)
    packed = layout.repack(weight)
    reference = nvfp4.dequantize(weight)
    emulated = layout.emulate_b_fragments(packed)
    nan = torch.isnan(reference)
    assert nan[3, 16:32].all() and torch.equal(torch.isnan(emulated), nan)
    torch.testing.assert_close(emulated[~nan], reference[~nan], rtol=2e-7, atol=0)
    codes, back = layout.unpack_codes(packed)
    again = nvfp4.dequantize(NVFP4Weight(nvfp4.pack_nibbles(codes), back, weight.global_scale))
    assert torch.equal(torch.isnan(again), nan) and torch.equal(again[~nan], reference[~nan])


def test_per_column_global_scales():
    """Fused weights whose global scales differ stay exact through per-column multipliers."""
    a, b = random_weight(16, 256, 1), random_weight(8, 256, 2)
    b.global_scale = torch.tensor([3.0])
    fused = NVFP4Weight(torch.cat([a.packed, b.packed]), torch.cat([a.block_scale, b.block_scale]), a.global_scale)
    columns = torch.cat([a.global_scale.expand(16), b.global_scale.expand(8)])
    emulated = layout.emulate_b_fragments(layout.repack(fused, column_global_scales=columns))
    reference = torch.cat([nvfp4.dequantize(a), nvfp4.dequantize(b)])
    torch.testing.assert_close(emulated, reference, rtol=2e-7, atol=0)


def test_bad_weight_is_a_clear_error():
    from adaq.errors import CheckpointError

    weight = random_weight(8, 128, 0)
    weight.block_scale = weight.block_scale[:, :4]
    with pytest.raises(CheckpointError, match="block scales"):
        layout.repack(weight)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only install")
def test_cpu_only_install_reports_unavailable():
    from adaq import kernels
    from adaq.backends import cuda_backend_class, get_backend

    assert kernels.available() is False
    assert cuda_backend_class() is None
    assert get_backend("auto", "cpu").name == "reference"


def test_source_hash_tracks_sources(monkeypatch, tmp_path):
    first = build.source_hash()
    for name in (*build.CUDA_SOURCES, build.BINDING, *build.HEADERS):
        (tmp_path / name).write_bytes((build.CSRC / name).read_bytes())
    monkeypatch.setattr(build, "CSRC", tmp_path)
    assert build.source_hash() == first
    (tmp_path / "moe.cu").write_text((tmp_path / "moe.cu").read_text() + "\n// changed\n")
    assert build.source_hash() != first


def test_prefill_queries_give_each_token_its_causal_context():
    from adaq.backends.context import Context
    from adaq.backends.cuda import prefill_queries

    ctx = Context(is_prefill=True, cu_seqlens_q=torch.tensor([0, 3, 5], dtype=torch.int32),
                  context_lens=torch.tensor([10, 2], dtype=torch.int32))
    seqs, lens = prefill_queries(ctx, 5)
    assert seqs.tolist() == [0, 0, 0, 1, 1]
    assert lens.tolist() == [8, 9, 10, 1, 2]  # a cached prefix of 7 tokens, then a fresh 2-token prompt


@pytest.mark.parametrize("block_tokens", [1, 2, 4, 16])
def test_prefill_query_blocks_cover_every_query_once(block_tokens):
    """The prefill attention kernel's block map: every query in exactly one block of its own sequence, no block
    longer than block_tokens, blocks past the last (the grid is an upper bound) empty."""
    from adaq.kernels.ops import prefill_query_blocks

    q_lens = [3, 0, 17, 1, 40, 16]
    offsets = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist())
    blocks = prefill_query_blocks(offsets, int(offsets[-1]), block_tokens)
    assert blocks.dtype == torch.int32 and blocks.shape == (int(offsets[-1]) // block_tokens + len(q_lens), 3)
    covered = []
    for seq, first, count in blocks.tolist():
        if count <= 0:
            continue
        assert count <= block_tokens and offsets[seq] <= first and first + count <= offsets[seq + 1]
        covered += range(first, first + count)
    assert sorted(covered) == list(range(int(offsets[-1])))


def test_prefill_maps_are_made_once_per_step():
    from adaq.backends.context import Context
    from adaq.backends.cuda import prefill_maps

    ctx = Context(is_prefill=True, cu_seqlens_q=torch.tensor([0, 3, 5], dtype=torch.int32),
                  context_lens=torch.tensor([10, 2], dtype=torch.int32))
    first = prefill_maps(ctx, 5, 4)
    assert first[0].tolist() == [0, 0, 0, 1, 1] and first[1].tolist() == [8, 9, 10, 1, 2]
    assert first[2].tolist()[:2] == [[0, 0, 3], [1, 3, 2]]
    assert prefill_maps(ctx, 5, 4) is first  # the next layer of the step
    ctx.cu_seqlens_q = torch.tensor([0, 4, 5], dtype=torch.int32)  # another step's queries
    assert prefill_maps(ctx, 5, 4)[0].tolist() == [0, 0, 0, 0, 1]
    assert prefill_maps(ctx, 5, 0)[2] is None


def test_decode_graph_buckets():
    from adaq.engine.cuda_graph import default_buckets

    for max_seqs in (1, 4, 16, 100, 256):
        buckets = default_buckets(max_seqs)
        assert buckets == sorted(set(buckets)) and buckets[0] == 1 and buckets[-1] == max_seqs
        assert all(b <= max_seqs for b in buckets)


def test_no_decode_graphs_without_the_cuda_backend():
    from types import SimpleNamespace

    from adaq.engine.cuda_graph import maybe_decode_graphs

    runner = SimpleNamespace(device=torch.device("cpu"), model=SimpleNamespace(backend=SimpleNamespace(name="cuda")),
                             config=SimpleNamespace())
    assert maybe_decode_graphs(runner) is None


def test_graph_safety_follows_kernel_coverage():
    from adaq.engine.cuda_graph import graph_safe
    from adaq.layers.attention import PagedAttention
    from adaq.backends.handles import ExpertsHandle

    class Model(torch.nn.Module):
        def __init__(self, heads, kv_heads, dim, experts=None):
            super().__init__()
            self.attn = PagedAttention(None, heads, kv_heads, dim, 1.0)
            self.mlp = torch.nn.Module()
            self.mlp.experts = experts

    assert graph_safe(Model(32, 8, 128))
    assert not graph_safe(Model(32, 8, 96))  # head_dim without a kernel: reference attention
    assert not graph_safe(Model(24, 8, 128))  # 3 query heads per KV head
    assert not graph_safe(Model(32, 8, 128, ExpertsHandle([], [], 8)))  # bf16 experts: reference MoE
    assert graph_safe(Model(32, 4, 512))  # Gemma 4's global head_dim (split-dims kernel)
    mixed = Model(32, 16, 256)
    mixed.other = PagedAttention(None, 32, 4, 512, 1.0)  # Gemma 4: the global layer a view into the wider slot
    slot = torch.zeros(2, 4, 16, 16 * 256, dtype=torch.float8_e4m3fn)
    mixed.attn.k_cache = slot[0].unflatten(-1, (16, 256))
    mixed.other.k_cache = slot[1][..., :4 * 512].unflatten(-1, (4, 512))
    assert graph_safe(mixed)
    mixed.other.k_cache = torch.zeros(4, 8, 4, 512, dtype=torch.float8_e4m3fn)  # pages of 8: no kernel at 512
    assert not graph_safe(mixed)
    mixed.other.k_cache = torch.zeros(4, 16, 512, 4, dtype=torch.float8_e4m3fn).transpose(2, 3)  # heads not dense
    assert not graph_safe(mixed)


# ---- NVFP4 KV cache: the kernels' instantiations and their arithmetic, emulated bit for bit on the CPU ------------

@needs_nvcc
def test_nvfp4_kv_kernels_exist(report):
    """Store per head dim; decode (QT 1, default and variant 2 tiling) and prefill (QT > 1) attention with NV4 = true
    for every head dim and group (tiles per csrc/attention.cu visit_attention_nv4 / visit_prefill_nv4); none spills
    (checked above)."""
    names = report["sources"]["attention.cu"]["kernels"]
    for dim in (64, 128, 256):
        assert any(f"store_kv_nvfp4_kernelILi{dim}E" in n for n in names), dim
    tiles = {(64, g): 4 for g in (1, 2, 4, 8)} | {(128, g): 4 for g in (1, 2, 8)} | {(128, 4): 2} \
        | {(256, g): 1 for g in (1, 2, 4, 6, 8)}
    other_tiles = {(128, g): 2 for g in (1, 2, 8)} | {(128, 4): 4} | {(256, g): 2 for g in (1, 2, 4, 6, 8)}  # variant 2
    for (dim, group), t in [*tiles.items(), *other_tiles.items()]:
        name = f"paged_attention_mma_kernelILi{dim}ELi{group}ELi{t}ELb1ELi1ELb1E"
        assert any(name in n for n in names), name
    for dim, group, t, queries in ((64, 1, 2, 16), (128, 4, 2, 4), (128, 8, 2, 2), (256, 4, 1, 2)):
        name = f"paged_attention_mma_kernelILi{dim}ELi{group}ELi{t}ELb1ELi{queries}ELb1E"
        assert any(name in n for n in names), name


def e2m1_pair_f16x2(w: torch.Tensor, i: int) -> torch.Tensor:
    """csrc/attention.cu e2m1_pair_f16x2 on int64 words of 32 bits: codes i and i + 4 as two f16 (code i first)."""
    magnitude = w << (9 - 4 * i) if i < 3 else w >> 3
    bits = (magnitude & 0x0E000E00) | ((w << (12 - 4 * i)) & 0x80008000)
    return _u16_to_f16(torch.stack([bits & 0xFFFF, bits >> 16], dim=-1))


def _u16_to_f16(halves: torch.Tensor) -> torch.Tensor:
    signed = torch.where(halves >= 0x8000, halves - 0x10000, halves).to(torch.int16)
    return signed.view(torch.float16)


def byte_perm(x: torch.Tensor, y: torch.Tensor, selector: int) -> torch.Tensor:
    """__byte_perm (prmt): byte n of the result is byte (selector >> 4n) & 7 of the 8 bytes y:x."""
    out = torch.zeros_like(x)
    for n in range(4):
        pick = (selector >> (4 * n)) & 7
        out |= (((x if pick < 4 else y) >> (8 * (pick % 4))) & 0xFF) << (8 * n)
    return out


def nibbles(words: torch.Tensor) -> torch.Tensor:
    """[..., n] 32-bit words -> [..., 8n] E2M1 codes, code 8w + i = bits [4i, 4i + 4) of word w."""
    return torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=-1).flatten(-2)


def e4m3_byte_values(byte: torch.Tensor) -> torch.Tensor:
    return byte.to(torch.uint8).view(torch.float8_e4m3fn).double()


def _words_with_every_code_everywhere(gen: torch.Generator) -> torch.Tensor:
    """Random 32-bit words, plus for each position and each of the 16 codes words holding that code there."""
    rand = torch.randint(0, 2**32, (4096,), dtype=torch.int64, generator=gen)
    placed = [(rand[:64] & ~(0xF << (4 * pos))) | (code << (4 * pos)) for pos in range(8) for code in range(16)]
    return torch.cat([rand, *placed, torch.tensor([0, 0xFFFFFFFF, 0x88888888, 0x77777777])])


def test_e2m1_pair_bit_trick_is_exact_for_every_code_at_every_position():
    """Pair i of a word (codes i and i + 4, 16 bits apart) becomes f16 e2m1 * 2^-14 exactly, -0 kept."""
    words = _words_with_every_code_everywhere(torch.Generator().manual_seed(0))
    codes = nibbles(words[:, None])
    for i in range(4):
        pair = e2m1_pair_f16x2(words, i).double()
        expected = torch.stack([nvfp4.e2m1_decode(codes[:, i]), nvfp4.e2m1_decode(codes[:, i + 4])], -1).double()
        assert torch.equal(pair * 2.0 ** 14, expected), i
        assert torch.equal(torch.signbit(pair), torch.stack([codes[:, i] >= 8, codes[:, i + 4] >= 8], -1))


def test_e2m1_times_block_scale_is_exact_in_f16():
    """mul.rn.f16x2(e2m1 * 2^-14, s * 2^7) = e2m1 * s * 2^-7 exactly for every code and every finite positive E4M3
    scale, subnormals included (emulated with torch's f16 multiply: fp32 product, one rounding to f16)."""
    codes = torch.arange(16, dtype=torch.int64)
    values = e2m1_pair_f16x2(codes, 0)[:, 0]  # code 0 of each word
    scale_bytes = torch.arange(1, 0x7F, dtype=torch.uint8)  # 0x7F is NaN
    scales = scale_bytes.view(torch.float8_e4m3fn).to(torch.float16) * 128  # nv4_scales_f16x2: exact (<= 57344)
    assert torch.isfinite(scales).all()
    product = (values[:, None].float() * scales[None, :].float()).to(torch.float16)  # one rounding, as mul.rn.f16
    exact = nvfp4.e2m1_decode(codes).double()[:, None] * scale_bytes.view(torch.float8_e4m3fn).double()[None, :] \
        * 2.0 ** -7
    assert torch.equal(product.double(), exact)


def _bf16_halves(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    as_f32 = lambda bits: bits.to(torch.int32).view(torch.float32).double()  # noqa: E731
    return as_f32((words & 0xFFFF) << 16), as_f32(words & 0xFFFF0000)


def kernel_nv4_k_dot_q(k_words: torch.Tensor, k_scale_bytes: torch.Tensor, q_words: torch.Tensor) -> torch.Tensor:
    """paged_attention_mma_kernel<NV4>: one thread's share of one key's score, its K A fragment (a[j], a[2 + j])
    times Q's B fragment (qf[kk][0], qf[kk][1]) over the k16 steps, element by element in the MMA's k order.
    k_words [n, S/8] (the key's slice of S dims), k_scale_bytes [n, S/16] (its block scales), q_words [n, S/2]."""
    total = torch.zeros(k_words.shape[0], dtype=torch.float64)
    for kk in range(k_words.shape[1] * 2):
        w = k_words[:, kk // 2]
        kbs = pack_bytes(k_scale_bytes)  # the 1, 2 or 4 scale bytes as one register
        scale = e4m3_byte_values(byte_perm(kbs, torch.zeros_like(kbs), (kk // 4) * 0x11) & 0xFF) * 128  # (s, s)
        a = torch.cat([e2m1_pair_f16x2(w, 2 * (kk & 1)), e2m1_pair_f16x2(w, 2 * (kk & 1) + 1)], -1).double()
        lo, hi = q_words[:, 4 * (kk // 2) + (kk & 1)], q_words[:, 4 * (kk // 2) + 2 + (kk & 1)]
        (lo0, lo1), (hi0, hi1) = _bf16_halves(lo), _bf16_halves(hi)
        b = torch.stack([lo0, hi0, lo1, hi1], -1)  # qf[kk][0] = (lo0, hi0), qf[kk][1] = (lo1, hi1)
        total += (a * scale[:, None] * b).sum(-1)
    return total


def pack_bytes(b: torch.Tensor) -> torch.Tensor:
    """[n, m <= 4] bytes -> [n] little-endian 32-bit words (as the kernel's ld_nc_bytes / load_words read them)."""
    return sum(b[:, i].long() << (8 * i) for i in range(b.shape[1]))


def kernel_nv4_v_fragments(v_words: torch.Tensor, v_scale_bytes: torch.Tensor) -> torch.Tensor:
    """paged_attention_mma_kernel<NV4>: the V A fragments of one thread, [n, S/2 m-tiles, 4 registers, 2 halves],
    as e2m1 * s * 2^-7. v_words [n, 4 keys (2c, 2c+1, 2c+8, 2c+9), S/8] (the keys' slices of S dims),
    v_scale_bytes [n, 4 keys, max(1, S/16)]."""
    steps = v_words.shape[2] * 4
    out = torch.empty(v_words.shape[0], steps, 4, 2, dtype=torch.float64)
    for i in range(0, steps, 2):
        for h in range(2):
            b = i // 8
            z = byte_perm(v_words[:, 2 * h, i // 4], v_words[:, 2 * h + 1, i // 4], 0x7632 if i & 2 else 0x5410)
            two = byte_perm(pack_bytes(v_scale_bytes[:, 2 * h]), pack_bytes(v_scale_bytes[:, 2 * h + 1]),
                            b | ((b + 4) << 4))
            scale = torch.stack([e4m3_byte_values(two & 0xFF), e4m3_byte_values((two >> 8) & 0xFF)], -1) * 128
            for t in range(2):
                out[:, i + t, 2 * h] = e2m1_pair_f16x2(z, 2 * t).double() * scale
                out[:, i + t, 2 * h + 1] = e2m1_pair_f16x2(z, 2 * t + 1).double() * scale
    return out


# A thread's K slice is D/4 dims, its V slice D/8 (head dim 512: the 128 dims of its warp): 64, 128, 256, 512.
NV4_SLICES = [(16, 8), (32, 16), (64, 32), (32, 16)]


def _random_scale_bytes(shape, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(1, 0x7F, shape, generator=gen)  # every finite positive E4M3, subnormals included


def _bf16_words(q: torch.Tensor) -> torch.Tensor:
    bits = q.to(torch.bfloat16).view(torch.int16).long() & 0xFFFF
    return bits[:, 0::2] | (bits[:, 1::2] << 16)


def _one_code_per_row(dims: int, code: int) -> torch.Tensor:
    """[dims, dims/8] words: row d holds `code` at dim d, 0 elsewhere."""
    d = torch.arange(dims)
    words = torch.zeros(dims, dims // 8, dtype=torch.int64)
    words[d, d // 8] = code << (4 * (d % 8))
    return words


@pytest.mark.parametrize("k_dims", sorted({k for k, _ in NV4_SLICES}))
def test_nv4_k_fragments_meet_q_in_the_same_dim_order(k_dims):
    """QK^T: K's pairs (codes i, i + 4 of a word) against Q's B fragments built in the same permuted order give
    exactly the dot product of the dequantized slice with q (random codes, scales and q; exact in float64), and a
    key with one nonzero dim d scores q[d] * 2^-7 for every d (each dim meets its own q, once)."""
    gen = torch.Generator().manual_seed(k_dims)
    n = 2000
    k_words = torch.randint(0, 2**32, (n, k_dims // 8), dtype=torch.int64, generator=gen)
    scale_bytes = _random_scale_bytes((n, k_dims // 16), gen)
    q = torch.randint(-128, 128, (n, k_dims), generator=gen).double()
    values = nvfp4.e2m1_decode(nibbles(k_words)).double() * e4m3_byte_values(scale_bytes).repeat_interleave(16, 1)
    expected = (values * q).sum(-1) * 2.0 ** -7
    assert torch.equal(kernel_nv4_k_dot_q(k_words, scale_bytes, _bf16_words(q)), expected)

    dims = torch.arange(k_dims)
    unit = torch.full((k_dims, k_dims // 16), 0x38)  # E4M3 1.0
    q_trace = (dims + 1).double().expand(k_dims, -1)
    scores = kernel_nv4_k_dot_q(_one_code_per_row(k_dims, 2), unit, _bf16_words(q_trace))  # code 2: 1.0
    assert torch.equal(scores, (dims + 1).double() * 2.0 ** -7)


@pytest.mark.parametrize("v_dims", sorted({v for _, v in NV4_SLICES}))
def test_nv4_v_fragments_pair_two_keys_per_dim(v_dims):
    """PV: m-tile i's registers a0..a3 hold (key 2c, key 2c+1) of dim 2i, the same of dim 2i + 1, then keys
    (2c+8, 2c+9) of dims 2i, 2i + 1 (the A layout of V^T [dims x keys]), each key with its own block scale."""
    gen = torch.Generator().manual_seed(100 + v_dims)
    words = _words_with_every_code_everywhere(gen)
    v_words = words[torch.randperm(words.numel(), generator=gen)][: words.numel() // (v_dims // 2) * (v_dims // 2)]
    v_words = v_words.view(-1, 4, v_dims // 8)
    scale_bytes = _random_scale_bytes((v_words.shape[0], 4, max(1, v_dims // 16)), gen)
    values = nvfp4.e2m1_decode(nibbles(v_words)).double() \
        * e4m3_byte_values(scale_bytes).repeat_interleave(16, -1)[..., :v_dims] * 2.0 ** -7  # [n, key, dim]
    frags = kernel_nv4_v_fragments(v_words, scale_bytes)
    layout_of_a = (((0, 1), 0), ((0, 1), 1), ((2, 3), 0), ((2, 3), 1))  # (keys, dim - 2i) of a0..a3
    for i in range(v_dims // 2):
        for reg, (keys, dim) in enumerate(layout_of_a):
            assert torch.equal(frags[:, i, reg], values[:, keys, 2 * i + dim]), (i, reg)


def kernel_e2m1_encode(q: torch.Tensor) -> torch.Tensor:
    """csrc/attention.cu e2m1_encode: comparisons against the midpoints, the reference's tie rule."""
    a = q.abs()
    code = ((a > 0.25).int() + (a >= 0.75).int() + (a > 1.25).int() + (a >= 1.75).int() + (a > 2.5).int()
            + (a >= 3.5).int() + (a > 5.0).int())
    return (code | torch.where(q < 0, 8, 0)).to(torch.uint8)


def test_store_kernel_encode_matches_the_reference_codec():
    """Midpoints, their fp32 neighbours, saturation, signed zeros and random values: the kernel's comparisons give
    adaq.formats.nvfp4.e2m1_encode's codes."""
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 1e30, 0.0])
    near = torch.cat([mids, torch.nextafter(mids, torch.zeros_like(mids)), torch.nextafter(mids, mids + 1)])
    q = torch.cat([near, -near, torch.tensor([-0.0]), torch.randn(100000) * 3])
    assert torch.equal(kernel_e2m1_encode(q), nvfp4.e2m1_encode(q))


def kernel_exponent(amax: torch.Tensor) -> torch.Tensor:
    """csrc/attention.cu nvfp4_kv_exponent from the fp32 bits of amax / 2688."""
    bits = (amax.float() / 2688.0).view(torch.int32).long()
    biased = bits >> 23
    e = biased - 127 + ((bits & 0x7FFFFF) != 0).long()
    return torch.where(biased == 0, torch.full_like(e, -100), e.clamp(-100, 100))


def test_store_kernel_exponent_matches_the_reference():
    from adaq.backends.numerics.attention import nvfp4_kv_exponent

    amax = torch.cat([torch.tensor([0.0, 2688.0, 2688.0 * 2, 2688.0 * 2 ** -50, 1e-38, 1e-45, 3e38, 6.0]),
                      torch.exp2(torch.rand(10000) * 200 - 100), torch.rand(1000) * 1e4])
    assert torch.equal(kernel_exponent(amax), nvfp4_kv_exponent(amax).long())


@pytest.mark.parametrize("experts,hidden,inter,group_values", [(5, 256, 48, 1 << 26), (7, 128, 32, 3 * 64 * 128)])
def test_experts_repacked_by_groups_equal_one_repack_each(monkeypatch, experts, hidden, inter, group_values):
    """The cuda backend repacks a MoE layer's experts a group at a time (rows concatenated); the stacked result is
    the stack of one repack per expert, bit for bit, whatever the grouping, different global scales included."""
    from adaq.backends import cuda
    from adaq.kernels import ops

    monkeypatch.setattr(cuda, "EXPERT_GROUP_VALUES", group_values)
    gate_up = [[random_weight(inter, hidden, 10 * e), random_weight(inter, hidden, 10 * e + 1)] for e in range(experts)]
    down = [random_weight(hidden, inter, 10 * e + 2) for e in range(experts)]
    gate_up[1][1].global_scale = gate_up[1][1].global_scale * 2  # a pair whose scales differ
    grouped = cuda.stacked_by_groups(gate_up, down, "cpu")
    backend = types.SimpleNamespace(device=torch.device("cpu"))  # _fused_pair reads only the device
    fused = [cuda.CudaBackend._fused_pair(backend, pair) for pair in gate_up]
    one_each = ops.StackedExperts(fused, [layout.repack(w, "cpu") for w in down])
    assert grouped.num_experts == one_each.num_experts == experts
    assert (grouped.intermediate, grouped.hidden) == (one_each.intermediate, one_each.hidden) == (inter, hidden)
    for mine, theirs in ((grouped.gate_up, one_each.gate_up), (grouped.down, one_each.down)):
        assert all(torch.equal(a, b) for a, b in zip(mine[:3], theirs[:3]))
        assert mine[3:] == theirs[3:]


def _binding_flags(stub: "Path") -> list[str] | None:
    """g++ flags for a syntax check of binding.cpp against this torch's headers, or None where they cannot serve.
    A CPU torch wheel ships c10/cuda's headers but not the CUDA build's generated cmake-macros header: a stub
    stands in for it (it only names how c10_cuda was linked)."""
    from torch.utils.cpp_extension import include_paths
    import sysconfig

    cuda_include = Path("/usr/local/cuda/include")
    if shutil.which("g++") is None or not (cuda_include / "cuda_runtime_api.h").exists():
        return None
    (stub / "c10/cuda/impl").mkdir(parents=True)
    (stub / "c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n")
    return ["-std=c++17", "-fsyntax-only", *[f"-I{p}" for p in include_paths()], f"-I{stub}",
            f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_include}", f"-I{build.CSRC}",
            "-DTORCH_EXTENSION_NAME=adaq_syntax_check"]


def test_binding_compiles(tmp_path):
    """The host bindings (binding.cpp: shape checks, workspaces, launches) compile, without a GPU or a full build."""
    import subprocess

    flags = _binding_flags(tmp_path)
    if flags is None:
        pytest.skip("needs g++ and the CUDA headers")
    done = subprocess.run(["g++", *flags, str(build.CSRC / build.BINDING)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

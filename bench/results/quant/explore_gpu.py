"""Exploration of method variants on the real Gemma3-270M (H100, fp32, TF32 off): the ablations in README.md.

Each spec (JSON) quantizes the decoder Linears in place (fake quant: weights replaced by their NVFP4 dequantization,
rounded to bf16 as transformers' decompression gives them; W4A4 also quantizes each Linear's input), then scores
WikiText-2 test with data/README.md's windows (64 x 512, BOS + 511, exp mean NLL). Calibration: `samples` windows of
512 tokens of valid.txt picked at random (seed 0), `<unk>` read as text. Needs the bf16 folder at $QM_MODEL and the
two text files in $QM_DATA. Run from the repository root:

    PYTHONPATH=. python3 bench/results/quant/explore_gpu.py '{"method":"rtn"}' '{"method":"gptq","samples":64}'
"""
import json, os, sys, time, argparse
from pathlib import Path
import torch
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
from transformers import AutoModelForCausalLM, AutoTokenizer
from adaq.formats import nvfp4 as F
from adaq.eval.perplexity import make_windows
from adaq.quant import scale_search as S, gptq as G, activation_aware as A

DEV = "cuda" if torch.cuda.is_available() else "cpu"
MODEL = Path(os.environ.get("QM_MODEL", "/root/qm/gemma3-270m-bf16"))
DATA = Path(os.environ.get("QM_DATA", "data/wikitext-2"))
OUT = Path(os.environ.get("OUT", "/tmp"))

def build_model():
    if (MODEL / "config.json").is_file():
        return  # else: rebuild it from the GGUF copied to /root/qm (the device has no package registry)
    from adaq.formats.gguf import gguf_to_hf_folder
    gguf = Path("/root/qm/gemma-3-270m-q4_k_m.gguf")
    gguf_to_hf_folder(gguf, MODEL, dtype="bfloat16")

def calibration_ids(tok, path, num_samples, seq_len=512, seed=0):
    ids = torch.tensor(tok(Path(path).read_text(), add_special_tokens=False, split_special_tokens=True)["input_ids"])
    span = seq_len - 1
    picked = torch.randperm(len(ids) // span, generator=torch.Generator().manual_seed(seed))[:num_samples].sort().values
    body = torch.stack([ids[w * span:(w + 1) * span] for w in picked.tolist()])
    return torch.cat([torch.full((num_samples, 1), tok.bos_token_id, dtype=body.dtype), body], dim=1)

def log(res):
    print(json.dumps(res), flush=True)
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")

@torch.no_grad()
def ppl(model, windows, bs=8):
    tot, n = 0.0, 0
    for b in windows.split(bs):
        b = b.to(DEV)
        logits = model(input_ids=b, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="none")
        tot += nll.double().sum().item(); n += nll.numel()
    import math
    return math.exp(tot / n)

def act_quant_hook(igs):
    def hook(_m, args):
        x = args[0]
        blocks = x.float().unflatten(-1, (-1, 16))
        scale = F.block_scales(x.float().reshape(-1, x.shape[-1]), igs).float().reshape(blocks.shape[:-1])
        step = (scale / igs).unsqueeze(-1)
        return (S.e2m1_round(blocks / step) * step).flatten(-2).to(x.dtype)
    return hook

def run(model, orig, calib, windows, spec):
    t0 = time.time()
    name = spec["method"]; w4a4 = spec.get("w4a4", False)
    cfg = S.SearchConfig(codes_below=spec.get("below", 3), codes_above=spec.get("above", 10))
    hooks = []
    def quant_layer(index, layer, stats):
        lins = A.linear_modules(layer)
        prefix = f"model.layers.{index}."
        for group in A.FusedGroups().of(list(lins)):
            ws = [orig[prefix + n].to(DEV) for n in group]
            g = S.rtn_global_scale(ws)
            if name == "rtn":
                qs = [F.quantize(w, g) for w in ws]
            elif name == "search":
                qs = [S.quantize_searched(w, g, None, cfg) for w in ws]
            elif name == "search-aw":
                qs = [S.quantize_searched(w, g, stats[n].mean_square ** spec.get("alpha", 1.0), cfg) for w, n in zip(ws, group)]
            elif name == "gptq":
                gc = G.GPTQConfig(damp=spec.get("damp", 0.01), search=cfg if spec.get("search", True) else None)
                qs = G.gptq_quantize_group(ws, stats[group[0]].hessian, g, gc)
            for n, q in zip(group, qs):
                lins[n].weight.data.copy_(F.dequantize(q, torch.bfloat16).float())
                if w4a4:
                    amax = torch.tensor(stats[n].amax, dtype=torch.bfloat16, device=DEV)
                    igs = F.global_scale_from_amax(amax).to(DEV)
                    hooks.append(lins[n].register_forward_pre_hook(act_quant_hook(igs)))
    if name != "bf16":
        A.calibrate_layerwise(model, calib, quant_layer,
                              A.CalibrationConfig(micro_batch=spec.get("mb", 8), sequential=spec.get("seq", True)),
                              with_hessian=(name == "gptq"))
    torch.cuda.synchronize(); tq = time.time() - t0
    p = ppl(model, windows)
    for h in hooks: h.remove()
    for n, m in model.named_modules():
        if n in orig: m.weight.data.copy_(orig[n].float())
    log(dict(spec, ppl=p, quant_s=round(tq, 1)))

def main():
    build_model()
    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).to(DEV).eval()
    orig = {n: m.weight.data.to(torch.bfloat16).clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}
    windows = torch.tensor(make_windows(tok, (DATA / "test.txt").read_text(encoding="utf-8"), 512, 64))
    calibs = {}
    specs = [json.loads(s) for s in sys.argv[1:]]
    for spec in specs:
        ns = spec.get("samples", 32)
        if ns not in calibs:
            calibs[ns] = calibration_ids(tok, DATA / "valid.txt", ns).to(DEV)
        try:
            run(model, orig, calibs[ns], windows, spec)
        except Exception as e:
            import traceback; traceback.print_exc()
            log(dict(spec, error=repr(e)))

main()

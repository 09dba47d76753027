"""GPU exploration (not shipped): quantize the real Gemma3-270M with method variants, WikiText-2 ppl on 64 windows."""
import json, os, sys, time, argparse
from pathlib import Path
import torch
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
from transformers import AutoModelForCausalLM, AutoTokenizer
from adaq.formats import nvfp4 as F
from adaq.quant import scale_search as S, gptq as G, activation_aware as A, compare as C

DEV = "cuda"
MODEL = Path("/root/qm/gemma3-270m-bf16")
DATA = Path(os.environ.get("QM_DATA", ".cache/qm/data"))
OUT = Path(os.environ.get("OUT", "/tmp"))

def build_model():
    if (MODEL / "config.json").is_file():
        return
    from adaq.formats.gguf import gguf_to_hf_folder
    gguf = Path("/root/qm/gemma-3-270m-q4_k_m.gguf")
    gguf_to_hf_folder(gguf, MODEL, dtype="bfloat16")

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
                              A.CalibrationConfig(num_samples=len(calib), micro_batch=spec.get("mb", 8), sequential=spec.get("seq", True)),
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
    windows = C.wikitext_windows(tok, DATA / "test.txt", max_windows=64)
    calibs = {}
    specs = [json.loads(s) for s in sys.argv[1:]]
    for spec in specs:
        ns = spec.get("samples", 32)
        if ns not in calibs:
            calibs[ns] = A.calibration_ids(tok, DATA / "valid.txt", A.CalibrationConfig(num_samples=ns)).to(DEV)
        try:
            run(model, orig, calibs[ns], windows, spec)
        except Exception as e:
            import traceback; traceback.print_exc()
            log(dict(spec, error=repr(e)))

main()

"""Calibration data and activation statistics for W4A4 (`--scheme nvfp4`).

Data: a text file (.txt: the whole file; .jsonl / .json: a "text" field or plain strings; .parquet: a "text"
column) or a folder of them. The texts are joined, tokenized once, and cut into `num_samples` windows of
`seq_len` tokens (BOS first when the tokenizer adds one), as llm-compressor's examples do with WikiText.

Statistics: the absolute maximum of each quantized Linear's input over all windows, through transformers' model
in its stored dtype (the statistic llm-compressor's `static_minmax` observer keeps). MoE experts see every
calibration token, as llm-compressor's `moe_calibrate_all_experts` does, so no expert is left uncalibrated.
"""

import json
from pathlib import Path

import torch

from adaq.errors import AdaqError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def _texts_from_file(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return [path.read_text(errors="replace")]
    if path.suffix == ".parquet":
        import pandas

        frame = pandas.read_parquet(path)
        if "text" not in frame.columns:
            raise AdaqError(f"{path}: a calibration parquet file needs a 'text' column (has {list(frame.columns)})")
        return [str(t) for t in frame["text"]]
    text = path.read_text(errors="replace")  # bytes that are not UTF-8 then fail as JSON, in one line
    lines = text.splitlines() if path.suffix == ".jsonl" else [text]
    rows = []
    for line in filter(str.strip, lines):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise AdaqError(f"{path}: not valid JSON ({error})") from None
        rows.extend(value if isinstance(value, list) else [value])
    return [row["text"] if isinstance(row, dict) else str(row) for row in rows]


def load_texts(path: str | Path) -> list[str]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in TEXT_SUFFIXES)
        if not files:
            raise AdaqError(f"{path}: no calibration files ({', '.join(TEXT_SUFFIXES)}) in this folder")
    elif path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise AdaqError(f"{path}: calibration data must be {', '.join(TEXT_SUFFIXES)} or a folder of them")
        files = [path]
    else:
        raise AdaqError(f"{path}: calibration data not found")
    texts = [text for file in files for text in _texts_from_file(file) if text.strip()]
    if not texts:
        raise AdaqError(f"{path}: calibration data holds no text")
    return texts


def calibration_windows(tokenizer, texts: list[str], num_samples: int, seq_len: int) -> torch.Tensor:
    """[n, seq_len] token ids: consecutive windows of the joined texts, each starting with BOS if the model uses one."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    body = seq_len - len(bos)
    count = min(num_samples, len(ids) // body)
    if count == 0:
        raise AdaqError(f"calibration data has {len(ids)} tokens, fewer than one window of --seq-len {seq_len}")
    return torch.tensor([bos + ids[i * body:(i + 1) * body] for i in range(count)])


def _experts_hook(prefix: str, stats: dict[str, torch.Tensor], quantized: set[str]):
    """Every expert on every token: gate/up see the block's input, down sees act(gate) * up."""

    def hook(module, args, _output):
        hidden = args[0].reshape(-1, args[0].shape[-1])
        _record(stats, quantized, [f"{prefix}.{e}.{p}" for e in range(module.num_experts)
                                   for p in ("gate_proj", "up_proj")], hidden.abs().amax())
        for expert in range(module.num_experts):
            gate, up = torch.nn.functional.linear(hidden, module.gate_up_proj[expert]).chunk(2, dim=-1)
            _record(stats, quantized, [f"{prefix}.{expert}.down_proj"], (module.act_fn(gate) * up).abs().amax())

    return hook


def _record(stats: dict[str, torch.Tensor], quantized: set[str], names: list[str], amax: torch.Tensor) -> None:
    for name in names:
        if name in quantized:
            stats[name] = torch.maximum(stats[name], amax) if name in stats else amax.detach()


def _attach_hooks(model, quantized: set[str], stats: dict[str, torch.Tensor]) -> list:
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name in quantized:
            hook = lambda _m, args, n=name: _record(stats, quantized, [n], args[0].abs().amax())  # noqa: E731
            handles.append(module.register_forward_pre_hook(hook))
        elif hasattr(module, "gate_up_proj") and hasattr(module, "num_experts"):
            handles.append(module.register_forward_hook(_experts_hook(name, stats, quantized)))
    return handles


def calibrate_input_amax(job, plan) -> dict[str, torch.Tensor]:
    """amax(|input|) of every Linear in plan.quantize over the calibration windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # adaq draws its own bars

    if job.calibration is None:
        raise AdaqError("--scheme nvfp4 calibrates activation scales: pass --calib-data FILE|DIR "
                        "(text, .jsonl, .json or .parquet)")
    spec = job.calibration
    tokenizer = AutoTokenizer.from_pretrained(str(job.source))
    windows = calibration_windows(tokenizer, load_texts(spec.path), spec.num_samples, spec.seq_len)
    model = AutoModelForCausalLM.from_pretrained(str(job.source), dtype="auto", use_safetensors=True)
    model = model.to(job.device).eval()
    stats: dict[str, torch.Tensor] = {}
    handles = _attach_hooks(model, set(plan.quantize), stats)
    task = job.progress.task("calibrating", len(windows))
    try:
        with torch.no_grad():
            for window in windows:
                model(input_ids=window[None].to(job.device), use_cache=False)
                job.progress.advance(task)
    finally:
        for handle in handles:
            handle.remove()
    missing = [p for p in plan.quantize if p not in stats]
    if missing:
        raise AdaqError(f"calibration saw no input for {len(missing)} Linear layers, e.g. {missing[0]}")
    return {name: amax.cpu() for name, amax in stats.items()}

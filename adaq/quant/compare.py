"""WikiText-2 perplexity exactly as `../shared/data/README.md` defines it, for comparing quantization methods.

Windows: tokenize the whole test text once (no special tokens added, `<unk>` read as plain text), cut the ids into
consecutive chunks of seq_len-1, prepend BOS to each; score tokens 2..seq_len of every window; perplexity =
exp(mean negative log-likelihood). adaq's engine-backed `adaq eval ppl` is the reference for reported figures;
this one runs a transformers model (fp32) so that methods can be compared while they are being developed and so
that transformers' own decompression of a checkpoint can be checked against adaq's numbers.
"""

import math
from pathlib import Path

import torch

from adaq.errors import AdaqError


def wikitext_windows(tokenizer, text_path: str | Path, seq_len: int = 512, max_windows: int | None = 64
                     ) -> torch.Tensor:
    """[W, seq_len] token ids: BOS + consecutive chunks of seq_len-1 tokens of the whole text."""
    path = Path(text_path)
    if not path.is_file():
        raise AdaqError(f"no such text file: {path}")
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False,
                    split_special_tokens=True)["input_ids"]
    span = seq_len - 1
    count = len(ids) // span if max_windows is None else min(max_windows, len(ids) // span)
    if count == 0:
        raise AdaqError(f"{path} holds fewer than {span} tokens")
    body = torch.tensor(ids[:count * span]).view(count, span)
    return torch.cat([torch.full((count, 1), tokenizer.bos_token_id, dtype=body.dtype), body], dim=1)


@torch.no_grad()
def window_nll(model, window: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood (fp32) of tokens 2..T of one window [T] under a transformers causal LM."""
    logits = model(input_ids=window.unsqueeze(0), use_cache=False).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, window[1:], reduction="none")


def perplexity(model, windows: torch.Tensor, progress=None) -> float:
    """exp(mean NLL) over all scored tokens of all windows."""
    total, count = 0.0, 0
    for index, window in enumerate(windows):
        nll = window_nll(model, window)
        total, count = total + nll.double().sum().item(), count + nll.numel()
        if progress:
            progress(index + 1, len(windows))
    return math.exp(total / count)

"""GGUF files as HF folders: weights dequantized through transformers, and a correct SentencePiece-style tokenizer.

transformers turns a GGUF "llama"-model (SentencePiece) vocabulary into a Unigram model built from BPE rank scores
and adds no BOS, which splits ordinary words into fragments (NOTES). llama.cpp's SPM tokenizer instead merges, over
and over, the adjacent pair whose concatenation is the highest-scoring token. A BPE whose merges are every split of
a normal token into two normal tokens, ranked by the merged token's score, reproduces it; unknown characters fall
back to <0xXX> byte tokens, and control/user-defined tokens are matched first, on the raw text, as added tokens.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adaq.errors import CheckpointError

# GGUF metadata value types -> (struct format, numpy dtype) for the fixed-size ones.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class _Cursor:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.take("<Q")
        value = self.data[self.pos:self.pos + length].decode("utf-8", errors="replace")
        self.pos += length
        return value

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            return self.array()
        return self.take(_SCALARS[kind])

    def array(self):
        kind, count = self.take("<I"), self.take("<Q")
        if kind in _SCALARS:
            dtype = np.dtype(_SCALARS[kind])
            values = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
            self.pos += dtype.itemsize * count
            return values
        return [self.value(kind) for _ in range(count)]


def read_gguf_metadata(path: str | Path) -> dict:
    """The key/value metadata of a GGUF file (arrays of numbers as numpy arrays), without touching its tensors."""
    path = Path(path)
    with path.open("rb") as handle:
        head = handle.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file")
        handle.seek(0)
        data = handle.read(_metadata_size_bound(path))
    cursor = _Cursor(data)
    cursor.pos = 8
    _tensor_count, kv_count = cursor.take("<Q"), cursor.take("<Q")
    try:
        return {cursor.string(): cursor.value(cursor.take("<I")) for _ in range(kv_count)}
    except (struct.error, KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: corrupt GGUF metadata ({error})") from None


def _metadata_size_bound(path: Path) -> int:
    # The metadata sits at the front; vocabularies of a few hundred thousand tokens stay well under 64 MB.
    return min(path.stat().st_size, 64 << 20)


@dataclass
class SpmVocab:
    tokens: list[str]
    scores: np.ndarray
    types: np.ndarray
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool

    @classmethod
    def from_metadata(cls, meta: dict) -> "SpmVocab":
        get = meta.get
        return cls(
            tokens=list(meta["tokenizer.ggml.tokens"]),
            scores=np.asarray(meta["tokenizer.ggml.scores"], dtype=np.float32),
            types=np.asarray(meta["tokenizer.ggml.token_type"], dtype=np.int32),
            bos_id=_opt_int(get("tokenizer.ggml.bos_token_id")),
            eos_id=_opt_int(get("tokenizer.ggml.eos_token_id")),
            unk_id=_opt_int(get("tokenizer.ggml.unknown_token_id")),
            pad_id=_opt_int(get("tokenizer.ggml.padding_token_id")),
            add_bos=bool(get("tokenizer.ggml.add_bos_token", True)),
            add_eos=bool(get("tokenizer.ggml.add_eos_token", False)),
            add_space_prefix=bool(get("tokenizer.ggml.add_space_prefix", True)),
        )


def _opt_int(value) -> int | None:
    return None if value is None else int(value)


def spm_merges(vocab: SpmVocab) -> list[tuple[str, str]]:
    """Every split of a normal token into two normal tokens, the highest-scoring merged token first."""
    normal = {token for token, kind in zip(vocab.tokens, vocab.types) if kind == NORMAL}
    ranked = []
    for token_id, (token, kind) in enumerate(zip(vocab.tokens, vocab.types)):
        if kind != NORMAL or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-float(vocab.scores[token_id]), token_id, cut, left, right))
    ranked.sort(key=lambda item: item[:3])
    return [(left, right) for *_, left, right in ranked]


def build_spm_tokenizer(vocab: SpmVocab):
    """A `tokenizers.Tokenizer` that reproduces llama.cpp's SPM tokenization of this vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    unk = vocab.tokens[vocab.unk_id] if vocab.unk_id is not None else None
    model = BPE(vocab={token: index for index, token in enumerate(vocab.tokens)}, merges=spm_merges(vocab),
                unk_token=unk, fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(model)
    steps = [normalizers.Prepend("▁")] if vocab.add_space_prefix else []
    tokenizer.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    decode_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode_steps)
    tokenizer.add_tokens([AddedToken(vocab.tokens[i], special=False, normalized=False)
                          for i in np.flatnonzero(vocab.types == USER_DEFINED)])
    tokenizer.add_special_tokens([AddedToken(vocab.tokens[i], special=True, normalized=False)
                                  for i in np.flatnonzero((vocab.types == CONTROL) | (vocab.types == UNKNOWN))])
    tokenizer.post_processor = _post_processor(vocab, processors)
    return tokenizer


def _post_processor(vocab: SpmVocab, processors):
    bos = [vocab.tokens[vocab.bos_id]] if vocab.add_bos and vocab.bos_id is not None else []
    eos = [vocab.tokens[vocab.eos_id]] if vocab.add_eos and vocab.eos_id is not None else []
    single = " ".join(bos + ["$A"] + eos)
    pair = " ".join(bos + ["$A"] + eos + bos + ["$B:1"] + eos)
    special = {vocab.tokens[i]: i for i in (vocab.bos_id, vocab.eos_id) if i is not None}
    used = {name: index for name, index in special.items() if name in bos + eos}
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(used.items()))


def save_spm_tokenizer(vocab: SpmVocab, folder: Path, chat_template: str | None = None) -> None:
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja) that AutoTokenizer loads as-is."""
    build_spm_tokenizer(vocab).save(str(folder / "tokenizer.json"))
    name = lambda index: None if index is None else vocab.tokens[index]  # noqa: E731
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(vocab.bos_id), "eos_token": name(vocab.eos_id),
        "unk_token": name(vocab.unk_id), "pad_token": name(vocab.pad_id),
        "add_bos_token": vocab.add_bos, "add_eos_token": vocab.add_eos,
        "clean_up_tokenization_spaces": False, "padding_side": "left",
        "model_max_length": 1_000_000_000,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {key: config[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token") if config[key]}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    if chat_template:
        (folder / "chat_template.jinja").write_text(chat_template)


def gguf_to_hf_folder(gguf_path: str | Path, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Dequantize a GGUF model with transformers into `out_dir` (safetensors, config, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    meta = read_gguf_metadata(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    # The GGUF marker would make the saved folder claim to be quantized (and transformers refuses to save it).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(getattr(torch, dtype)).save_pretrained(str(out_dir))
    if meta.get("tokenizer.ggml.model") == "llama" and "tokenizer.ggml.merges" not in meta:
        save_spm_tokenizer(SpmVocab.from_metadata(meta), out_dir, meta.get("tokenizer.chat_template"))
    else:
        AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(str(out_dir))
    _drop_gguf_marker(out_dir)
    return out_dir


def _drop_gguf_marker(folder: Path) -> None:
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("quantization_config", None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


"""A strict reader of safetensors headers: proves a file is well formed before any tensor is loaded.

Layout (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of UTF-8
JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the data region,
which the offsets (relative to its start) must cover exactly: no overlaps, no holes, nothing after the end.
Nothing here unpickles: .bin/.pt checkpoints are refused by name.
"""

import json
import math
import struct
from pathlib import Path

from adaq.errors import CheckpointError

METADATA_KEY = "__metadata__"
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
SHARD_INDEX = "model.safetensors.index.json"


def check_safetensors(path: str | Path) -> dict:
    """Validate one .safetensors file from its header and size alone; return the header as the file holds it.

    The returned dict maps tensor names to {"dtype", "shape", "data_offsets"} and may hold "__metadata__";
    use tensor_entries() to iterate over the tensors only. Raises CheckpointError naming the file and tensor.
    A file checked before and unchanged since (same size and mtime) returns the same dict: do not modify it.
    """
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _CHECKED:
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.pop(next(iter(_CHECKED)))
        _CHECKED[key] = check_unchanged_file(path, stat.st_size)
    return _CHECKED[key]


_CHECKED: dict[tuple[str, int, int], dict] = {}  # headers already proven, so opening a folder twice reads once
_CHECKED_MAX = 256


def check_unchanged_file(path: Path, file_size: int) -> dict:
    header_size, header = read_header(path, file_size)
    data_size = file_size - 8 - header_size
    spans = [check_entry(path, name, entry) for name, entry in tensor_entries(header).items()]
    check_coverage(path, spans, data_size)
    return header


def tensor_entries(header: dict) -> dict[str, dict]:
    return {name: entry for name, entry in header.items() if name != METADATA_KEY}


def tensor_nbytes(entry: dict) -> int:
    return math.prod(entry["shape"]) * DTYPE_BITS[entry["dtype"]] // 8


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: adaq reads safetensors only and never unpickles {path.suffix} checkpoints; "
                              "convert it to .safetensors first")


def read_header(path: Path, file_size: int) -> tuple[int, dict]:
    if file_size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({file_size} bytes, no 8-byte header length)")
    with path.open("rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        if header_size > min(file_size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{path}: header length {header_size} exceeds the file "
                                  f"({file_size} bytes): truncated or not a safetensors file")
        raw = handle.read(header_size)
    return header_size, parse_header(path, raw)


def parse_header(path: Path, raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=lambda pairs: no_duplicates(path, pairs))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: header is not valid UTF-8 JSON ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    metadata = header.get(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: {METADATA_KEY} must map strings to strings")
    return header


def no_duplicates(path: Path, pairs: list[tuple[str, object]]) -> dict:
    mapping = dict(pairs)
    if len(mapping) != len(pairs):
        names = [key for key, _ in pairs]
        duplicate = next(key for key in names if names.count(key) > 1)
        raise CheckpointError(f"{path}: header names {duplicate} twice")
    return mapping


def check_entry(path: Path, name: str, entry: object) -> tuple[int, int, str]:
    """One tensor's entry: known dtype, a shape of non-negative ints, offsets whose span equals its size."""
    where = f"{path}: tensor {name}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{where}: entry needs dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_count(o) for o in offsets):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if end < begin:
        raise CheckpointError(f"{where}: data_offsets end {end} is before begin {begin}")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != end - begin:
        raise CheckpointError(f"{where}: shape {shape} of {dtype} needs {bits / 8:g} bytes "
                              f"but its data_offsets span {end - begin}")
    return begin, end, name


def is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_coverage(path: Path, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """The spans must tile the data region exactly, as the safetensors library itself requires."""
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < position:
            raise CheckpointError(f"{path}: tensor {name} (bytes {begin}..{end}) overlaps tensor {previous}")
        if begin > position:
            raise CheckpointError(f"{path}: tensor {name} starts at byte {begin}, leaving a hole after byte {position}")
        position, previous = end, name
    if position > data_size:
        raise CheckpointError(f"{path}: truncated: tensor {previous} ends at data byte {position} "
                              f"but the file holds only {data_size} data bytes")
    if position < data_size:
        raise CheckpointError(f"{path}: {data_size - position} unexpected bytes after the last tensor")


def check_safetensors_folder(folder: str | Path) -> dict[Path, dict]:
    """Check every shard of a checkpoint folder (and its shard index, if any); return each shard's header."""
    folder = Path(folder)
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        found = f" (found {', '.join(pickles)})" if pickles else ""
        raise CheckpointError(f"{folder}: no *.safetensors files{found}; adaq reads safetensors only, never pickles")
    headers = {shard: check_safetensors(shard) for shard in shards}
    check_unique_names(headers)
    check_shard_index(folder, headers)
    return headers


def check_unique_names(headers: dict[Path, dict]) -> None:
    owner: dict[str, Path] = {}
    for shard, header in headers.items():
        for name in tensor_entries(header):
            if name in owner:
                raise CheckpointError(f"{shard}: tensor {name} is also in {owner[name].name}")
            owner[name] = shard


def check_shard_index(folder: Path, headers: dict[Path, dict]) -> None:
    index_file = folder / SHARD_INDEX
    if not index_file.is_file():
        return
    try:
        weight_map = json.loads(index_file.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_file}: not valid JSON with a weight_map")
    names = {shard.name: tensor_entries(header) for shard, header in headers.items()}
    for tensor, shard in weight_map.items():
        if shard not in names:
            raise CheckpointError(f"{index_file}: tensor {tensor} is mapped to {shard}, which is missing")
        if tensor not in names[shard]:
            raise CheckpointError(f"{folder / shard}: tensor {tensor} is listed in {SHARD_INDEX} but not in the file")

"""The strict safetensors header reader: every malformed file is refused with a one-line CheckpointError."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from adaq.errors import CheckpointError
from adaq.formats.safetensors_check import check_safetensors, check_safetensors_folder, tensor_entries


def good_file(path):
    save_file({"a": torch.zeros(4, 8, dtype=torch.bfloat16), "b": torch.arange(6, dtype=torch.uint8),
               "s": torch.ones(1, dtype=torch.float32), "f8": torch.zeros(2, 16).to(torch.float8_e4m3fn)},
              path, metadata={"format": "pt"})
    return path


def raw_file(path, header: dict | bytes, data: bytes = b"", length: int | None = None):
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def expect_error(path, *fragments):
    with pytest.raises(CheckpointError) as caught:
        check_safetensors(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_accepts_a_file_safetensors_wrote(tmp_path):
    header = check_safetensors(good_file(tmp_path / "m.safetensors"))
    assert header["__metadata__"] == {"format": "pt"}
    entry = tensor_entries(header)["a"]
    assert (entry["dtype"], entry["shape"], entry["data_offsets"][1] - entry["data_offsets"][0]) == ("BF16", [4, 8], 64)
    assert set(tensor_entries(header)) == {"a", "b", "s", "f8"}


def test_truncated_file(tmp_path):
    path = good_file(tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[:-3])
    expect_error(path, "truncated")


def test_file_shorter_than_length_prefix(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\x01\x02")
    expect_error(path, "truncated")


def test_header_length_past_the_end(tmp_path):
    expect_error(raw_file(tmp_path / "m.safetensors", {}, length=10_000), "header length 10000 exceeds")


def test_header_not_json(tmp_path):
    expect_error(raw_file(tmp_path / "m.safetensors", b"{not json"), "not valid UTF-8 JSON")


def test_header_not_an_object(tmp_path):
    expect_error(raw_file(tmp_path / "m.safetensors", b"[1, 2]"), "not a JSON object")


def test_unknown_dtype(tmp_path):
    header = {"w": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 2]}}
    expect_error(raw_file(tmp_path / "m.safetensors", header, b"\0\0"), "tensor w", "unknown dtype 'Q4_K'")


def test_header_lies_about_size(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}
    expect_error(raw_file(tmp_path / "m.safetensors", header, bytes(32)), "tensor w", "needs 64 bytes", "span 32")


def test_bad_shape_and_offsets(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}}
    expect_error(raw_file(tmp_path / "a.safetensors", header, bytes(16)), "tensor w", "shape")
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}
    expect_error(raw_file(tmp_path / "b.safetensors", header, bytes(16)), "tensor w", "before begin")
    header = {"w": {"dtype": "F32", "shape": [4]}}
    expect_error(raw_file(tmp_path / "c.safetensors", header, bytes(16)), "tensor w", "data_offsets")


def test_overlapping_tensors(tmp_path):
    header = {"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
              "b": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]}}
    expect_error(raw_file(tmp_path / "m.safetensors", header, bytes(12)), "tensor b", "overlaps tensor a")


def test_hole_between_tensors(tmp_path):
    header = {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
              "b": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]}}
    expect_error(raw_file(tmp_path / "m.safetensors", header, bytes(12)), "tensor b", "hole")


def test_span_past_the_data(tmp_path):
    header = {"a": {"dtype": "U8", "shape": [64], "data_offsets": [0, 64]}}
    expect_error(raw_file(tmp_path / "m.safetensors", header, bytes(10)), "truncated", "tensor a")


def test_trailing_bytes(tmp_path):
    header = {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}
    expect_error(raw_file(tmp_path / "m.safetensors", header, bytes(9)), "5 unexpected bytes")


def test_duplicate_names(tmp_path):
    body = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, ' \
           b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}'
    expect_error(raw_file(tmp_path / "m.safetensors", body, bytes(2)), "names a twice")


def test_bad_metadata(tmp_path):
    header = {"__metadata__": {"n": 1}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    expect_error(raw_file(tmp_path / "m.safetensors", header, bytes(1)), "__metadata__")


def test_refuses_pickles_without_opening_them(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"\x80\x04 would be a pickle")
    expect_error(path, "safetensors only", "never unpickles")


def test_folder_without_safetensors_names_the_pickles(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(CheckpointError, match="found pytorch_model.bin.*safetensors only"):
        check_safetensors_folder(tmp_path)


def test_folder_checks_every_shard_and_the_index(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(2)}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert len(check_safetensors_folder(tmp_path)) == 2
    index["weight_map"]["c"] = "model-00003-of-00003.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="tensor c is mapped to model-00003-of-00003.safetensors, which is mi"):
        check_safetensors_folder(tmp_path)


def test_folder_refuses_a_tensor_in_two_shards(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
    save_file({"a": torch.zeros(2)}, tmp_path / "y.safetensors")
    with pytest.raises(CheckpointError, match="tensor a is also in x.safetensors"):
        check_safetensors_folder(tmp_path)

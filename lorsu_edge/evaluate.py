"""Evaluation: zero-shot classification through the text tower (dual encoders), or generated answers
scored by exact match / contains (VLMs). The forgetting guard and `lorsu-edge eval` use it.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from lorsu_edge.consumer import add_contiguous_lm_head_hook, embedding, image_features
from lorsu_edge.errors import BadInputError
from lorsu_edge.load import Loaded
from lorsu_edge.losses import DEFAULT_TEMPLATES, LABEL_QUESTION, vqa_prompt
from lorsu_edge.samples import Sample, SampleSet, load_image


@dataclass
class EvalResult:
    accuracy: float
    correct: int
    total: int
    metric: str  # "zero-shot", "answer-choice" or "contains"

    def to_dict(self) -> dict:
        return asdict(self)


def normalize_answer(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def answer_matches(prediction: str, answer: str) -> bool:
    """Exact match after normalisation, or the answer contained in the prediction as whole words."""
    pred, ans = normalize_answer(prediction), normalize_answer(answer)
    return bool(ans) and (pred == ans or f" {ans} " in f" {pred} ")


def _image_batches(loaded: Loaded, samples: list[Sample], batch_size: int):
    image_processor = getattr(loaded.processor, "image_processor", loaded.processor)
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        yield chunk, image_processor([load_image(s.path, s.limits) for s in chunk], return_tensors="pt")["pixel_values"]


@torch.no_grad()
def _text_embeddings(loaded: Loaded, texts: list[str]) -> torch.Tensor:
    import inspect

    keys = set(inspect.signature(loaded.model.get_text_features).parameters)
    tok = loaded.processor.tokenizer(texts, padding="max_length" if hasattr(loaded.model, "logit_bias") else True,
                                     truncation=True, max_length=64, return_tensors="pt")
    feats = embedding(loaded.model.get_text_features(**{k: v for k, v in tok.items() if k in keys}))
    return F.normalize(feats.float(), dim=-1)


def class_embeddings(loaded: Loaded, labels: list[str], templates: tuple[str, ...]) -> torch.Tensor:
    """One embedding per label: the normalised mean over the caption templates (prompt ensembling)."""
    rows = [_text_embeddings(loaded, [t.format(label=lab) for t in templates]).mean(0) for lab in labels]
    return F.normalize(torch.stack(rows), dim=-1)


@torch.no_grad()
def _dual_predictions(loaded: Loaded, samples: list[Sample], batch_size: int, autocast,
                      templates: tuple[str, ...]) -> list[int]:
    """Per sample: index of its best candidate among the label set (label rows) or its question's answers."""
    labels = sorted({s.label for s in samples if not s.is_vqa})
    label_emb = class_embeddings(loaded, labels, templates) if labels else None
    answers: dict[str, list[str]] = {}
    for s in samples:
        if s.is_vqa:
            answers.setdefault(s.question, sorted({t.answer for t in samples if t.is_vqa and t.question == s.question}))
    hits = []
    for chunk, pixels in _image_batches(loaded, samples, batch_size):
        with autocast():
            img = F.normalize(image_features(loaded.model, loaded.spec, pixels).float(), dim=-1)
        for s, emb in zip(chunk, img):
            if s.is_vqa:
                cands = answers[s.question]
                texts = _text_embeddings(loaded, [f"{s.question} The answer is {a}." for a in cands])
                hits.append(int(cands[int((texts @ emb).argmax())] == s.answer))
            else:
                hits.append(int(labels[int((label_emb @ emb).argmax())] == s.label))
    return hits


@torch.no_grad()
def _vlm_hits(loaded: Loaded, samples: list[Sample], batch_size: int, autocast, max_new_tokens: int) -> list[int]:
    proc, tok = loaded.processor, loaded.processor.tokenizer
    tok.padding_side = "left"  # generation continues from the right edge of every row
    handle = add_contiguous_lm_head_hook(loaded.model)
    hits = []
    try:
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            qa = [(s.question, s.answer) if s.is_vqa else (LABEL_QUESTION, str(s.label)) for s in chunk]
            enc = proc(images=[load_image(s.path, s.limits) for s in chunk], text=[vqa_prompt(proc, q) for q, _ in qa],
                       padding=True, return_tensors="pt")
            enc.pop("token_type_ids", None)  # 4.57's generate rejects them
            with autocast():
                out = loaded.model.generate(**enc.to(loaded.model.device), max_new_tokens=max_new_tokens,
                                            do_sample=False, pad_token_id=tok.pad_token_id)
            texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            hits += [int(answer_matches(t, a)) for t, (_, a) in zip(texts, qa)]
    finally:
        handle.remove()
    return hits


def evaluate(loaded: Loaded, samples: SampleSet | list[Sample], batch_size: int = 32,
             autocast: type[AbstractContextManager] | None = None, max_new_tokens: int = 12,
             templates: tuple[str, ...] = ()) -> EvalResult:
    """Accuracy of the loaded model on `samples` (see module docstring for the metric per model kind).

    Zero-shot captions use `templates`, else the set's own templates.txt, else the built-in ones.
    """
    items = samples.samples if isinstance(samples, SampleSet) else list(samples)
    templates = templates or (samples.templates if isinstance(samples, SampleSet) else ()) or DEFAULT_TEMPLATES
    if not items:
        raise BadInputError("no samples to evaluate", hint="check the --control / --eval folder")
    autocast = autocast or nullcontext
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        if loaded.role == "vlm":
            hits, metric = _vlm_hits(loaded, items, batch_size, autocast, max_new_tokens), "contains"
        elif loaded.role == "dual":
            hits = _dual_predictions(loaded, items, batch_size, autocast, templates)
            metric = "zero-shot" if all(not s.is_vqa for s in items) else "answer-choice"
        else:
            raise BadInputError("a bare image encoder cannot be evaluated without a text tower or a VLM",
                                hint="evaluate the dual encoder or VLM that uses it")
    finally:
        loaded.model.train(was_training)
    return EvalResult(sum(hits) / len(hits), sum(hits), len(hits), metric)

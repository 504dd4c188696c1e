"""Losses: CLIP/SigLIP contrastive (dual encoders) and perplexity on answer tokens (VLMs).

Each objective turns a list of samples into a model batch and a batch into a scalar mean loss; the
importance pass and the training loop share it, as the method requires.
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorsu_edge.consumer import embedding, image_features
from lorsu_edge.errors import BadInputError
from lorsu_edge.families import EncoderSpec
from lorsu_edge.samples import Sample, load_image

LOSSES = ("clip", "ppl")
DEFAULT_TEMPLATES = ('a photo of a "{label}".', "a photo of a {label}.", "an image of {label}.", "{label}")
LABEL_QUESTION = "What is in the image? Answer in a few words."
IGNORE = -100


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    size: int
    groups: torch.Tensor | None = None  # samples sharing a caption are positives of each other
    class_ids: torch.Tensor | None = None  # row of each sample's label among the known classes (-1: none)


def default_loss(role: str) -> str:
    return "ppl" if role == "vlm" else "clip"


def check_loss(loss: str, role: str, has_text_model: bool) -> None:
    if loss not in LOSSES:
        raise BadInputError(f"--loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if loss == "ppl" and role != "vlm":
        raise BadInputError("--loss ppl needs a VLM (a language model to score answers)",
                            hint="use --loss clip for dual encoders")
    if has_text_model and (role != "vlm" or loss != "clip"):
        raise BadInputError("--text-model is for --loss clip on a VLM", hint="drop --text-model")
    if loss == "clip" and role == "vlm" and not has_text_model:
        raise BadInputError("--loss clip on a VLM needs the matching dual encoder's text tower",
                            hint="pass --text-model DIR (e.g. the CLIP the VLM's tower came from), or use --loss ppl")
    if loss == "clip" and role == "encoder":
        raise BadInputError("--loss clip needs a text tower; this model is a bare image encoder",
                            hint="load a dual encoder (CLIPModel, SiglipModel, VisionTextDualEncoderModel)")


def pixel_values(processor: Any, samples: list[Sample]) -> torch.Tensor:
    """The samples' images through the model's image processor (safe decoding, each sample's caps)."""
    image_processor = getattr(processor, "image_processor", processor)
    return image_processor([load_image(s.path, s.limits) for s in samples], return_tensors="pt")["pixel_values"]


class ContrastiveObjective:
    """CLIP's symmetric contrastive loss (SigLIP: sigmoid loss), positives = samples with the same caption group.

    Few-shot batches hold several images of one class; plain CLIP loss would push them apart as
    negatives, so same-label (or same-statement) pairs share the target mass instead.
    """

    def __init__(self, model: nn.Module, spec: EncoderSpec, processor: Any,
                 templates: tuple[str, ...] = DEFAULT_TEMPLATES, seed: int = 0,
                 classes: dict[str, tuple[str, ...]] | None = None, class_weight: float = 0.0) -> None:
        self.model, self.spec, self.processor = model, spec, processor
        self.templates = templates
        # Class-aware term: every known label (name -> its caption templates) is a row of a zero-shot classifier.
        self.classes = dict(classes or {}) if class_weight > 0 else {}
        self.class_rows = {label: i for i, label in enumerate(self.classes)}
        self.class_weight = class_weight
        self._prototypes: torch.Tensor | None = None
        self.rng = random.Random(seed)
        self.sigmoid = hasattr(model, "logit_bias")
        self._text_cache: dict[str, torch.Tensor] = {}
        # CLIP's get_text_features takes no token_type_ids; BERT-based dual encoders do.
        self._text_keys = set(inspect.signature(model.get_text_features).parameters)

    def caption(self, s: Sample) -> tuple[str, str]:
        """(caption, group key): a random label template, or the VQA statement."""
        if s.is_vqa:
            text = f"{s.question} The answer is {s.answer}."
            return text, text
        return self.rng.choice(self.templates).format(label=s.label), f"label:{s.label}"

    def make_batch(self, samples: list[Sample]) -> Batch:
        captions, keys = zip(*(self.caption(s) for s in samples))
        group_ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        class_ids = None
        if self.classes:
            class_ids = torch.tensor([-1 if s.is_vqa else self.class_rows.get(s.label, -1) for s in samples])
        return Batch({"pixel_values": pixel_values(self.processor, samples), "captions": list(captions)},
                     len(samples), torch.tensor([group_ids[k] for k in keys]), class_ids)

    def prototypes(self) -> torch.Tensor:
        """One unit vector per known class: the normalised mean of its templates' caption embeddings
        (the same prompt ensemble the zero-shot evaluation uses), embedded once per session."""
        if self._prototypes is None:
            rows = [F.normalize(self.text_features([t.format(label=label) for t in templates]), dim=-1).mean(0)
                    for label, templates in self.classes.items()]
            self._prototypes = F.normalize(torch.stack(rows), dim=-1)
        return self._prototypes

    @torch.no_grad()
    def text_features(self, captions: list[str]) -> torch.Tensor:
        """Frozen text tower: each caption is embedded once per session."""
        todo = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
        if todo:
            tok = self.processor.tokenizer(todo, padding="max_length" if self.sigmoid else True, truncation=True,
                                           max_length=64, return_tensors="pt")
            feats = embedding(self.model.get_text_features(**{k: v for k, v in tok.items() if k in self._text_keys}))
            self._text_cache.update({c: f.float() for c, f in zip(todo, feats)})
        return torch.stack([self._text_cache[c] for c in captions])

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        img = image_features(model, self.spec, batch.inputs["pixel_values"])
        txt = self.text_features(batch.inputs["captions"])
        bias = self.model.logit_bias if self.sigmoid else None
        scale = self.model.logit_scale.exp()
        loss = contrastive_loss(img, txt, scale, batch.groups, bias)
        if batch.class_ids is None or not (batch.class_ids >= 0).any():
            return loss
        known = class_aware_loss(img, self.prototypes(), scale, batch.class_ids)
        return (1 - self.class_weight) * loss + self.class_weight * known


def class_aware_loss(img: torch.Tensor, prototypes: torch.Tensor, scale: torch.Tensor,
                     class_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each image against every known class (rows of `prototypes`, unit vectors).

    The in-batch loss of a session with two classes sees one negative caption; this term also pushes the
    new images away from every label seen before (and the control set's), so a night cannot pull the
    whole embedding space towards its own captions. Samples with class id -1 (VQA) are left out.
    """
    rows = class_ids >= 0
    logits = F.normalize(img[rows].float(), dim=-1) @ prototypes.t() * scale.float()
    return F.cross_entropy(logits, class_ids[rows])


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, groups: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric loss (SigLIP's sigmoid loss when `bias` is given) over (image, text) pairs.

    Pairs with the same `groups` id are positives of each other (soft targets); with distinct ids (or None)
    this is exactly CLIP's / SigLIP's loss.
    """
    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    logits = img @ txt.t() * scale.float()
    groups = torch.arange(len(img)) if groups is None else groups
    pos = (groups[:, None] == groups[None, :]).float()
    if bias is not None:
        return -F.logsigmoid((2 * pos - 1) * (logits + bias.float())).sum() / len(img)
    target = pos / pos.sum(dim=1, keepdim=True)
    loss_img = -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()
    loss_txt = -(target * logits.t().log_softmax(dim=1)).sum(dim=1).mean()
    return (loss_img + loss_txt) / 2


def _user_turn(question: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}


def vqa_prompt(processor: Any, question: str) -> str:
    """The model's chat template if it has one, else LLaVA-1.5's `USER: <image>\\n... ASSISTANT:`."""
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template([_user_turn(question)], add_generation_prompt=True)
    image_token = getattr(processor, "image_token", "<image>")
    return f"USER: {image_token}\n{question} ASSISTANT:"


def vqa_text(processor: Any, question: str, answer: str) -> tuple[str, str]:
    """(prompt, prompt + answer) in the form the model was trained to answer in.

    With a chat template the answer turn is rendered by the template, so the target ends the way
    the model's replies end (the default VLM stops at a newline, chat models at their end-of-turn
    token); training on a different ending would teach the model not to stop. Without one, or if
    the template's full turn does not start with its generation prompt, the answer is followed by eos.
    """
    prompt = vqa_prompt(processor, question)
    if getattr(processor, "chat_template", None):
        turn = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
        full = processor.apply_chat_template([_user_turn(question), turn])
        if full.startswith(prompt) and len(full) > len(prompt):
            return prompt, full
    return prompt, f"{prompt} {answer}{processor.tokenizer.eos_token or ''}"


class PerplexityObjective:
    """The VLM's next-token loss on the answer tokens only (prompt, image and padding are masked)."""

    def __init__(self, model: nn.Module, spec: EncoderSpec, processor: Any,
                 label_question: str = LABEL_QUESTION) -> None:
        self.model, self.spec, self.processor = model, spec, processor
        self.label_question = label_question

    def qa(self, s: Sample) -> tuple[str, str]:
        return (s.question, s.answer) if s.is_vqa else (self.label_question, str(s.label))

    def make_batch(self, samples: list[Sample]) -> Batch:
        tok = self.processor.tokenizer
        images = [load_image(s.path, s.limits) for s in samples]
        prompts, fulls = zip(*(vqa_text(self.processor, q, a) for q, a in map(self.qa, samples)))
        tok.padding_side = "right"
        enc = self.processor(images=images, text=list(fulls), padding=True, return_tensors="pt")
        prompt_lens = [len(self.processor(images=[im], text=[p], return_tensors="pt")["input_ids"][0])
                       for im, p in zip(images, prompts)]
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = IGNORE
        for i, n in enumerate(prompt_lens):
            labels[i, :n] = IGNORE
        enc.pop("token_type_ids", None)
        return Batch({**enc, "labels": labels}, len(samples))

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return answer_token_loss(model, batch.inputs)


def answer_token_loss(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own next-token loss (mean over answer tokens), with logits only where a label follows.

    transformers projects every position (image tokens and prompt included) onto the vocabulary when it
    computes `.loss`; on a small LM with a large vocabulary (Gemma-3-270M: 262k words, the head holds more
    weights than the rest of the LM) that projection dominates the step. `logits_to_keep` (1-D positions,
    shared by the batch) keeps the union of answer positions; the other rows' padding there is ignored.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    targets = labels[:, 1:]  # the hidden state at t predicts token t + 1
    keep = (targets != IGNORE).any(dim=0).nonzero().flatten()
    if keep.numel() == 0:
        raise BadInputError("no answer tokens in the batch", hint="check that the samples' answers are not empty")
    logits = model(**inputs, logits_to_keep=keep.to(labels.device)).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets[:, keep].flatten(), ignore_index=IGNORE)


def make_objective(loss: str, model: nn.Module, spec: EncoderSpec, processor: Any, seed: int = 0,
                   templates: tuple[str, ...] | None = None, classes: dict[str, tuple[str, ...]] | None = None,
                   class_weight: float = 0.0):
    """The session's loss; `classes` + `class_weight` add the class-aware term (contrastive loss only)."""
    if loss == "ppl":
        return PerplexityObjective(model, spec, processor)
    return ContrastiveObjective(model, spec, processor, templates or DEFAULT_TEMPLATES, seed, classes, class_weight)

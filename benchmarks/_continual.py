"""Class-incremental protocol for `bench_quality.py --continual`: new classes arrive night by night.

Targets built from package-shipped data the default dual encoder does not know:
- digits (scikit-learn, 8x8 scans upscaled): 10 classes, 2 new per night, 5 nights;
- textile (conformal-clip-data): night 1 nominal + local defect, night 2 global defect, nights 3-5 new shots of all.
The control is the default model's held-out animals; the anchor set is animals outside alignment and control.
Per method x variant: accuracy over all classes seen (zero-shot among them) after each night, accuracy on
night 1's classes after the last night (predicted among all seen labels), control change from base, nights
accepted / scaled / rejected, trainable parameters.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = {"digits": ("a photo of the number {label}.", "a handwritten digit {label}."),
             "textile": ("a photo of {label} fabric", "a close-up photo of {label} fabric")}
CONTROL_TEMPLATES = ("a photo of a {label}",)


@dataclass(frozen=True)
class Variant:
    """One guard / regulariser setting (the recipe: lr and epochs, is given separately)."""

    name: str
    max_forgetting: float = 1.0
    max_total: float | None = 1.0  # control at most this many points below base after any night
    on_forgetting: str = "scale"
    class_weight: float = 0.5
    anchor: bool = False
    replay: int = 0
    lr: float | None = None  # None: --lr
    epochs: int | None = None  # None: --epochs


VARIANTS = {
    "unguarded-old": Variant("unguarded-old", max_forgetting=1e9, max_total=None, class_weight=0.0),  # the "today"
    "cli-old": Variant("cli-old", max_total=None, on_forgetting="reject", class_weight=0.0, lr=1e-5, epochs=5),
    "reject": Variant("reject", max_total=None, on_forgetting="reject", class_weight=0.0),
    "scale": Variant("scale"),
    "scale+replay": Variant("scale+replay", replay=10),
    "scale+anchor": Variant("scale+anchor", anchor=True),
    "scale+anchor+replay": Variant("scale+anchor+replay", anchor=True, replay=10),
    "scale-c0": Variant("scale-c0", class_weight=0.0),
    "scale+replay-c0": Variant("scale+replay-c0", replay=10, class_weight=0.0),
    "scale+anchor-c0": Variant("scale+anchor-c0", anchor=True, class_weight=0.0),
    "scale+anchor+replay-c0": Variant("scale+anchor+replay-c0", anchor=True, replay=10, class_weight=0.0),
}


def _digits(seed: int) -> list[tuple[Any, str]]:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(seed).permutation(len(d.target))
    return [(Image.fromarray((255 - d.images[i] * 255 / 16).astype("uint8")).resize((64, 64), Image.NEAREST)
             .convert("RGB"), DIGIT_WORDS[d.target[i]]) for i in order]


TOY = ("crimson", "navy", "green", "yellow")  # --smoke: colour patches on a tiny CLIP


def nights_of(target: str) -> list[list[str]]:
    if target == "toy":
        return [[TOY[0], TOY[1]], [TOY[2], TOY[3]]]
    if target == "digits":
        return [[DIGIT_WORDS[2 * n], DIGIT_WORDS[2 * n + 1]] for n in range(5)]
    from lorsu_edge.zoo.datasets import TEXTILE_CLASSES

    nominal, local, glob = TEXTILE_CLASSES
    return [[nominal, local], [glob], list(TEXTILE_CLASSES), list(TEXTILE_CLASSES), list(TEXTILE_CLASSES)]


def build_target(target: str, root: Path, shots: int, eval_per_class: int, seed: int) -> tuple[list[Path], Path]:
    """(one data folder per night, the eval folder of all classes); disjoint images."""
    from lorsu_edge.demo import _write

    nights = nights_of(target)
    if target == "toy":
        from lorsu_edge.tiny import write_toy_images

        folders = [write_toy_images(root / f"night-{n + 1}", labels=tuple(c), per_class=shots, seed=n)
                   for n, c in enumerate(nights)]
        return folders, write_toy_images(root / "eval-all", labels=TOY, per_class=eval_per_class, seed=50)
    if target == "digits":
        items = _digits(seed)
    else:
        from lorsu_edge.zoo.datasets import load_textile

        items = load_textile(per_class=shots * len(nights) + eval_per_class, seed=seed)
    by_class: dict[str, list] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    used = {c: 0 for c in by_class}
    folders = []
    for n, classes in enumerate(nights):
        chosen = []
        for c in classes:
            chosen += by_class[c][used[c]:used[c] + shots]
            used[c] += shots
        folders.append(_write(chosen, root / f"night-{n + 1}", TEMPLATES[target]))
    evals = [x for c, members in by_class.items() for x in members[-eval_per_class:]]
    return folders, _write(evals, root / "eval-all", TEMPLATES[target])


def _seen_eval(eval_dir: Path, classes: set[str], dest: Path) -> Path:
    """The eval folder restricted to the classes seen so far (zero-shot among exactly those)."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for c in classes:
        if not (dest / c).exists():
            shutil.copytree(eval_dir / c, dest / c)
    if (eval_dir / "templates.txt").exists():
        shutil.copy(eval_dir / "templates.txt", dest / "templates.txt")
    return dest


def run_one(target: str, method: str, variant: Variant, seed: int, lr: float, epochs: int, model: str,
            data: dict[str, Any], root: Path) -> dict[str, Any]:
    """Five nights through `adapt`; returns per-night rows and the summary numbers."""
    from lorsu_edge.adapt import AdaptOptions, adapt
    from lorsu_edge.config import ContinualConfig, MethodConfig
    from lorsu_edge.train import TrainConfig

    wd = root / f"{target}-{method}-{variant.name}-{seed}"
    seen: set[str] = set()
    rows = []
    for n, (night, classes) in enumerate(zip(data["nights"], nights_of(target))):
        seen |= set(classes)
        eval_dir = _seen_eval(data["eval"], seen, wd.parent / f"{wd.name}-eval-{n + 1}")
        result = adapt(AdaptOptions(
            data=night, workdir=wd, model=model, method=MethodConfig(method=method),
            train=TrainConfig(epochs=variant.epochs or epochs, lr=variant.lr or lr, seed=seed),
            control=data["control"], eval_data=eval_dir, max_forgetting=variant.max_forgetting,
            max_total_forgetting=variant.max_total, anchor=data["anchor"] if variant.anchor else None,
            continual=ContinualConfig(class_weight=variant.class_weight, replay=variant.replay,
                                      on_forgetting=variant.on_forgetting), show_progress=False))
        r = result.report
        rows.append({"night": n + 1, "status": r["guard"], "alpha": r.get("alpha", 1.0),
                     "target": _current_accuracy(r, result.status), "control": _current_control(r, result.status),
                     "target_before": r["target_accuracy_before"], "control_before": r["control_accuracy_before"],
                     "trainable_params": r["trainable_params"], "seconds": r["seconds"]})
    first = night_one_accuracy(wd, data["eval"], set(nights_of(target)[0]), seen)
    return {"target": target, "method": method, "variant": variant.name, "seed": seed, "rows": rows,
            "night1_after": first, "base_all": data["base_all"]}


def _current_accuracy(report: dict, status: str) -> float:
    # a rejected night leaves the model as it was: its "after" is not the current model's
    return report["target_accuracy"] if status != "rejected" else report["target_accuracy_before"]


def _current_control(report: dict, status: str) -> float:
    return report["control_accuracy"] if status != "rejected" else report["control_accuracy_before"]


def night_one_accuracy(workdir: Path, eval_dir: Path, first: set[str], seen: set[str]) -> float:
    """Accuracy of the current model on night 1's classes, each image predicted among every label seen."""
    from lorsu_edge.load import load_session_model, resolve_session

    return _accuracy(load_session_model(resolve_session(workdir), device="cpu"), eval_dir, first, seen)


def base_accuracy(model: str, eval_dir: Path) -> float:
    """The base model's accuracy over every class of the target (the reference for the gain after night 5)."""
    from lorsu_edge.load import load_model
    from lorsu_edge.samples import read_samples

    labels = {s.label for s in read_samples(eval_dir).samples}
    return _accuracy(load_model(model, device="cpu"), eval_dir, labels, labels)


def _accuracy(loaded, eval_dir: Path, scored: set[str], seen: set[str]) -> float:
    from lorsu_edge.evaluate import _dual_predictions
    from lorsu_edge.losses import DEFAULT_TEMPLATES
    from lorsu_edge.samples import read_samples

    samples = read_samples(eval_dir)
    items = [s for s in samples.samples if s.label in seen]
    hits = _dual_predictions(loaded, items, 32, _bf16(), samples.templates or DEFAULT_TEMPLATES)
    mine = [h for h, s in zip(hits, items) if s.label in scored]
    return sum(mine) / len(mine)


def _bf16():
    from functools import partial

    import torch

    return partial(torch.autocast, "cpu", dtype=torch.bfloat16)


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (target, method, variant): means over seeds (std where more than one)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["target"], r["method"], r["variant"]), []).append(r)
    out = []
    for (target, method, variant), rs in groups.items():
        def mean(f):
            vals = [f(r) for r in rs]
            return round(statistics.fmean(vals), 2), round(statistics.stdev(vals), 2) if len(vals) > 1 else 0.0
        statuses = [x["status"] for r in rs for x in r["rows"]]
        out.append({
            "target": target, "method": method, "variant": variant, "seeds": len(rs),
            "final_target": mean(lambda r: 100 * r["rows"][-1]["target"]),
            "target_gain": mean(lambda r: 100 * (r["rows"][-1]["target"] - r["base_all"])),
            "night1_after_last": mean(lambda r: 100 * r["night1_after"]),
            "control_change": mean(lambda r: 100 * (r["rows"][-1]["control"] - r["rows"][0]["control_before"])),
            "accepted": statuses.count("accepted"), "scaled": statuses.count("scaled"),
            "rejected": statuses.count("rejected"), "trainable_params": rs[0]["rows"][0]["trainable_params"],
        })
    reference = {(s["target"], s["method"]): s["target_gain"][0] for s in out if s["variant"] == "unguarded-old"}
    for s in out:  # the bar: at least 80% of what the unguarded old recipe gains
        ref = reference.get((s["target"], s["method"]))
        s["gain_share"] = round(s["target_gain"][0] / ref, 2) if ref and ref > 0 else None
    return out


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({s["target"] for s in summary})
    fig, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 4), squeeze=False)
    for ax, target in zip(axes[0], targets):
        for s in (x for x in summary if x["target"] == target):
            ax.scatter(s["control_change"][0], s["final_target"][0])
            ax.annotate(f"{s['method']}/{s['variant']}", (s["control_change"][0], s["final_target"][0]), fontsize=7)
        ax.axvline(-1, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("control change from base (points)")
        ax.set_ylabel("final accuracy over all classes seen (%)")
        ax.set_title(f"{target}: 5 nights")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

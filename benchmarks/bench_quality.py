"""Quality on real weights: the continual protocol (sessions x shots per class, several seeds) per method.

For each method and seed this runs the demo protocol (default dual encoder, textile target, animal control)
with the forgetting guard disabled (the demo's anchors and adapt's replay default stay on), so the numbers
show each method's gain and forgetting without the guard. Prints the
target gain and control change (mean and spread over seeds), writes JSON and a PNG.

    python benchmarks/bench_quality.py                       # 5 sessions, 5 shots, 3 seeds, 4 methods
    python benchmarks/bench_quality.py --seeds 0 --sessions 3  # quicker
    python benchmarks/bench_quality.py --smoke               # tiny random CLIP + toy images (seconds)
    python benchmarks/bench_quality.py --continual           # class-incremental targets x guard variants
    python benchmarks/bench_quality.py --continual --targets digits --methods lorsu \
        --variants unguarded-old scale+anchor --seeds 0       # one comparison (see benchmarks/README.md)

Run it alone: it trains 60 sessions in the full setting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _toy_data(opts, root):
    from lorsu_edge.demo import DemoData
    from lorsu_edge.tiny import write_toy_images

    sessions = [write_toy_images(root / f"s{i}", per_class=opts.shots, seed=i) for i in range(opts.sessions)]
    return DemoData(sessions, write_toy_images(root / "eval", per_class=opts.eval_per_class, seed=50),
                    write_toy_images(root / "control", labels=("green", "yellow"), per_class=2, seed=60))


def stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for method, runs in results.items():
        gains = [100 * (r["rows"][-1]["target"] - r["rows"][0]["target"]) for r in runs]
        control = [100 * (r["rows"][-1]["control"] - r["rows"][0]["control"]) for r in runs]
        worst = [100 * min(x["control"] - r["rows"][0]["control"] for x in r["rows"]) for r in runs]
        secs = [sum(x["seconds"] for x in r["rows"]) for r in runs]
        g, gs = stats(gains)
        c, cs = stats(control)
        rows.append({"method": method, "target_gain_points": g, "target_gain_std": gs, "control_change_points": c,
                     "control_change_std": cs, "worst_control_points": min(worst),
                     "trainable_params": runs[0]["rows"][1]["trainable_params"], "seconds_per_run": stats(secs)[0],
                     "seeds": len(runs)})
    return rows


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for method, runs in results.items():
        n = len(runs[0]["rows"])
        for ax, key in zip(axes, ("target", "control")):
            mean = [100 * statistics.fmean(r["rows"][i][key] for r in runs) for i in range(n)]
            ax.plot(range(n), mean, "o-", label=method)
    for ax, title in zip(axes, ("target (textile, held out)", "control (animals, held out)")):
        ax.set_title(title)
        ax.set_xlabel("session (0 = base)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--continual" in argv:
        return continual_main([a for a in argv if a != "--continual"])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["lorsu", "lora", "spu", "full"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--sessions", type=int, default=5)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--eval-per-class", type=int, default=50)
    p.add_argument("--control-per-class", type=int, default=50)
    p.add_argument("--lr", type=float, default=None, help="one learning rate for every method")
    p.add_argument("--smoke", action="store_true", help="tiny random CLIP + toy images")
    p.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    args = p.parse_args(argv)
    # Paper recipe: 1e-5 for the CLIP loss; dense full fine-tuning gets the same rate.
    args.lr = {m: args.lr or 3e-5 for m in args.methods}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        smoke_model = None
        if args.smoke:
            from lorsu_edge.tiny import save_tiny

            smoke_model = str(save_tiny("clip", root / "tiny-clip"))
            args.sessions, args.shots, args.eval_per_class, args.epochs = 2, 2, 2, 1
        results: dict[str, list[dict]] = {}
        t0 = time.perf_counter()
        for method in args.methods:
            for seed in args.seeds:
                results.setdefault(method, []).append(_run(method, seed, args, root, smoke_model))
                print(f"  {method} seed {seed} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    rows = summarise(results)
    print(f"{'method':8} {'target gain':>16} {'control change':>18} {'worst control':>14} {'trainable':>12} {'s/run':>7}")
    for r in rows:
        print(f"{r['method']:8} {r['target_gain_points']:+7.1f} ± {r['target_gain_std']:4.1f} pts "
              f"{r['control_change_points']:+7.1f} ± {r['control_change_std']:4.1f} pts {r['worst_control_points']:+10.1f} pts "
              f"{r['trainable_params']:>12,} {r['seconds_per_run']:7.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "out"}, "summary": rows,
                                    "runs": results}, indent=2, default=str))
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def _run(method, seed, args, root, smoke_model):
    from lorsu_edge.config import MethodConfig
    from lorsu_edge.demo import DemoOptions, real_data, run_demo
    from lorsu_edge.train import TrainConfig

    rank = 4 if smoke_model else 64
    opts = DemoOptions(workdir=root / f"{method}-{seed}", model=smoke_model, sessions=args.sessions, shots=args.shots,
                       eval_per_class=args.eval_per_class, control_per_class=args.control_per_class,
                       method=MethodConfig(method=method, rank=rank, alpha=rank),
                       train=TrainConfig(epochs=args.epochs, batch_size=16, lr=args.lr[method]),
                       max_forgetting=1e9, seed=seed, export=False, show_progress=False)
    return run_demo(opts, make_data=_toy_data if smoke_model else real_data)


def continual_main(argv: list[str]) -> int:
    """Class-incremental targets (benchmarks/_continual.py) per method x guard variant, through `adapt`."""
    sys.path.insert(0, str(Path(__file__).parent))
    import _continual as C

    p = argparse.ArgumentParser(description=C.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", nargs="+", default=["digits", "textile"])
    p.add_argument("--methods", nargs="+", default=["lorsu", "spu", "lora", "full"])
    p.add_argument("--variants", nargs="+", default=list(C.VARIANTS), choices=list(C.VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--eval-per-class", type=int, default=15)
    p.add_argument("--control-per-class", type=int, default=20, help="animals per class in the control set")
    p.add_argument("--smoke", action="store_true", help="tiny CLIP that knows colours + toy images")
    p.add_argument("--out", type=Path, default=None, help="default: results/continual.json (_smoke with --smoke)")
    p.add_argument("--from", dest="from_files", nargs="+", type=Path, default=None,
                   help="summarise earlier outputs (results JSON or .runs.jsonl) instead of running")
    args = p.parse_args(argv)
    os.environ.setdefault("LORSU_EDGE_TRACK", "off")  # MLflow's local store costs seconds a night; not measured here
    args.out = args.out or RESULTS / ("continual_smoke.json" if args.smoke else "continual.json")
    runs = load_runs(args.from_files) if args.from_files else run_grid(args, C)
    summary = C.summarise(runs)
    print(f"{'target':8} {'method':6} {'variant':23} {'final':>12} {'gain':>12} {'night 1':>12} {'control':>12} "
          f"{'acc/scaled/rej':>15} {'trainable':>11} {'gain share':>10}")
    for s in summary:
        print(f"{s['target']:8} {s['method']:6} {s['variant']:23} {s['final_target'][0]:7.1f}±{s['final_target'][1]:<4} "
              f"{s['target_gain'][0]:+7.1f}±{s['target_gain'][1]:<4} "
              f"{s['night1_after_last'][0]:7.1f}±{s['night1_after_last'][1]:<4} {s['control_change'][0]:+7.1f}±"
              f"{s['control_change'][1]:<4} {s['accepted']:>5}/{s['scaled']}/{s['rejected']:<5} {s['trainable_params']:>11,}"
              f" {'-' if s['gain_share'] is None else s['gain_share']:>10}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "out"},
                                    "summary": summary, "runs": runs}, indent=2, default=str))
    C.plot(summary, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def run_grid(args, C) -> list[dict]:
    """Every (target, seed, method, variant) run; each is also appended to <out>.runs.jsonl as it ends, so
    an interrupted grid keeps what it measured (`--from` summarises such files together)."""
    runs = []
    partial = args.out.with_suffix(".runs.jsonl")
    partial.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, control, anchor = _continual_world(args, root)
        if args.smoke:
            args.targets, args.shots, args.eval_per_class, args.epochs = ["toy"], 2, 2, 2
        t0 = time.perf_counter()
        for target in args.targets:
            for seed in args.seeds:
                nights, eval_dir = C.build_target(target, root / f"data-{target}-{seed}", args.shots,
                                                  args.eval_per_class, seed)
                data = {"nights": nights, "eval": eval_dir, "control": control, "anchor": anchor,
                        "base_all": C.base_accuracy(model, eval_dir)}
                for method in args.methods:
                    for name in args.variants:
                        runs.append(C.run_one(target, method, C.VARIANTS[name], seed, args.lr, args.epochs, model,
                                              data, root / "runs"))
                        with partial.open("a") as f:
                            f.write(json.dumps(runs[-1], default=str) + "\n")
                        print(f"  {target} {method} {name} seed {seed} done ({time.perf_counter() - t0:.0f} s)",
                              file=sys.stderr)
    return runs


def load_runs(files: list[Path]) -> list[dict]:
    """Runs from earlier outputs: a results JSON ("runs") or a .runs.jsonl, in order; repeats of the same
    (target, method, variant, seed) keep the last."""
    runs: dict[tuple, dict] = {}
    for f in files:
        text = f.read_text()
        items = json.loads(text)["runs"] if f.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x]
        runs.update({(r["target"], r["method"], r["variant"], r["seed"]): r for r in items})
    return list(runs.values())


def _continual_world(args, root: Path) -> tuple[str, Path, Path]:
    """(model, control folder, anchor folder): the default dual encoder with the demo's animal control and
    anchor slice, or with --smoke a tiny CLIP that knows its colours with toy control and anchors."""
    from lorsu_edge.demo import CONTROL_TEMPLATES, _write

    if args.smoke:
        from lorsu_edge.tiny import save_knowing_clip, write_toy_images

        model = str(save_knowing_clip(root / "tiny-clip", ("red", "blue", "crimson", "navy", "green", "yellow")))
        return (model, write_toy_images(root / "control", labels=("red", "blue"), per_class=3, seed=9),
                write_toy_images(root / "anchor", labels=("red", "blue"), per_class=3, seed=19))
    from lorsu_edge.demo import ANCHOR_IMAGES, anchor_indices, default_model, split_per_class
    from lorsu_edge.zoo.datasets import animal_mnist_split, load_animal_mnist
    from lorsu_edge.zoo.dual import DualBuildOptions

    build = DualBuildOptions()
    align, control_idx = animal_mnist_split(build.seed, build.align_per_class, build.control_per_class)
    control = split_per_class(load_animal_mnist(control_idx), [args.control_per_class])[0]
    anchors = load_animal_mnist(anchor_indices(align + control_idx, ANCHOR_IMAGES, 0))
    return (str(default_model("dual")), _write(control, root / "control", CONTROL_TEMPLATES),
            _write(anchors, root / "anchor", CONTROL_TEMPLATES))


if __name__ == "__main__":
    sys.exit(main())

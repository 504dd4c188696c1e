"""Quality on real weights: the continual protocol (sessions x shots per class, several seeds) per method.

For each method and seed this runs the demo protocol (default dual encoder, textile target, animal control)
with the forgetting guard disabled, so the numbers show each method's raw gain and forgetting. Prints the
target gain and control change (mean and spread over seeds), writes JSON and a PNG.

    python benchmarks/bench_quality.py                       # 5 sessions, 5 shots, 3 seeds, 4 methods
    python benchmarks/bench_quality.py --seeds 0 --sessions 3  # quicker
    python benchmarks/bench_quality.py --smoke               # tiny random CLIP + toy images (seconds)

Run it alone: it trains 60 sessions in the full setting.
"""

from __future__ import annotations

import argparse
import json
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


if __name__ == "__main__":
    sys.exit(main())

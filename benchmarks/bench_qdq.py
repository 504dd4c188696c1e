#!/usr/bin/env python3
"""int8-qdq configurations on the default model: textile and animal min/mean cosine to PyTorch, file size.

Exports the fp32 file once, collects activation histograms once on bench_export's calibration images
(32 textile + 32 animals), then quantizes with each configuration (QDQ, per-channel symmetric int8 weights,
symmetric int8 activations: what TensorRT takes) and scores it on bench_export's held-out 32 + 32 images.

    python benchmarks/bench_qdq.py                      # writes benchmarks/results/bench_qdq.json
    python benchmarks/bench_qdq.py --sensitivity        # also: each weight MatMul quantized alone, and the
                                                        # worst k left float
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench_export import RESULTS, build_real, images, ort_session  # the script's own folder is on sys.path
from lorsu_edge.consumer import image_features
from lorsu_edge.export import export_onnx
from lorsu_edge.export import precision as prec
from lorsu_edge.export.inputs import INPUT_NAME, image_batch
from lorsu_edge.export.pipeline import calibration_feeds
from lorsu_edge.families import find_encoder


class Scorer:
    """Cosine of each held-out output vector to PyTorch's, per domain (references computed once)."""

    def __init__(self, model, spec, proc, heldout: dict[str, list[Any]], threads: int) -> None:
        self.threads, self.feeds, self.refs = threads, {}, {}
        for domain, imgs in heldout.items():
            b = image_batch(proc, imgs)
            with torch.inference_mode():
                self.refs[domain] = image_features(model, spec, b.pixels).numpy()
            self.feeds[domain] = b.feed

    def __call__(self, path: Path) -> dict[str, dict[str, float]]:
        sess = ort_session(path, self.threads)
        out = {}
        for domain, feed in self.feeds.items():
            got = np.concatenate([sess.run(None, {INPUT_NAME: feed[i:i + 8]})[0] for i in range(0, len(feed), 8)])
            ref = self.refs[domain]
            cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
            out[domain] = {"min": float(cos.min()), "mean": float(cos.mean())}
        return out


def histograms(src: Path, feeds: list[np.ndarray], method: str, tmp: Path):
    """onnxruntime's histogram calibrator after one pass over `feeds` (ranges are computed from it per config)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    cal = create_calibrator(src, list(prec.INT8_OP_TYPES), str(tmp / f"aug-{method}.onnx"),
                            calibrate_method=getattr(CalibrationMethod, method),
                            extra_options={"symmetric": True} if method != "MinMax" else {"symmetric": True})
    with prec._quiet_quantizer():
        cal.collect_data(prec.ImageBatches(feeds))
    return cal


def ranges(cal, **settings):
    for k, v in settings.items():
        setattr(cal.collector, k, v)
    with prec._quiet_quantizer():
        return cal.compute_data()


def quantize(src: Path, dst: Path, tensors_range, nodes: list[str], extra: dict | None = None) -> Path:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    cache = dst.with_suffix(".ranges.json")
    save_tensors_data(tensors_range, cache)
    with prec._quiet_quantizer():
        quantize_static(src, dst, None, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(prec.INT8_OP_TYPES),
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=tensors_range.calibration_method, nodes_to_quantize=nodes,
                        calibration_cache_path=cache,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, **(extra or {})})
    return dst


def all_weight_matmuls(path: Path) -> tuple[list[str], list[str]]:
    """(every weight MatMul, those without the MLP's second layer), in graph order."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    producer = {o: n.op_type for n in graph.node for o in n.output}
    nodes = [n for n in graph.node if n.op_type in prec.INT8_OP_TYPES and any(i in weights for i in n.input)]
    return [n.name for n in nodes], [n.name for n in nodes if producer.get(n.input[0]) not in prec.MLP_OUT_INPUTS]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sensitivity", action="store_true", help="score each weight MatMul quantized alone")
    ap.add_argument("--only", nargs="*", help="run only configs whose name contains one of these (default: all)")
    ap.add_argument("--exclude", type=int, nargs="*", default=[1, 2, 4, 8],
                    help="with --sensitivity: leave the k most damaging MatMuls float, for each k")
    ap.add_argument("--float-last", type=int, nargs="*", default=[1, 2],
                    help="leave the last k blocks' MatMuls and the head float, for each k")
    ap.add_argument("--alphas", type=float, nargs="*", default=[0.5, 0.75, 0.9], help="SmoothQuant alphas to try")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, proc, _ = build_real()
    spec = find_encoder(model)
    calibration, heldout = images(True)
    score = Scorer(model, spec, proc, heldout, args.threads)
    feeds = calibration_feeds(proc, calibration, None)
    rows: list[dict[str, Any]] = []

    def record(name: str, path: Path, nodes: list[str], **info) -> dict[str, Any]:
        row = {"config": name, "mib": path.stat().st_size / 2**20, "quantized_matmuls": len(nodes), **info,
               **score(path)}
        rows.append(row)
        print(f"{name:<44}{row['mib']:>7.1f} MiB {len(nodes):>3} MatMuls  textile {row['textile']['min']:.4f}/"
              f"{row['textile']['mean']:.4f}  animals {row['animals']['min']:.4f}/{row['animals']['mean']:.4f}",
              flush=True)
        return row

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        src = export_onnx(model, spec, proc, tmp / "fp32" / "enc.onnx", precision="fp32",
                          sample_images=heldout["textile"][:3]).path
        record("fp32", src, [])
        weights, current = all_weight_matmuls(src)
        if args.only is None or any("exported" in o for o in args.only):
            shipped = prec.to_precision(src, "int8-qdq", tmp / "q.onnx", False, feeds)
            record("int8-qdq as exported (to_precision)", shipped, prec.weight_matmuls(src))
        pct = histograms(src, feeds, "Percentile", tmp)
        configs: dict[str, Any] = {
            f"percentile {p} (weights w/o fc2)": (lambda p=p: ranges(pct, percentile=p), current)
            for p in (99.9, 99.99, 99.999, 99.9999, 100.0)}
        configs["percentile 99.999 (all weight MatMuls)"] = (lambda: ranges(pct, percentile=99.999), weights)
        configs["minmax (weights w/o fc2)"] = (lambda: ranges(histograms(src, feeds, "MinMax", tmp)), current)
        configs["entropy (weights w/o fc2)"] = (lambda: ranges(histograms(src, feeds, "Entropy", tmp)), current)
        worst: list[str] = []
        if args.sensitivity:  # each weight MatMul quantized alone: its own damage, worst first
            base, alone = ranges(pct, percentile=99.999), {}
            for node in weights:
                row = record(f"alone: {node}", quantize(src, tmp / "alone.onnx", base, [node]), [node], node=node)
                alone[node] = min(row["textile"]["min"], row["animals"]["min"])
            worst = sorted(current, key=alone.get)
        for k in args.exclude if worst else []:  # mixed precision: the k most damaging MatMuls stay float
            configs[f"percentile 99.999 w/o fc2, worst {k} float"] = (
                lambda: ranges(pct, percentile=99.999), [n for n in current if n not in worst[:k]])
        for alpha in args.alphas:  # SmoothQuant folded into the LayerNorms (precision.smooth_layer_norms)
            smoothed = tmp / f"smooth-{alpha}.onnx"
            n = prec.smooth_layer_norms(src, smoothed, False, feeds, alpha)
            hist = histograms(smoothed, feeds, "Percentile", tmp)
            for p in (99.999, 99.9999, 100.0):
                configs[f"smooth {alpha} ({n} LN) + percentile {p}"] = (
                    lambda h=hist, p=p: ranges(h, percentile=p), current, smoothed)
            for k in args.exclude[:2] if worst else []:
                configs[f"smooth {alpha} ({n} LN) + percentile 99.999, worst {k} float"] = (
                    lambda h=hist: ranges(h, percentile=99.999), [m for m in current if m not in worst[:k]], smoothed)
            for k in args.float_last:  # the last k blocks (5 weight MatMuls each, in graph order) and the head
                configs[f"smooth {alpha} ({n} LN) + percentile 99.999, last {k} blocks + head float"] = (
                    lambda h=hist: ranges(h, percentile=99.999), current[:-1 - 5 * k], smoothed)
            configs[f"smooth {alpha} ({n} LN) + percentile 99.999, all"] = (
                lambda h=hist: ranges(h, percentile=99.999), weights, smoothed)
        for name, (make, nodes, *model_file) in configs.items():
            if args.only is not None and not any(o in name for o in args.only):
                continue
            record(name, quantize(model_file[0] if model_file else src, tmp / f"{len(rows)}.onnx", make(), nodes),
                   nodes)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / "bench_qdq.json"
    out.write_text(json.dumps({"benchmark": "bench_qdq", "threads": args.threads, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

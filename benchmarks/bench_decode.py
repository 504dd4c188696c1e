#!/usr/bin/env python3
"""Peak memory of reading hostile-but-valid inbox images: `read_samples` on one small file that declares a huge
image, measured as the child process's peak RSS (os.wait4) minus the same child reading an 8x8 PNG.

The images are the ones issue 13 reported: a 16-bit 12000x12000 grayscale PNG (300 KB on disk) and a 1-bit
12000x12000 PNG (33 KB). Both are over the default 40 MP cap (refused from the header, nothing decoded), so the
child raises the cap to 200 MP to measure the decoder itself. `--pythonpath DIR` measures another checkout
(e.g. a `git worktree` of an older commit) for a before/after comparison.

    python benchmarks/bench_decode.py             # ~20 s; writes benchmarks/results/bench_decode.json
    python benchmarks/bench_decode.py --smoke     # 3000x3000 images, a few seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lorsu_edge.tiny import write_gray_png  # noqa: E402
CHILD = """
import sys
from pathlib import Path
from lorsu_edge.samples import read_samples
kw = {}
try:
    from lorsu_edge.imagefile import ImageLimits
    kw = {"limits": ImageLimits(max_pixels=200_000_000), "allow_outside": True}
except ImportError:  # a checkout from before the caps
    pass
print(len(read_samples(Path(sys.argv[1]), **kw).samples))
"""


def child_peak(folder: Path, pythonpath: str) -> int:
    """Peak RSS in bytes of a child that reads `folder`."""
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    # cwd: `python -c` puts the current folder first on sys.path, ahead of PYTHONPATH
    proc = subprocess.Popen([sys.executable, "-W", "ignore", "-c", CHILD, str(folder)], env=env,
                            stdout=subprocess.DEVNULL, cwd=folder)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"the child failed on {folder} (status {status})")
    return usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pythonpath", default=str(HERE.parent), help="checkout whose lorsu_edge is measured")
    ap.add_argument("--smoke", action="store_true", help="3000x3000 images instead of 12000x12000")
    ap.add_argument("--results-dir", type=Path, default=HERE / "results", help="where the JSON goes")
    args = ap.parse_args()
    side = 3000 if args.smoke else 12000
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = child_peak(write_gray_png(Path(tmp, "small", "x", "1.png"), 8, 8).parent.parent, args.pythonpath)
        for name, depth in ((f"16-bit gray {side}x{side}", 16), (f"1-bit {side}x{side}", 1)):
            png = write_gray_png(Path(tmp, name.replace(" ", "_"), "x", "1.png"), side, depth)
            peak = child_peak(png.parent.parent, args.pythonpath)
            rows.append({"image": name, "file_bytes": png.stat().st_size, "peak_rss": peak,
                         "over_baseline": peak - base})
    print(f"| image | file | child peak RSS | over an 8x8 PNG |  (lorsu_edge from {args.pythonpath})")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['image']} | {r['file_bytes'] / 1e3:.0f} KB | {r['peak_rss'] / 2**30:.2f} GiB | "
              f"{r['over_baseline'] / 2**30:.2f} GiB |")
    out = args.results_dir / ("bench_decode_smoke.json" if args.smoke else "bench_decode.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"pythonpath": args.pythonpath, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

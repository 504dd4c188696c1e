"""The chaos benchmark's smoke mode (benchmarks/bench_chaos.py --smoke): one simulated night of each fault kind on
a tiny CLIP, and per kind: the documented exit code, and nothing already saved lost."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    spec = importlib.util.spec_from_file_location("bench_chaos", REPO / "benchmarks" / "bench_chaos.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_chaos"] = bench  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(bench)
    return bench.chaos(nights=0, seed=0, smoke=True, root=tmp_path_factory.mktemp("chaos"))


def test_every_fault_kind_ran(smoke: dict) -> None:
    assert [n["fault"] for n in smoke["nights"]] == ["kill9-phase", "kill9-random", "sigterm", "enospc",
                                                     "hostile-file", "damaged-session"]
    assert smoke["faults_injected"] == smoke["nights_run"] == 6


@pytest.mark.parametrize("fault", ["kill9-phase", "kill9-random", "sigterm", "enospc", "hostile-file",
                                   "damaged-session"])
def test_fault_night_loses_nothing_and_exits_as_documented(smoke: dict, fault: str) -> None:
    night = next(n for n in smoke["nights"] if n["fault"] == fault)
    assert night["lost"] == [], night
    assert not night["unexpected_exit"], night

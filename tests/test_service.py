"""The nightly service: the systemd unit's hardening and limits, the cron line, and `export --if-changed`
(the export step runs every night but works only when the current model changed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorsu_edge.budget import parse_size
from lorsu_edge.cli.main import app
from lorsu_edge.profiles import get_profile
from lorsu_edge.tiny import save_tiny, write_toy_images

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "export" / "systemd" / "lorsu-edge-nightly.service"
runner = CliRunner()


def _directives(path: Path) -> dict[str, list[str]]:
    """Key -> every value it is given in the [Service] section (systemd allows repeats)."""
    out: dict[str, list[str]] = {}
    section = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def _env(unit: dict[str, list[str]]) -> dict[str, str]:
    return dict(pair.split("=", 1) for value in unit["Environment"] for pair in value.split())


def test_unit_is_bounded_idle_sandboxed_and_offline() -> None:
    """Bug: Type=oneshot without TimeoutStartSec (a hang stalled the box), no MemoryMax, no sandbox (9.2 UNSAFE)."""
    unit = _directives(UNIT)
    one = {k: v[-1] for k, v in unit.items()}
    assert one["Type"] == "oneshot" and one["TimeoutStartSec"] not in ("", "infinity")
    assert one["NoNewPrivileges"] == "yes" and one["ProtectSystem"] == "strict"
    assert one["ReadWritePaths"] == "/var/lib/lorsu" and one["WorkingDirectory"].startswith("/var/lib/lorsu")
    assert one["PrivateTmp"] == one["PrivateNetwork"] == "yes"
    assert one["UMask"] == "0027"
    assert (one["Nice"], one["CPUSchedulingPolicy"], one["IOSchedulingClass"]) == ("19", "idle", "idle")
    assert {"video", "render"} <= set(one["SupplementaryGroups"].split())
    assert "PrivateDevices" not in unit and "ProtectClock" not in unit  # both hide the Jetson GPU nodes
    env = _env(unit)
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["HOME"] == "/var/lib/lorsu"  # ProtectHome hides /home: the model cache must be writable


def test_memory_max_is_the_profile_budget() -> None:
    """MemoryMax must be the unit's --profile memory less its reserve: the budget the planner keeps to."""
    unit = {k: v[-1] for k, v in _directives(UNIT).items()}
    profile = re.search(r"--profile (\S+)", unit["ExecStart"]).group(1)
    available = get_profile(profile).available
    memory_max = parse_size(unit["MemoryMax"])  # systemd's M is binary, as parse_size reads a bare M
    assert available - 2**20 < memory_max <= available


def test_fleet_drop_in_reopens_the_network_it_needs() -> None:
    """The base unit has no network; the fleet drop-in sends each night to an MLflow server over HTTP."""
    drop_in = _directives(UNIT.parent / f"{UNIT.name}.d" / "fleet.conf")
    assert "MLFLOW_TRACKING_URI" in _env(drop_in)
    assert drop_in["PrivateNetwork"] == ["no"] and drop_in["IPAddressDeny"] == [""]
    assert drop_in["RestrictAddressFamilies"][0] == "" and "AF_INET" in drop_in["RestrictAddressFamilies"][-1].split()


def test_export_runs_only_after_adapt_and_only_when_changed() -> None:
    unit = {k: v[-1] for k, v in _directives(UNIT).items()}
    assert " adapt " in unit["ExecStart"]
    assert " export " in unit["ExecStartPost"] and "--if-changed" in unit["ExecStartPost"]


def test_readme_cron_line_is_offline_and_exports_if_changed() -> None:
    cron = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("`30 2 * * *"))
    assert "HF_HUB_OFFLINE=1" in cron and "TRANSFORMERS_OFFLINE=1" in cron
    assert "export --onnx --if-changed" in cron and "timeout " in cron


def _exposure(unit: Path) -> float:
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True,
                         text=True, timeout=60)
    return float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout).group(1))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_rates_the_unit_ok(tmp_path: Path) -> None:
    """Rated alone (a copy without its .d folder) and with the fleet drop-in beside it, as systemd reads them."""
    alone = _exposure(Path(shutil.copy(UNIT, tmp_path / UNIT.name)))
    with_fleet = _exposure(UNIT)
    assert alone <= 4.0 and with_fleet <= 4.0
    readme = (REPO / "export" / "README.md").read_text()
    assert f"exposure level for lorsu-edge-nightly.service: {alone:.1f} OK" in readme
    assert f"with the fleet drop-in: {with_fleet:.1f} OK" in readme


# --- export --if-changed ---------------------------------------------------------------------------------

FAST = ["--rank", "4", "--alpha", "8", "--batch-size", "4", "--epochs", "1", "--lr", "1e-2", "--no-progress"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("svc")
    model = save_tiny("clip", root / "model")
    wd = root / "runs"
    r = runner.invoke(app, ["adapt", "--data", str(write_toy_images(root / "data")), "--workdir", str(wd),
                            "--model", str(model), *FAST])
    assert r.exit_code == 0, r.output
    return wd


def _export(wd: Path, out: Path) -> dict:
    r = runner.invoke(app, ["export", "--onnx", "--if-changed", "--workdir", str(wd), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output.strip().splitlines()[-1])


def test_export_if_changed(workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug: the nightly export re-ran every night though nothing was accepted. Now: the first export works,
    a second is a no-op that touches nothing, and a damaged file or a changed current model exports again."""
    from lorsu_edge import export

    out = tmp_path / "encoder.onnx"
    assert _export(workdir, out)["status"] == "exported"
    first = out.read_bytes()
    calls: list[object] = []
    real = export.export_request
    monkeypatch.setattr(export, "export_request", lambda req: calls.append(req) or real(req))

    assert _export(workdir, out) == {"status": "up-to-date", "session": "0001", "out": str(out)}
    assert calls == [] and out.read_bytes() == first

    out.write_bytes(first[:-10])  # a truncated file no longer matches its sidecar's hash
    assert _export(workdir, out)["status"] == "exported" and len(calls) == 1

    assert runner.invoke(app, ["rollback", "base", "--workdir", str(workdir)]).exit_code == 0
    try:
        res = _export(workdir, out)
        assert res["status"] == "exported" and res["session"] is None and len(calls) == 2
        assert json.loads(Path(f"{out}.json").read_text())["session_id"] is None
    finally:
        assert runner.invoke(app, ["rollback", "0001", "--workdir", str(workdir)]).exit_code == 0

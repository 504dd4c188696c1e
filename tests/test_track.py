"""Tracking of nights in MLflow (lorsu_edge/track.py) and `lorsu-edge fleet status`, against a real local store
and a real `mlflow server` (sqlite backend) started and stopped by the tests."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorsu_edge.cli.main import app
from lorsu_edge.session import Workdir
from lorsu_edge.tiny import save_tiny, write_toy_images
from lorsu_edge.track import ALIAS, COMPLETE, DEVICE, EXPERIMENT, KEY, STATUS, Store, flush, local_uri, pending

mlflow = pytest.importorskip("mlflow", reason="needs lorsu-edge[fleet]")
pytestmark = pytest.mark.slow

runner = CliRunner()
FAST = ["--rank", "4", "--alpha", "8", "--batch-size", "4", "--epochs", "2", "--no-progress", "--json"]


class Server:
    """`mlflow server` on a free port with a sqlite backend; stop() and start() keep the same store and port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, wait_s: float = 120) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/db.sqlite",
               "--artifacts-destination", str(self.root / "art")]
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"mlflow server not ready in {wait_s} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the uvicorn workers go too
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny("clip", tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    return write_toy_images(tmp_path_factory.mktemp("control") / "c", seed=11)


@pytest.fixture(autouse=True)
def tracking_on(monkeypatch):
    """conftest turns tracking off for the other tests; here it is what is tested."""
    for name in ("LORSU_EDGE_TRACK", "MLFLOW_TRACKING_URI", "LORSU_EDGE_DEVICE_NAME"):
        monkeypatch.delenv(name, raising=False)


def _night(monkeypatch, device, wd, data, *args):
    monkeypatch.setenv("LORSU_EDGE_DEVICE_NAME", device)
    r = runner.invoke(app, ["adapt", "--data", str(data), "--workdir", str(wd), *FAST, *args])
    assert "Traceback" not in r.output, r.output
    return r, json.loads(r.output[r.output.rindex('{"status"'):].splitlines()[0])


def _runs(client, device=None):
    exp = client.get_experiment_by_name(EXPERIMENT)
    query = f"tags.`{DEVICE}` = '{device}'" if device else ""
    return client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time ASC"])


def test_local_store_by_default_runs_versions_and_alias_follow_rollback(tmp_path, monkeypatch, clip_dir, control):
    """No URI anywhere: the nights land in the workdir's own sqlite store; rollback moves the alias."""
    wd = tmp_path / "runs"
    for seed in (1, 2):
        r, line = _night(monkeypatch, "box-a", wd, write_toy_images(tmp_path / f"d{seed}", seed=seed),
                         "--model", str(clip_dir), "--control", str(control), "--lr", "1e-6")
        assert r.exit_code == 0 and line["status"] == "accepted", r.output
    assert pending(Workdir.open(wd)) == []
    client = mlflow.MlflowClient(local_uri(Workdir.open(wd)))
    runs = _runs(client, "box-a")
    assert [r.data.tags["lorsu_edge.session"] for r in runs] == ["0001", "0002"]
    report = json.loads((wd / "sessions" / "0002" / "report.json").read_text())
    run = runs[1]
    assert run.info.status == "FINISHED" and run.data.tags[COMPLETE] == "1" and run.data.tags[STATUS] == "accepted"
    assert run.data.params["method"] == "lorsu" and run.data.params["method.rank"] == "4"
    assert run.data.params["base_encoder_sha256"] == report["base_encoder_sha256"]
    assert run.data.metrics["control_accuracy"] == pytest.approx(report["control_accuracy"])
    assert run.data.metrics["control_accuracy_base"] == pytest.approx(
        json.loads((wd / "sessions" / "0001" / "report.json").read_text())["control_accuracy_before"])
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.value for m in sorted(losses, key=lambda m: m.step)] == pytest.approx(report["losses"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"report.json", "adapter.json", "encoder"}
    assert (wd / "tracking" / "artifacts").is_dir()  # artifacts stay in the workdir, not in the cwd
    name = "lorsu-edge-box-a"
    assert client.get_model_version_by_alias(name, ALIAS).tags["session"] == "0002"
    assert runner.invoke(app, ["rollback", "1", "--workdir", str(wd)]).exit_code == 0
    assert client.get_model_version_by_alias(name, ALIAS).tags["session"] == "0001"
    assert runner.invoke(app, ["rollback", "base", "--workdir", str(wd)]).exit_code == 0
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(name, ALIAS)


def test_two_devices_on_a_server_and_fleet_status(tmp_path, monkeypatch, server, clip_dir, control):
    """Two workdirs record to one server: runs, one registered model per device, aliases, and the status rows."""
    wd_a, wd_b = tmp_path / "a", tmp_path / "b"
    common = ["--model", str(clip_dir), "--control", str(control), "--track", server.uri]
    assert _night(monkeypatch, "box-a", wd_a, write_toy_images(tmp_path / "a1", seed=1), *common,
                  "--lr", "1e-6")[1]["status"] == "accepted"
    # later nights: the URI is remembered by the workdir
    assert _night(monkeypatch, "box-a", wd_a, write_toy_images(tmp_path / "a2", seed=2), "--lr", "1e-6")[1][
        "status"] == "accepted"
    _, rejected = _night(monkeypatch, "box-b", wd_b, write_toy_images(tmp_path / "b1", seed=3), *common,
                         "--lr", "1e-9", "--max-forgetting", "-1")
    assert rejected["status"] == "rejected"
    _, quiet = _night(monkeypatch, "box-b", wd_b, write_toy_images(tmp_path / "b1", seed=3))
    assert quiet["status"] == "nothing-new"

    client = mlflow.MlflowClient(server.uri)
    assert [r.data.tags[STATUS] for r in _runs(client, "box-a")] == ["accepted", "accepted"]
    assert [r.data.tags[STATUS] for r in _runs(client, "box-b")] == ["rejected", "nothing-new"]
    assert len(client.search_model_versions("name = 'lorsu-edge-box-a'")) == 2
    assert client.get_model_version_by_alias("lorsu-edge-box-a", ALIAS).tags["session"] == "0002"
    assert client.search_model_versions("name = 'lorsu-edge-box-b'") == []  # nothing accepted: nothing registered

    r = runner.invoke(app, ["fleet", "status", "--track", server.uri, "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["device"]: row for row in json.loads(r.output)}
    a, b = rows["box-a"], rows["box-b"]
    report_a = json.loads((wd_a / "sessions" / "0002" / "report.json").read_text())
    assert (a["current_session"], a["last_status"], a["nights_since_accepted"]) == ("0002", "accepted", 0)
    assert a["control_accuracy"] == pytest.approx(report_a["control_accuracy"])
    base_a = json.loads((wd_a / "sessions" / "0001" / "report.json").read_text())["control_accuracy_before"]
    assert a["drift_from_base_points"] == pytest.approx(100 * (report_a["control_accuracy"] - base_a))
    report_b = json.loads((wd_b / "sessions" / "0001" / "report.json").read_text())
    assert (b["current_session"], b["last_status"], b["nights_since_accepted"]) == (None, "nothing-new", 2)
    assert b["control_accuracy"] == pytest.approx(report_b["control_accuracy_before"])  # the base model's
    assert b["drift_from_base_points"] == 0
    table = runner.invoke(app, ["fleet", "status", "--track", server.uri])
    assert table.exit_code == 0 and "box-a" in table.output and "box-b" in table.output


def test_server_down_mid_night_queues_and_a_later_run_delivers_once(tmp_path, monkeypatch, server, clip_dir):
    """The server dies while the session trains: the night still commits (exit 0), the record waits in the
    queue, and the next run sends it (and its own) exactly once."""
    import lorsu_edge.adapt as recipe

    train = recipe.run_session

    def server_dies_meanwhile(*args, **kwargs):
        server.stop()
        return train(*args, **kwargs)

    monkeypatch.setattr(recipe, "run_session", server_dies_meanwhile)
    wd = tmp_path / "runs"
    started = time.monotonic()
    r, line = _night(monkeypatch, "box-c", wd, write_toy_images(tmp_path / "d", seed=4), "--model", str(clip_dir),
                     "--track", server.uri, "--lr", "1e-6")
    assert r.exit_code == 0 and line["status"] == "accepted"
    assert time.monotonic() - started < 120  # bounded: no retry loop against a dead server
    assert (wd / "sessions" / "0001" / "encoder.safetensors").is_file()
    assert len(pending(Workdir.open(wd))) == 1
    monkeypatch.setattr(recipe, "run_session", train)

    server.start()
    _, quiet = _night(monkeypatch, "box-c", wd, write_toy_images(tmp_path / "d", seed=4))
    assert quiet["status"] == "nothing-new"
    assert pending(Workdir.open(wd)) == []
    client = mlflow.MlflowClient(server.uri)
    runs = _runs(client, "box-c")
    assert [r.data.tags[STATUS] for r in runs] == ["accepted", "nothing-new"]  # in order, once each
    assert len(client.search_model_versions("name = 'lorsu-edge-box-c'")) == 1


def test_a_send_cut_off_midway_is_redone_not_duplicated(tmp_path, monkeypatch, server, clip_dir):
    """Bugs caught: a run half-sent before a crash (no `complete` tag) left beside the resent one, with its model
    version; a record deleted from the queue before its run is complete; a complete run sent again."""
    wd = tmp_path / "runs"
    register = Store._register

    def cut_after_registering(*args):
        register(*args)
        raise ConnectionError("cut")  # the version exists, the run is not complete

    monkeypatch.setattr(Store, "_register", cut_after_registering)
    _night(monkeypatch, "box-d", wd, write_toy_images(tmp_path / "d", seed=5), "--model", str(clip_dir),
           "--track", server.uri, "--lr", "1e-6")
    workdir = Workdir.open(wd)
    assert len(pending(workdir)) == 1
    client = mlflow.MlflowClient(server.uri)
    half = _runs(client, "box-d")
    assert len(half) == 1 and COMPLETE not in half[0].data.tags
    monkeypatch.undo()
    record = pending(workdir)[0].read_bytes()
    assert flush(workdir, server.uri) == 1 and pending(workdir) == []
    runs = _runs(client, "box-d")
    assert len(runs) == 1 and runs[0].data.tags[COMPLETE] == "1" and runs[0].info.run_id != half[0].info.run_id
    assert runs[0].data.tags[KEY] == half[0].data.tags[KEY]
    assert len(client.search_model_versions("name = 'lorsu-edge-box-d'")) == 1
    # a crash after the run was complete but before its queue file was removed: sending it again is a no-op
    (workdir.root / "track-queue" / "00-again.json").write_bytes(record)
    assert flush(workdir, server.uri) == 1 and pending(workdir) == []
    assert [r.info.run_id for r in _runs(client, "box-d")] == [runs[0].info.run_id]
    assert len(client.search_model_versions("name = 'lorsu-edge-box-d'")) == 1


def test_bad_track_uri_and_unreachable_fleet_server(tmp_path):
    r = runner.invoke(app, ["adapt", "--data", str(tmp_path), "--track", "fleet-server"])
    assert r.exit_code == 3 and "not a tracking URI" in r.output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = runner.invoke(app, ["fleet", "status", "--track", dead])
    assert r.exit_code == 3 and "cannot read the tracking store" in r.output

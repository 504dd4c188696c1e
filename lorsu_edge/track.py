"""Tracking: every night of a workdir becomes an MLflow run; each accepted encoder a registered model version.

A night is never blocked on the network. `record_night` / `record_rollback` only write a record into the
workdir's queue (`track-queue/`, one atomic JSON file per record, named so that names sort in time order)
and then try to send the queue, oldest first, with short HTTP timeouts, stopping at the first failure: an
unreachable server costs a night one refused connection, and the records wait for a later run.

Each record reaches the store exactly once. Its key (workdir id + session id; for a night without a session,
+ the record's file name) is a run tag, looked up before a run is made. The run gets the tag
`lorsu_edge.complete` last; a run without it (a send cut off midway) is deleted with its model versions and
made again. The queue file is removed only after that tag is set.

Where the records go: `--track URI` (remembered by the workdir), else `$LORSU_EDGE_TRACK`, else
`$MLFLOW_TRACKING_URI`, else a local sqlite store inside the workdir (`tracking/`, no server needed; MLflow
refuses its old `file:` store). `off` turns tracking off. Without the `fleet` extra (no mlflow) and no URI
asked for, nothing is recorded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from lorsu_edge.atomic import atomic_write_json, fsync_dir, is_temp_name
from lorsu_edge.distributed import is_main
from lorsu_edge.errors import BadInputError
from lorsu_edge.session import REPORT_FILE, STATUS_FILE, Workdir, now_iso

log = logging.getLogger(__name__)

QUEUE_DIR = "track-queue"
SETTINGS_FILE = "track.json"
LOCAL_DIR = "tracking"
OFF = "off"
EXPERIMENT = "lorsu-edge"
ALIAS = "current"
ENCODER_ARTIFACT = "encoder"
ARTIFACTS = (REPORT_FILE, "adapter.json", STATUS_FILE)
# Bounds for one send attempt (MLflow reads these per request); the user's own values win.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
SEND_BUDGET_S = 120.0  # stop sending after this long; the rest waits for the next run

KEY, COMPLETE, DEVICE, STATUS, SESSION = ("lorsu_edge.key", "lorsu_edge.complete", "lorsu_edge.device",
                                          "lorsu_edge.status", "lorsu_edge.session")


# --- where the records go --------------------------------------------------------------------------------


def _settings(wd: Workdir) -> dict[str, Any]:
    try:
        doc = json.loads((wd.root / SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def workdir_id(wd: Workdir) -> str:
    """A random id made once per workdir: half of every record's idempotency key."""
    doc = _settings(wd)
    if isinstance(doc.get("id"), str):
        return doc["id"]
    doc["id"] = secrets.token_hex(8)
    atomic_write_json(wd.root / SETTINGS_FILE, doc)
    return doc["id"]


def remember_uri(wd: Workdir, uri: str) -> None:
    """Remember `--track URI` (or `off`) for the workdir's later runs."""
    doc = _settings(wd)
    if doc.get("uri") != uri:
        doc["uri"] = uri
        atomic_write_json(wd.root / SETTINGS_FILE, doc)


def local_uri(wd: Workdir) -> str:
    """The workdir's own store: sqlite, artifacts beside it (see `experiment_id`)."""
    return f"sqlite:///{(wd.root / LOCAL_DIR).resolve() / 'mlflow.db'}"


def resolve_uri(wd: Workdir, flag: str | None = None) -> str | None:
    """The store this workdir records to (None: off). Order: flag, env, remembered, local default."""
    explicit = (flag or os.environ.get("LORSU_EDGE_TRACK") or os.environ.get("MLFLOW_TRACKING_URI")
                or _settings(wd).get("uri"))
    if explicit:
        return None if explicit == OFF else str(explicit)
    return local_uri(wd) if mlflow_installed() else None


def check_track(value: str | None) -> str | None:
    """Validate `--track`: `off`, or a tracking URI (with MLflow installed to send to it)."""
    if value is None or value == OFF:
        return value
    if "://" not in value and value != "databricks":
        raise BadInputError(f"--track {value!r} is not a tracking URI",
                            hint="e.g. http://fleet-server:5000, sqlite:////var/lib/lorsu/mlflow.db, or off")
    if not mlflow_installed():
        raise BadInputError("--track needs MLflow, which is not installed",
                            hint='pip install -c constraints.txt "lorsu-edge[fleet]", or pass --track off')
    return value


def mlflow_installed() -> bool:
    return importlib.util.find_spec("mlflow") is not None


def device_name() -> str:
    """This box's name in the fleet: $LORSU_EDGE_DEVICE_NAME, else the host name."""
    return os.environ.get("LORSU_EDGE_DEVICE_NAME") or socket.gethostname()


def registered_model_name(device: str) -> str:
    """One registered model per device (MLflow allows letters, digits, '-', '_', '.')."""
    return "lorsu-edge-" + re.sub(r"[^A-Za-z0-9_.-]", "_", device)


# --- the queue ---------------------------------------------------------------------------------------------


def record_night(wd: Workdir, flag: str | None, run: dict[str, Any]) -> None:
    """Queue one night (a runs.jsonl record: status, session, reason/error, seconds) and try to send the queue.

    Never raises and never takes longer than the send budget: tracking must not fail or stall a night.
    """
    _guarded(wd, flag, {"kind": "night", "run": run, "session": run.get("session")
                        if run.get("status") in ("accepted", "rejected") else None})


def record_rollback(wd: Workdir, flag: str | None, session: str | None) -> None:
    """Queue moving the device's `current` alias to `session`'s version (None: the base model, no alias)."""
    _guarded(wd, flag, {"kind": "rollback", "session": session})


def _guarded(wd: Workdir, flag: str | None, record: dict[str, Any]) -> None:
    if not is_main():  # data-parallel: rank 0 records the night
        return
    try:
        if flag:
            remember_uri(wd, flag)
        uri = resolve_uri(wd, flag)
        if uri is None:
            return
        enqueue(wd, record)
        flush(wd, uri)
    except Exception as e:  # noqa: BLE001 - a tracking problem is a warning, never the night's failure
        log.warning("tracking: %s: %s (the run itself is unaffected)", type(e).__name__, e)


def enqueue(wd: Workdir, record: dict[str, Any]) -> Path:
    """Write `record` (with its key, device, workdir and time added) as the queue's newest file."""
    queue = wd.root / QUEUE_DIR
    queue.mkdir(exist_ok=True)
    name = f"{time.time_ns():020d}-{os.getpid()}"
    wid = workdir_id(wd)
    key = f"{wid}/session/{record['session']}" if record.get("session") and record["kind"] == "night" \
        else f"{wid}/{record['kind']}/{name}"
    path = queue / f"{name}.json"
    # milliseconds: the runs are ordered by this time (fleet status takes the newest), and two nights of one
    # box can fall in the same second (a rejected night, then an immediate "nothing new")
    atomic_write_json(path, {**record, "key": key, "device": device_name(), "workdir": str(wd.root.resolve()),
                             "created": now_iso("milliseconds")})
    fsync_dir(queue)
    return path


def pending(wd: Workdir) -> list[Path]:
    """Queued records, oldest first."""
    queue = wd.root / QUEUE_DIR
    if not queue.is_dir():
        return []
    return sorted(p for p in queue.iterdir() if p.suffix == ".json" and not is_temp_name(p.name))


@contextlib.contextmanager
def http_limits() -> Iterator[None]:
    """Short request timeouts, no retries (unless the user set their own), restored afterwards."""
    added = [k for k in HTTP_LIMITS if k not in os.environ]
    os.environ.update({k: HTTP_LIMITS[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def flush(wd: Workdir, uri: str, budget_s: float = SEND_BUDGET_S) -> int:
    """Send queued records in order until one fails or the budget is spent; returns how many were sent.

    One sender at a time per workdir (a second one returns 0 at once). A failure is logged as a warning
    and leaves that record and the later ones queued.
    """
    from filelock import FileLock, Timeout

    records = pending(wd)
    if not records:
        return 0
    lock = FileLock(str(wd.root / QUEUE_DIR / ".send.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return 0
    sent, deadline = 0, time.monotonic() + budget_s
    try:
        with http_limits():
            store = Store(uri, wd)
            for path in pending(wd):
                if time.monotonic() > deadline:
                    break
                store.send(json.loads(path.read_text(encoding="utf-8")), wd)
                path.unlink()
                sent += 1
    except Exception as e:  # noqa: BLE001 - unreachable server, bad URI, ...: retry on a later run
        left = len(pending(wd))
        log.warning("tracking: could not send to %s (%s); %d record%s queued in %s for the next run", uri,
                    _one_line(e), left, "" if left == 1 else "s", wd.root / QUEUE_DIR)
    finally:
        lock.release()
    return sent


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


# --- one record into MLflow ----------------------------------------------------------------------------------


class Store:
    """An MLflow tracking store plus its model registry, as the queue writes to it."""

    def __init__(self, uri: str, wd: Workdir) -> None:
        from mlflow import MlflowClient

        if uri.startswith("sqlite:"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.experiment = experiment_id(self.client, wd.root / LOCAL_DIR / "artifacts"
                                        if uri == local_uri(wd) else None)

    def send(self, record: dict[str, Any], wd: Workdir) -> None:
        if record["kind"] == "rollback":
            self._move_alias(record)
        else:
            self._send_night(record, wd)

    def _send_night(self, record: dict[str, Any], wd: Workdir) -> None:
        client = self.client
        for run in client.search_runs([self.experiment], f"tags.`{KEY}` = '{record['key']}'"):
            if run.data.tags.get(COMPLETE) == "1":
                return  # sent before; its queue file outlived the send (a crash just after)
            self._undo(run.info.run_id)
        session_dir = _session_dir(wd, record.get("session"))
        report = _read(session_dir / REPORT_FILE) if session_dir else {}
        status = record["run"].get("status", "failed")
        run = client.create_run(self.experiment, start_time=_ms(record["created"]),
                                run_name=f"{record['device']}/{record.get('session') or status}",
                                tags=_tags(record, report, status))
        run_id = run.info.run_id
        client.log_batch(run_id, metrics=_metrics(record, report, _base_scores(wd)), params=_params(report))
        for name in ARTIFACTS:
            if session_dir and (session_dir / name).is_file():
                client.log_artifact(run_id, str(session_dir / name))
        for plot in sorted(session_dir.glob("*.png")) if session_dir else ():
            client.log_artifact(run_id, str(plot))
        if status == "accepted":
            self._register(record, run_id, session_dir)
        client.set_terminated(run_id, "FAILED" if status == "failed" else "FINISHED")
        client.set_tag(run_id, COMPLETE, "1")

    def _undo(self, run_id: str) -> None:
        """Delete a half-sent run and the model versions made from it, so the record can be sent afresh."""
        for version in self.client.search_model_versions(f"run_id = '{run_id}'"):
            self.client.delete_model_version(version.name, version.version)
        self.client.delete_run(run_id)

    def _register(self, record: dict[str, Any], run_id: str, session_dir: Path) -> None:
        from lorsu_edge.session import ENCODER_FILE

        name = registered_model_name(record["device"])
        self.client.log_artifact(run_id, str(session_dir / ENCODER_FILE), ENCODER_ARTIFACT)
        self._ensure_model(name)
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{ENCODER_ARTIFACT}"
        version = self.client.create_model_version(name, source, run_id=run_id,
                                                   tags={"session": record["session"], KEY: record["key"]})
        self.client.set_registered_model_alias(name, ALIAS, version.version)

    def _ensure_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        with contextlib.suppress(MlflowException):  # already there
            self.client.create_registered_model(name, tags={DEVICE: name.removeprefix("lorsu-edge-")})

    def _move_alias(self, record: dict[str, Any]) -> None:
        from mlflow.exceptions import MlflowException

        name = registered_model_name(record["device"])
        if record["session"] is None:
            with contextlib.suppress(MlflowException):  # no alias (or no model) yet: nothing to move
                self.client.delete_registered_model_alias(name, ALIAS)
            return
        versions = self.client.search_model_versions(f"name = '{name}' and tags.session = '{record['session']}'")
        if not versions:
            log.warning("tracking: session %s of %s was never registered; alias not moved", record["session"], name)
            return
        self.client.set_registered_model_alias(name, ALIAS, max(int(v.version) for v in versions))


def experiment_id(client, artifacts: Path | None) -> str:
    """The `lorsu-edge` experiment, made on first use (a local store keeps its artifacts in `artifacts`)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(EXPERIMENT)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=artifacts.resolve().as_uri()
                                        if artifacts else None)
    except MlflowException:  # another box made it in the meantime
        return client.get_experiment_by_name(EXPERIMENT).experiment_id


def _session_dir(wd: Workdir, session: str | None) -> Path | None:
    if not session:
        return None
    path = wd.sessions_root / session
    return path if path.is_dir() else None  # removed by retention since: the run keeps what the queue holds


def _read(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def _tags(record: dict[str, Any], report: dict[str, Any], status: str) -> dict[str, str]:
    run = record["run"]
    tags = {KEY: record["key"], DEVICE: record["device"], STATUS: status, "lorsu_edge.workdir": record["workdir"],
            "lorsu_edge.reason": str(run.get("reason") or run.get("error") or "")[:5000],
            "lorsu_edge.profile": str((report.get("plan") or {}).get("profile") or ""),
            "lorsu_edge.exit_code": str(run.get("exit_code", ""))}
    if record.get("session"):
        tags[SESSION] = record["session"]
        tags["lorsu_edge.parent_session"] = str(report.get("parent_session") or "")
    return tags


def _params(report: dict[str, Any]) -> list:
    from mlflow.entities import Param

    flat = {f"method.{k}": v for k, v in (report.get("method_config") or {}).items()}
    flat.update({f"train.{k}": v for k, v in (report.get("train_config") or {}).items()})
    flat.update({k: report[k] for k in ("method", "loss", "model", "base_encoder_sha256", "precision", "quantize",
                                        "device", "lorsu_edge") if k in report})
    return [Param(k, str(v)[:6000]) for k, v in sorted(flat.items())]


SCALARS = ("target_accuracy_before", "target_accuracy", "control_accuracy_before", "control_accuracy", "alpha",
           "forgetting_points", "total_forgetting_points", "seconds", "train_seconds", "peak_memory_bytes",
           "predicted_peak_bytes", "trainable_params", "samples_used", "samples_skipped", "loss_first", "loss_last")


def _metrics(record: dict[str, Any], report: dict[str, Any], base: dict[str, float]) -> list:
    """Scalars of the report (or of the run line, for a night without a session), the loss per step, and the
    base model's control accuracy (for the fleet's drift column)."""
    from mlflow.entities import Metric

    at = _ms(record["created"])
    values = {k: report[k] for k in SCALARS if isinstance(report.get(k), (int, float))}
    if not report and isinstance(record["run"].get("seconds"), (int, float)):
        values["seconds"] = record["run"]["seconds"]
    control = report.get("control_accuracy_base", base.get(report.get("control_set_sha256", "")))
    if isinstance(control, (int, float)):
        values["control_accuracy_base"] = control
    metrics = [Metric(k, float(v), at, 0) for k, v in sorted(values.items())]
    return metrics + [Metric("loss", float(v), at, i) for i, v in enumerate(report.get("losses") or [])]


def _base_scores(wd: Workdir) -> dict[str, float]:
    """The base model's control accuracy per control set: the "before" of each session that started from base."""
    scores = {}
    for row in wd.history():
        if row.get("parent") is None and "control_accuracy_before" in row and "control_set_sha256" in row:
            scores.setdefault(row["control_set_sha256"], row["control_accuracy_before"])
    return scores

"""The fleet at a glance, read back from the tracking store that every box records its nights to (track.py).

One row per device: which session is current (the registry's `current` alias), how last night went and why,
target and control accuracy of the current encoder, its control drift from the base model, and how many
nights passed since the last accepted session.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

from lorsu_edge.track import ALIAS, COMPLETE, DEVICE, EXPERIMENT, SESSION, STATUS, registered_model_name


@dataclass
class DeviceRow:
    device: str
    current_session: str | None
    """Session whose encoder the registry's `current` alias points at (None: the base model)."""
    current_version: int | None
    last_night: str
    """Start time of the device's latest night (UTC, ISO)."""
    last_status: str
    """accepted | rejected | nothing-new | failed"""
    last_reason: str
    target_accuracy: float | None
    control_accuracy: float | None
    drift_from_base_points: float | None
    """Control accuracy of the current encoder minus the base model's, in points (negative: forgot)."""
    nights_since_accepted: int
    """Nights after the latest accepted one (all nights when none was accepted)."""
    workdir: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fleet_status(uri: str) -> list[DeviceRow]:
    """One row per device that recorded a night to the store at `uri`, sorted by device name."""
    from mlflow import MlflowClient

    from lorsu_edge.track import http_limits

    with http_limits():
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            return []
        by_device: dict[str, list] = defaultdict(list)
        for run in _all_runs(client, experiment.experiment_id):
            by_device[run.data.tags[DEVICE]].append(run)
        return [_row(client, device, runs) for device, runs in sorted(by_device.items())]


def _all_runs(client, experiment_id: str) -> list:
    """Completed night runs, oldest first (paged: a fleet's history outgrows one page)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], f"tags.`{COMPLETE}` = '1'", max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _row(client, device: str, runs: list) -> DeviceRow:
    last = runs[-1]
    accepted = [i for i, r in enumerate(runs) if r.data.tags.get(STATUS) == "accepted"]
    version = _current_version(client, device)
    now = next((r for r in runs if version and r.info.run_id == version.run_id), None)
    metrics = now.data.metrics if now else _base_metrics(runs)
    control, base = metrics.get("control_accuracy"), _latest(runs, "control_accuracy_base")
    return DeviceRow(
        device=device, current_session=version.tags.get("session") if version else None,
        current_version=int(version.version) if version else None,
        last_night=_iso(last.info.start_time), last_status=last.data.tags.get(STATUS, ""),
        last_reason=last.data.tags.get("lorsu_edge.reason", ""),
        target_accuracy=metrics.get("target_accuracy"), control_accuracy=control,
        drift_from_base_points=round(100 * (control - base), 3) if control is not None and base is not None else None,
        nights_since_accepted=len(runs) - 1 - accepted[-1] if accepted else len(runs),
        workdir=last.data.tags.get("lorsu_edge.workdir", ""),
    )


def _current_version(client, device: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(registered_model_name(device), ALIAS)
    except MlflowException:  # no model or no alias: the device runs its base model
        return None


def _base_metrics(runs: list) -> dict[str, float]:
    """Accuracies of the base model: the "before" scores of the device's latest session started from base."""
    for run in reversed(runs):
        if run.data.tags.get(SESSION) and not run.data.tags.get("lorsu_edge.parent_session"):
            m = run.data.metrics
            return {k: m[f"{k}_before"] for k in ("target_accuracy", "control_accuracy") if f"{k}_before" in m}
    return {}


def _latest(runs: list, metric: str) -> float | None:
    return next((r.data.metrics[metric] for r in reversed(runs) if metric in r.data.metrics), None)


def _iso(ms: int) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds")

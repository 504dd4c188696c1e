"""Shared test settings."""

import pytest


@pytest.fixture(autouse=True)
def _no_tracking(monkeypatch):
    """With lorsu-edge[fleet] installed, every adapt would record its night to a new sqlite store in its workdir
    (seconds of database setup each); tracking has its own tests (test_track.py), which turn it back on."""
    monkeypatch.setenv("LORSU_EDGE_TRACK", "off")

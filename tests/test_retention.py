"""Retention: `adapt --keep N` (remembered) and `prune` remove old encoders and nothing else; a pruned
encoder is rebuilt from its ancestors' adapters (rollback writes it back, eval/export rebuild in memory),
verified against the sha256 its session recorded."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorsu_edge.atomic import atomic_write_json
from lorsu_edge.cli.main import app
from lorsu_edge.errors import BadInputError
from lorsu_edge.integrity import PRUNED_FILE, file_tensors_hash, is_pruned, read_report, session_problem
from lorsu_edge.retention import kept_encoders
from lorsu_edge.session import ENCODER_FILE, REPORT_FILE, Workdir, write_samples_file

from test_faults import _adapt, make_site

pytestmark = pytest.mark.slow


def _fake(wd: Workdir, accepted: bool) -> str:
    with wd.staged_session() as partial:
        (partial / ENCODER_FILE).write_bytes(os.urandom(64))
        atomic_write_json(partial / REPORT_FILE, {"encoder_sha256": "x"})
        write_samples_file(partial, [])
        return wd.commit_session(partial, accepted=accepted)


def test_kept_encoders_are_the_current_and_the_newest_accepted(tmp_path: Path) -> None:
    wd = Workdir.open(tmp_path / "runs", create=True)
    with wd.lock():
        for accepted in (True, True, False, True):
            _fake(wd, accepted)
        wd.rollback("1")
        assert kept_encoders(wd, 0) == {"0001"}  # the current one, always
        assert kept_encoders(wd, 1) == {"0001", "0004"}  # a rejected session (0003) is never kept
        assert kept_encoders(wd, 2) == {"0001", "0002", "0004"}
        with pytest.raises(BadInputError):
            kept_encoders(wd, -1)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two accepted sessions; the second run passes --keep 1, which prunes 0001's encoder."""
    site = make_site(tmp_path_factory.mktemp("retention"))
    hash1 = file_tensors_hash(site["runs"] / "sessions" / "0001" / ENCODER_FILE)
    res = _adapt(site["runs"], site["model"], site["day2"], "--keep", "1")
    assert res.returncode == 0, res.stderr
    return {**site, "hash1": hash1}


def test_adapt_keep_prunes_only_encoders_and_is_remembered(made: dict) -> None:
    wd = Workdir.open(made["runs"])
    assert wd.settings()["keep"] == 1 and wd.current() == "0002"
    s1, s2 = wd.session_dir("0001"), wd.session_dir("0002")
    assert is_pruned(s1) and not (s1 / ENCODER_FILE).exists() and (s2 / ENCODER_FILE).is_file()
    assert {p.name for p in s1.iterdir()} >= {"status.json", REPORT_FILE, "samples.json", "adapter.json",
                                              "adapter.safetensors", PRUNED_FILE}
    assert len(wd.seen_hashes()) == 16  # the inbox still remembers day 1: nothing is retrained
    assert session_problem(wd, "0001") is None  # pruned is not damaged
    assert wd.runs()[-1]["status"] == "accepted"


def test_rollback_rebuilds_then_prune_verb_then_eval_rebuilds(made: dict, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(made["runs"], runs)
    cli = CliRunner()
    res = cli.invoke(app, ["rollback", "1", "--workdir", str(runs)])
    assert res.exit_code == 0, res.output
    wd = Workdir.open(runs)
    s1 = wd.session_dir("0001")
    assert (s1 / ENCODER_FILE).is_file() and not (s1 / PRUNED_FILE).exists()
    assert file_tensors_hash(s1 / ENCODER_FILE) == made["hash1"] == read_report(s1)["encoder_sha256"]

    res = cli.invoke(app, ["prune", "--workdir", str(runs)])  # remembered keep=1: 0002 is the newest accepted
    assert res.exit_code == 0 and "nothing to prune" in res.output, res.output
    res = cli.invoke(app, ["prune", "--keep", "0", "--workdir", str(runs)])
    assert res.exit_code == 0 and "session(s) 0002" in res.output, res.output
    assert is_pruned(wd.session_dir("0002")) and wd.runs()[-1]["removed"] == ["0002"]

    from lorsu_edge.load import load_session_model, resolve_session
    from lorsu_edge.merge import encoder_state_dict, tensors_hash

    loaded = load_session_model(resolve_session(runs, "2"))  # rebuilt from 0001's encoder + 0002's adapter
    assert tensors_hash(encoder_state_dict(loaded.model, loaded.spec)) == read_report(
        wd.session_dir("0002"))["encoder_sha256"]


def test_rebuild_with_a_damaged_adapter_is_refused(made: dict, tmp_path: Path) -> None:
    """The rebuilt encoder is checked against the recorded hash: a damaged adapter cannot pass as session 1."""
    runs = tmp_path / "runs"
    shutil.copytree(made["runs"], runs)
    adapter = runs / "sessions" / "0001" / "adapter.safetensors"
    from test_faults import _flip_byte

    _flip_byte(adapter, "lora_B")
    res = CliRunner().invoke(app, ["rollback", "1", "--workdir", str(runs)])
    assert res.exit_code == 3 and "does not match its recorded sha256" in res.output, res.output
    wd = Workdir.open(runs)
    assert wd.current() == "0002" and is_pruned(wd.session_dir("0001"))

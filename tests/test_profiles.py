"""Profiles are data: every shipped file validates, a bad field is named, user files override."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorsu_edge import profiles
from lorsu_edge.budget import parse_size
from lorsu_edge.errors import ExitCode, ProfileError

SHIPPED = sorted((Path(profiles.__file__).parent.parent / "profiles").glob("*.toml"))
GOOD = """title = "Test board"
device = "cuda"
total_memory = "8GiB"
unified = true
reserve = "1GiB"
runtime_overhead = "512MiB"
compute_dtypes = ["bf16", "fp32"]
bnb_4bit = false
note = "a test profile"
"""


@pytest.fixture(autouse=True)
def _no_user_profiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORSU_EDGE_HOME", str(tmp_path / "home"))


def test_the_issue_targets_ship() -> None:
    names = {p.stem for p in SHIPPED}
    assert {"jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-32gb", "jetson-agx-orin-64gb",
            "jetson-agx-xavier-32gb", "desktop-24gb", "cpu"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_profile_loads(path: Path) -> None:
    p = profiles.load_profile_file(path)
    assert p.name == path.stem
    assert 0 < p.reserve + p.runtime_overhead < p.total_memory
    assert p.available == p.total_memory - p.reserve
    assert set(p.compute_dtypes) <= set(profiles.DTYPES) and p.compute_dtypes
    assert p.device in profiles.DEVICES
    assert p.note and "\n" not in p.note
    if p.device == "cpu":
        assert "fp16" not in p.compute_dtypes  # fp16 backward on CPU is ~100x slower
    if p.name.startswith("jetson"):
        assert p.unified


def test_volta_has_no_bf16() -> None:
    xavier = profiles.get_profile("jetson-agx-xavier-32gb")
    assert "bf16" not in xavier.compute_dtypes and xavier.default_dtype == "fp16"


def test_registry_lists_every_file() -> None:
    assert [p.name for p in profiles.list_profiles()] == sorted(p.stem for p in SHIPPED)


def test_get_profile_by_path(tmp_path: Path) -> None:
    f = tmp_path / "board.toml"
    f.write_text(GOOD)
    p = profiles.get_profile(str(f))
    assert p.name == "board" and p.total_memory == 8 * 2**30 and p.runtime_overhead == 512 * 2**20


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(ProfileError) as err:
        profiles.get_profile("no-such-board")
    assert "jetson-orin-nano-8gb" in err.value.hint
    assert err.value.exit_code == ExitCode.BAD_INPUT


@pytest.mark.parametrize("field, line, words", [
    ("total_memory", 'total_memory = "lots"', "not a size"),
    ("device", 'device = "tpu"', "must be one of"),
    ("unified", 'unified = "yes"', "must be a bool"),
    ("compute_dtypes", 'compute_dtypes = ["int4"]', "non-empty list"),
    ("compute_dtypes", "compute_dtypes = []", "non-empty list"),
    ("bnb_4bit", "bnb_4bit = 1", "must be a bool"),
    ("reserve", 'reserve = "9GiB"', "leaves nothing"),
    ("title", "title = 3", "must be a str"),
])
def test_bad_field_is_named(tmp_path: Path, field: str, line: str, words: str) -> None:
    text = "\n".join(line if row.startswith(f"{field} =") else row for row in GOOD.splitlines())
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ProfileError) as err:
        profiles.load_profile_file(f)
    assert repr(field) in err.value.message and words in err.value.message
    assert str(f) in err.value.hint


def test_missing_and_unknown_fields_are_named(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(GOOD.replace('note = "a test profile"\n', ""))
    with pytest.raises(ProfileError, match="'note' is missing"):
        profiles.load_profile_file(f)
    f.write_text(GOOD + 'colour = "green"\n')
    with pytest.raises(ProfileError, match="'colour' is unknown"):
        profiles.load_profile_file(f)


def test_broken_toml_is_a_profile_error(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("title = \n")
    with pytest.raises(ProfileError, match="not valid TOML"):
        profiles.load_profile_file(f)


def test_profile_not_utf8_is_a_profile_error_naming_the_line(tmp_path: Path) -> None:
    """Bug: UnicodeDecodeError (not a TOMLDecodeError) escaped as an internal error, exit 1."""
    bad = tmp_path / "mine.toml"
    bad.write_bytes(b'# my box\ntitle = "caf\xe9"\n')
    with pytest.raises(ProfileError, match=r"line 2: not UTF-8") as info:
        profiles.get_profile(bad)
    assert info.value.exit_code == 3 and str(bad) in info.value.message


def test_user_dir_overrides_builtin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "edge"
    (home / "profiles").mkdir(parents=True)
    (home / "profiles" / "jetson-orin-nano-8gb.toml").write_text(GOOD.replace("bnb_4bit = false", "bnb_4bit = true"))
    (home / "profiles" / "my-board.toml").write_text(GOOD)
    monkeypatch.setenv("LORSU_EDGE_HOME", str(home))
    assert profiles.user_dir() == home / "profiles"
    assert profiles.get_profile("jetson-orin-nano-8gb").bnb_4bit is True
    assert "my-board" in [p.name for p in profiles.list_profiles()]


def test_auto_total_memory_is_this_machine(tmp_path: Path) -> None:
    f = tmp_path / "host.toml"
    f.write_text(GOOD.replace('total_memory = "8GiB"', 'total_memory = "auto"'))
    assert profiles.load_profile_file(f).total_memory == profiles.machine_memory() > parse_size("1GiB")

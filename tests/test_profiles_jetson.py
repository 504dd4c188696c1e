"""Jetson detection on faked device-tree files: the board's own profile and why, and no silent `cpu` fallback
when the installed torch has no CUDA (the pinned PyPI torch on a Jetson)."""

from pathlib import Path

import pytest

from lorsu_edge import profiles
from lorsu_edge.errors import ExitCode, ProfileError

# Device-tree model strings as the boards report them (NUL-terminated), and MemTotal as `free` shows it.
BOARDS = [
    ("NVIDIA Jetson Orin Nano Developer Kit", "7.4GiB", "jetson-orin-nano-8gb"),
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", "15.3GiB", "jetson-orin-nx-16gb"),
    ("Jetson AGX Orin Developer Kit", "30.6GiB", "jetson-agx-orin-32gb"),
    ("NVIDIA Jetson AGX Orin Developer Kit", "61.4GiB", "jetson-agx-orin-64gb"),
    ("NVIDIA Jetson AGX Xavier Developer Kit", "30.5GiB", "jetson-agx-xavier-32gb"),
]


def _fake(tmp_path: Path, model: str | None, mem: str, release: bool = True) -> dict[str, Path]:
    files = {"model_file": tmp_path / "model", "release_file": tmp_path / "nv_tegra_release",
             "meminfo": tmp_path / "meminfo"}
    if model is not None:
        files["model_file"].write_bytes(model.encode() + b"\0")
    if release:
        files["release_file"].write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic\n")
    kib = profiles.parse_size(mem) // 1024
    files["meminfo"].write_text(f"MemTotal:       {kib} kB\nMemFree:         1000 kB\n")
    return files


@pytest.mark.parametrize("model, mem, expected", BOARDS)
def test_each_board_gets_its_profile_and_says_why(tmp_path, model, mem, expected):
    found = profiles.detect(**_fake(tmp_path, model, mem), cuda=True)
    assert found.profile.name == expected
    assert model in found.reason and "GiB" in found.reason


def test_agx_orin_memory_decides_between_32_and_64(tmp_path):
    """Both AGX Orin modules report the same board name: picking by name alone would plan a 64 GB box as 32 GB."""
    small = profiles.detect(**_fake(tmp_path, "Jetson AGX Orin", "30.6GiB"), cuda=True)
    (tmp_path / "b").mkdir()
    big = profiles.detect(**_fake(tmp_path / "b", "Jetson AGX Orin", "61.4GiB"), cuda=True)
    assert (small.profile.name, big.profile.name) == ("jetson-agx-orin-32gb", "jetson-agx-orin-64gb")


def test_smaller_module_of_a_family_plans_with_its_own_memory(tmp_path):
    """An Orin Nano 4GB matches the 8 GB profile by name: planning it with 7.4 GiB would overcommit by 2x."""
    found = profiles.detect(**_fake(tmp_path, "NVIDIA Jetson Orin Nano Developer Kit", "3.4GiB"), cuda=True)
    assert found.profile.total_memory == profiles.parse_size("3.4GiB") // 1024 * 1024  # MemTotal is in kB
    assert found.profile.name.startswith("jetson-orin-nano-8gb") and "3.4 GiB" in found.reason
    assert found.profile.reserve == profiles.get_profile("jetson-orin-nano-8gb").reserve


@pytest.mark.parametrize("model, mem, expected", BOARDS[:1] + BOARDS[-1:])
def test_jetson_without_cuda_refuses_instead_of_cpu(tmp_path, model, mem, expected):
    with pytest.raises(ProfileError) as err:
        profiles.detect(**_fake(tmp_path, model, mem), cuda=False)
    assert model in err.value.message and "no CUDA" in err.value.message
    assert "JetPack" in err.value.hint and "--profile cpu" in err.value.hint
    assert err.value.exit_code == ExitCode.BAD_INPUT


def test_release_file_alone_is_a_jetson(tmp_path):
    """In a container the device tree may be hidden; /etc/nv_tegra_release still marks L4T."""
    files = _fake(tmp_path, None, "7.4GiB")
    found = profiles.detect(**files, cuda=True)
    assert found.profile.name == "jetson-orin-nano-8gb" and "L4T" in found.reason
    with pytest.raises(ProfileError):
        profiles.detect(**files, cuda=False)


def test_not_a_jetson_without_cuda_is_cpu(tmp_path):
    files = _fake(tmp_path, "Raspberry Pi 5 Model B Rev 1.0", "7.8GiB", release=False)
    found = profiles.detect(**files, cuda=False)
    assert found.profile.name == "cpu" and found.reason == "no CUDA device"


def test_this_machine_detection_is_shown_by_the_profiles_verb():
    from typer.testing import CliRunner

    from lorsu_edge.cli.main import app

    r = CliRunner().invoke(app, ["profiles"])
    assert r.exit_code == 0 and "this machine: " in r.output

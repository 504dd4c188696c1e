"""constraints-jetson.txt must stay constraints.txt minus the pins JetPack provides (torch and bitsandbytes from
NVIDIA's Jetson wheel index): a pin added to one file and not the other would break the Jetson install."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FROM_JETPACK = ("torch", "bitsandbytes")


def _pins(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_jetson_constraints_are_the_pinned_set_without_jetpacks_packages():
    main = _pins(ROOT / "constraints.txt")
    jetson = _pins(ROOT / "constraints-jetson.txt")
    assert {p.split("==")[0] for p in main} >= set(FROM_JETPACK)  # the main file pins them
    assert jetson == [p for p in main if p.split("==")[0] not in FROM_JETPACK]

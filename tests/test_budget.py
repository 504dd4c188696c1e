"""--budget parsing: one documented rule for SI vs binary units, and clear errors for garbage."""

from __future__ import annotations

import pytest

from lorsu_edge.budget import budget_flag, format_size, parse_size
from lorsu_edge.errors import BadInputError, ExitCode


@pytest.mark.parametrize("text, expected", [
    ("8GB", 8 * 10**9),
    ("8GiB", 8 * 2**30),
    ("7.5G", int(7.5 * 2**30)),
    ("8000MB", 8000 * 10**6),
    ("512MiB", 512 * 2**20),
    ("512M", 512 * 2**20),
    ("8 gb", 8 * 10**9),
    (" 1.5 TiB ", int(1.5 * 2**40)),
    ("2097152", 2**21),
    ("3000000B", 3 * 10**6),
])
def test_good_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_si_and_binary_differ_consistently() -> None:
    assert parse_size("1GiB") > parse_size("1GB")
    assert parse_size("1G") == parse_size("1GiB")
    assert parse_size("1000MB") == parse_size("1GB")
    assert parse_size("1024MiB") == parse_size("1GiB")


@pytest.mark.parametrize("text", ["", "GB", "eight GB", "8XB", "8 G B", "-1GB", "0GB", "1e3GB", "8GB!", "nan", "8", "4096B"])
def test_bad_sizes_raise_bad_input(text: str) -> None:
    with pytest.raises(BadInputError) as err:
        parse_size(text)
    assert err.value.exit_code == ExitCode.BAD_INPUT
    assert "--budget" in err.value.message
    assert err.value.hint


def test_error_names_the_option() -> None:
    with pytest.raises(BadInputError, match="reserve"):
        parse_size("lots", what="reserve")


@pytest.mark.parametrize("n", [1, 3 * 2**20, 5 * 2**30 + 12345, int(7.44 * 2**30)])
def test_budget_flag_round_trips_to_at_least_n(n: int) -> None:
    flag = budget_flag(n)
    assert parse_size(flag) >= n
    assert parse_size(flag) - n < 0.1 * 2**30 + 2**20  # rounded up by less than one step


def test_format_size_uses_binary_units() -> None:
    assert format_size(2**30) == "1.00 GiB"
    assert format_size(512 * 2**20) == "512.00 MiB"
    assert format_size(100) == "100 B"
    assert format_size(-2**30).startswith("-")

"""dgcli.units: the one byte formatter and size parser every command uses."""

import pytest

from dgcli.errors import DgError
from dgcli.units import format_bytes, format_bytes_both, parse_bytes


def test_format_bytes():
    assert format_bytes(512) == "512 B" and format_bytes(999) == "999 B"
    assert format_bytes(1000) == "1.0 kB" and format_bytes(2_500_000_000) == "2.5 GB"
    assert format_bytes(2_500_000_000, 2) == "2.50 GB" and format_bytes(3e15) == "3000.0 TB"
    assert format_bytes(2**30, binary=True) == "1.0 GiB" and format_bytes(1023, binary=True) == "1023 B"
    assert format_bytes(1e9, 2, width=8) == "    1.00 GB"


def test_format_bytes_both_keeps_one_prefix():
    assert format_bytes_both(18e9) == "18.00 GB 16.76 GiB"
    assert format_bytes_both(999_999_999) == "1000.00 MB 953.67 MiB"  # the decimal scale picks the prefix
    assert format_bytes_both(12) == "0.01 kB 0.01 KiB"


def test_parse_bytes():
    assert parse_bytes("18GB") == parse_bytes("18g") == parse_bytes(" 18 gb ") == 18 * 10**9
    assert parse_bytes("24GiB") == parse_bytes("24gi") == 24 * 2**30
    assert parse_bytes("1.5 gb") == 1_500_000_000 and parse_bytes("123") == parse_bytes(123) == 123
    for bad in ("lots", "18ib", "", "1.2GB3", "18 xb"):
        with pytest.raises(DgError, match="cannot read .* as a size"):
            parse_bytes(bad)

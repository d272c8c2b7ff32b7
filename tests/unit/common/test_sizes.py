"""Memory sizes as `--memory-limit` and the cluster file take them."""

from __future__ import annotations

import pytest

from rbee.common.sizes import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512MiB", 512 << 20),
        ("8GiB", 8 << 30),
        ("8 gib", 8 << 30),
        ("1.5GiB", 3 << 29),
        ("1048576", 1 << 20),
        (4096, 4096),
    ],
)
def test_sizes_in_binary_units_or_bytes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("-1GiB", "cannot be negative"),
        (-5, "cannot be negative"),
        ("0", "more than 0 bytes"),
        ("8GB", "unknown unit 'GB'"),
        ("lots", "is not a size"),
        ("", "is not a size"),
        (True, "expected a size"),
    ],
)
def test_bad_sizes_say_what_is_wrong(text: object, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_size(text)


def test_sizes_are_written_back_in_the_largest_exact_unit() -> None:
    assert [format_size(s) for s in (8 << 30, 512 << 20, 1536 << 20, 1000)] == [
        "8GiB",
        "512MiB",
        "1536MiB",
        "1000",
    ]
    assert parse_size(format_size(1536 << 20)) == 1536 << 20

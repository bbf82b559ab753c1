"""How counts read: byte sizes in a unit that fits, "1 round" in the singular."""

import pytest

from pollen.wording import byte_size, counted


@pytest.mark.parametrize("count, text", [
    (0, "0 B"), (85, "85 B"), (999, "999 B"), (1000, "1.00 kB"), (3_880, "3.88 kB"), (44_312, "44.3 kB"),
    (131_000, "131 kB"), (999_400, "999 kB"), (999_600, "1.00 MB"), (1_630_000, "1.63 MB"),
    (16_140_000, "16.1 MB"), (2_500_000_000, "2.50 GB"),
])
def test_byte_counts_print_in_a_unit_that_fits(count, text):
    assert byte_size(count) == text


def test_a_count_of_one_is_singular():
    assert [counted(n, "round") for n in (0, 1, 2)] == ["0 rounds", "1 round", "2 rounds"]

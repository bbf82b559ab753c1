"""The round trip (uplink + downlink) against dense fp32 both ways, as a run reports it."""

from pollen.run_folder import RoundRecord, round_trip_ratio
from pollen.simulations.report import COLUMNS, round_row, traffic_summary


def record(up, down, dense_up, clients=4):
    return RoundRecord(round=1, accuracy=0.5, loss=1.0, precision=0.5, recall=0.5, f1=0.5, train_loss=1.0,
                       clients=clients, rejected=0, failed=0, uplink_bytes=up, downlink_bytes=down,
                       dense_uplink_bytes=dense_up, compression=dense_up / up if up else None,
                       round_seconds=1.0, wall_seconds=1.0)


def test_the_round_trip_counts_both_directions_against_dense_both_ways():
    records = [record(1_000, 9_000, 100_000), record(2_000, 8_000, 100_000)]
    assert round_trip_ratio(records) == 400_000 / 20_000
    assert round_trip_ratio([record(0, 0, 0, clients=0)]) is None  # round 0: nothing sent back
    # the downlink dominates here: the uplink ratio alone would claim 100x and 50x
    assert round_trip_ratio(records[:1]) == 20.0


def test_the_summary_and_each_row_show_both_directions_and_the_round_trip():
    records = [record(0, 0, 0, clients=0), record(1_000, 9_000, 100_000)]
    line = traffic_summary(records)
    assert "uplink 1.00 kB (100x smaller than dense fp32)" in line
    assert "downlink 9.00 kB" in line and "round trip 10.0 kB (20x smaller than dense fp32 both ways)" in line
    row = dict(zip(COLUMNS, round_row(records[1])))
    assert (row["ratio"], row["trip"]) == ("100x", "20x")
    assert dict(zip(COLUMNS, round_row(records[0])))["trip"] == "-"

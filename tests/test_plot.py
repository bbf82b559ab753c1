"""The run's plot: labels a person reads, whole rounds, both directions of traffic, log MB when wide."""

from __future__ import annotations

import matplotlib.pyplot as plt

from pollen.config import load_config
from pollen.run_folder import RoundRecord
from pollen.server.plot import cumulative_mb, log_scale_if_wide, plot_run, run_label


def record(round_, up, down, accuracy):
    return RoundRecord(round=round_, accuracy=accuracy, loss=1.0, precision=0.5, recall=0.5, f1=0.5, train_loss=None,
                       clients=2, rejected=0, failed=0, uplink_bytes=up, downlink_bytes=down,
                       dense_uplink_bytes=up * 10, compression=10.0 if up else None, round_seconds=1.0,
                       wall_seconds=1.0 * round_)


def test_a_run_is_labelled_by_what_it_sends_and_trains():
    assert run_label(load_config(None)) == "top-k 1%, 8-bit; LoRA"
    assert run_label(load_config(None, ["codec.name=identity", "model.trainable=head"])) == "dense fp32; head only"
    assert run_label(load_config(None, ["codec.bits=1", "codec.density=0.001"])) == "top-k 0.1%, signs; LoRA"
    assert run_label(load_config(None, ["downlink.budget=0.1", "downlink.bits=8", "model.lora.train_a=false"])) == \
        "top-k 1%, 8-bit; down 10% budget, 8-bit; LoRA, B only"
    assert run_label(load_config(None, ["downlink.budget=1"])) == "top-k 1%, 8-bit; down no budget; LoRA"
    assert run_label(load_config(None, ["downlink.name=identity"])) == "top-k 1%, 8-bit; down dense fp32; LoRA"
    fitted = ["codec.fit_deadline=true", "codec.density=1", "simulation.devices=simulations/configs/devices-phones.yaml",
              "simulation.deadline_seconds=3"]
    assert run_label(load_config(None, fitted)) == "top-k up to 100% by deadline, 8-bit; LoRA"


def test_traffic_adds_up_round_by_round_with_or_without_the_downlink():
    records = [record(0, 0, 0, 0.1), record(1, 100, 1_000_000, 0.5), record(2, 200, 2_000_000, 0.7)]
    assert cumulative_mb(records, downlink=False) == [0.0, 0.0001, 0.0003]
    assert cumulative_mb(records) == [0.0, 1.0001, 3.0003]


def test_an_axis_goes_log_only_when_the_values_span_more_than_tenfold():
    fig, (wide, narrow) = plt.subplots(1, 2)
    log_scale_if_wide(wide, [0.01, 0.5, 2.0])
    log_scale_if_wide(narrow, [1.0, 5.0])
    assert wide.get_xscale() == "log" and narrow.get_xscale() == "linear"
    plt.close(fig)


def test_the_plot_is_written(tmp_path):
    records = [record(r, 100 * r, 5000 * r, 0.1 * r) for r in range(6)]
    assert plot_run(records, tmp_path / "p.png", "top-k 1%, 8-bit; LoRA").stat().st_size > 10_000

"""``pollen compare`` on a seconds-long config: every output is written and consistent."""

import csv
from pathlib import Path

import pytest
import torch

from pollen.cli import main
from pollen.config import ConfigError, load_config
from pollen.run_folder import RoundRecord
from pollen.simulations.compare import FILES, RunResult, load_compare, summarize

TINY = Path("simulations/configs/tiny.yaml").resolve()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "compare.yaml"
    path.write_text(f"run: {TINY}\n" + text)
    return path


TWO_STRATEGIES = """
set:
  federation.rounds: 2
  federation.num_clients: 4
  federation.clients_per_round: 2
seeds: [0, 1]
target_accuracy: 0.15
variants:
  fedavg: {federation.strategy: fedavg}
  fedadam-dense: {federation.strategy: fedadam, strategy.eta: 0.01, codec.name: identity}
"""


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_compare_writes_table_csv_and_plots(tmp_path, capsys, restore_threads):
    out = tmp_path / "report"
    assert main(["compare", str(write(tmp_path, TWO_STRATEGIES)), "--output", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "fedadam-dense" in printed and "±" in printed and str(out) in printed
    assert "pollen compare: 2 variants x 2 seeds, 2 rounds each" in " ".join(printed.split())
    assert all((out / name).stat().st_size > 0 for name in FILES)
    assert (out / "accuracy_by_round.png").read_bytes()[:4] == b"\x89PNG"
    assert "to target" in (out / "table.txt").read_text()
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert [row["variant"] for row in summary] == ["fedavg", "fedadam-dense"]
    assert all(row["seeds"] == "2" for row in summary)
    dense, sparse = float(summary[1]["total_mb"]), float(summary[0]["total_mb"])
    assert dense > sparse  # identity uplink costs more than top-k
    rounds = list(csv.DictReader((out / "rounds.csv").open()))
    assert len(rounds) == 2 * 2 * 3  # variants x seeds x (round 0 + 2 rounds)
    # Same seed, same partitions and initial arrays: every variant starts from the same accuracy.
    starts = {(r["variant"], r["seed"]): r["accuracy"] for r in rounds if r["round"] == "0"}
    assert starts["fedavg", "0"] == starts["fedadam-dense", "0"]
    assert (out / "runs" / "fedavg" / "seed-1" / "rounds.jsonl").exists()
    assert all(line == line.rstrip() for line in (out / "table.txt").read_text().splitlines())
    check_html(out / "report.html", ["fedavg", "fedadam-dense"])


def check_html(path, variants):
    """The page parses, holds one table row per variant, both plots inline and the configs."""
    import base64
    from html.parser import HTMLParser

    class Page(HTMLParser):
        rows, images, text, sources = 0, [], "", []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "tr":
                Page.rows += 1
            if tag == "img":
                Page.images.append(attrs["src"])
            if tag in ("link", "script") and (attrs.get("href") or attrs.get("src")):
                Page.sources.append(attrs.get("href") or attrs.get("src"))

        def handle_data(self, data):
            Page.text += data

    Page().feed(path.read_text())
    assert Page.rows == 1 + len(variants) and not Page.sources  # a header row; nothing fetched from elsewhere
    assert len(Page.images) == 2 and all(src.startswith("data:image/png;base64,") for src in Page.images)
    assert all(base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG" for src in Page.images)
    assert all(variant in Page.text for variant in variants) and "federation.strategy: fedadam" in Page.text


@pytest.mark.parametrize("text, named", [
    ("variants:\n  a: {federation.strategy: fedsomething}\n", "variants.a: federation.strategy: unknown strategy"),
    ("variants:\n  a: {strategy.etta: 1, federation.strategy: fedadam}\n", "variants.a: strategy.etta"),
    ("variants:\n  a: {federation.roundz: 1}\n", "variants.a.federation.roundz: unknown key"),
    ("seeds: [0, 0]\nvariants:\n  a: {}\n", "seeds"),
    ("target_accuracy: 2\nvariants:\n  a: {}\n", "target_accuracy"),
    ("variantz: {}\n", "variantz: unknown key"),
    ("seeds: [0]\n", "variants"),
])
def test_bad_compare_configs_are_rejected_and_named(tmp_path, text, named):
    with pytest.raises(ConfigError, match=named):
        load_compare(write(tmp_path, text))


def test_the_default_compare_config_is_valid():
    compare = load_compare("simulations/configs/compare.yaml")
    assert len(compare.variants) >= 4 and len(compare.seeds) >= 2
    strategies = {config.federation.strategy for _, config in compare.variants}
    codecs = {config.codec.name for _, config in compare.variants}
    assert len(strategies) >= 3 and codecs == {"topk", "identity"}


def test_cli_reports_a_bad_compare_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(write(tmp_path, "variants:\n  a: {codec.density: 2}\n"))])
    assert exit_info.value.code == 2 and "codec.density" in capsys.readouterr().err


def test_summary_counts_rounds_and_megabytes_to_the_target():
    def run(seed, accuracies):
        records = [RoundRecord(round=i, accuracy=a, loss=1.0, precision=a, recall=a, f1=a, train_loss=None,
                               clients=2, rejected=0, failed=0, uplink_bytes=1_000_000 * (i > 0),
                               downlink_bytes=2_000_000 * (i > 0), dense_uplink_bytes=0, compression=None,
                               round_seconds=1.0, wall_seconds=float(i))
                   for i, a in enumerate(accuracies)]
        return RunResult("v", seed, records, wall_seconds=10.0 + seed)

    config = load_config(TINY)
    summary = summarize("v", config, [run(0, [0.1, 0.5, 0.8, 0.9]), run(1, [0.1, 0.6, 0.7, 0.75]),
                                      run(2, [0.1, 0.2, 0.3, 0.4])], target=0.7)
    assert (summary.reached, summary.seeds) == (2, 3)
    assert summary.rounds_to_target == pytest.approx((2 + 2) / 2)
    assert summary.mb_to_target == pytest.approx(6.0)  # two rounds of 1 MB up + 2 MB down
    assert summary.total_mb == pytest.approx(9.0)
    assert summary.final_accuracy_mean == pytest.approx((0.9 + 0.75 + 0.4) / 3)
    assert summary.wall_seconds == pytest.approx(11.0)

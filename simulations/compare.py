"""``pollen compare``: several strategies and codecs, the same partitions and seeds, one report.

A compare config names a base run config, the variants to compare (each a set of
run-config overrides, e.g. ``federation.strategy: fedadam`` or ``codec.name:
identity``) and the seeds. Every variant runs once per seed; with the same seed,
variants share the data split, the client partitions and the initial arrays, so
differences come from the strategy or codec alone. The report folder holds:

    table.txt               the table printed to the terminal
    summary.csv             one row per variant (mean and std over seeds)
    rounds.csv              one row per variant, seed and round
    accuracy_by_round.png   mean accuracy over seeds (band: ±1 std, as in the table) by round
    accuracy_by_mb.png      the same by cumulative uplink + downlink MB
    report.html             the table, both plots and the configs in one self-contained page
    runs/<variant>/seed-<n> each run's own record, plot and checkpoint
"""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from rich import box  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from pollen.config import (Config, ConfigError, differences, from_dict, load_config, read_mapping,  # noqa: E402
                           run_config_of, to_dict, with_overrides)
from pollen.run_folder import RoundRecord, RunFolder, final_record  # noqa: E402
from pollen.server.plot import codec_label, cumulative_mb, log_scale_if_wide  # noqa: E402
from pollen.simulations.run import simulate  # noqa: E402
from pollen.strategies import check_strategy  # noqa: E402
from pollen.tensorboard_log import require_tensorboard  # noqa: E402
from pollen.wording import byte_size, counted  # noqa: E402

KEYS = ("run", "set", "seeds", "target_accuracy", "output_dir", "variants")
FILES = ("table.txt", "summary.csv", "rounds.csv", "accuracy_by_round.png", "accuracy_by_mb.png", "report.html")


@dataclass(frozen=True)
class CompareConfig:
    base: Config
    variants: tuple[tuple[str, Config], ...]  # label, run config (its seed is replaced per run)
    seeds: tuple[int, ...] = (0, 1, 2)
    target_accuracy: float = 0.8
    output_dir: str = "runs/compare"


@dataclass(frozen=True)
class RunResult:
    variant: str
    seed: int
    records: list[RoundRecord]
    wall_seconds: float

    def cumulative_mb(self) -> list[float]:
        """Uplink + downlink MB on the wire up to and including each round."""
        return cumulative_mb(self.records)

    def round_to_target(self, target: float) -> int | None:
        """The first round whose accuracy reaches ``target`` (None: never)."""
        return next((r.round for r in self.records if r.accuracy >= target), None)


@dataclass(frozen=True)
class VariantSummary:
    variant: str
    strategy: str
    codec: str
    final_accuracy_mean: float
    final_accuracy_std: float
    reached: int  # seeds whose run reached the target accuracy
    seeds: int
    rounds_to_target: float | None  # mean over the seeds that reached it
    mb_to_target: float | None
    total_mb: float
    wall_seconds: float


@dataclass(frozen=True)
class CompareReport:
    folder: Path
    summaries: list[VariantSummary]
    results: list[RunResult]
    table: Table
    files: tuple[str, ...] = FILES


def load_compare(path: str | Path, overrides: Mapping[str, Any] | None = None) -> CompareConfig:
    """Read and check a compare config; every variant's run config and strategy are checked.

    ``overrides``: dotted run-config keys set in the base and every variant after the
    file's own (``pollen compare --tensorboard`` sets ``tensorboard: true``).
    """
    path = Path(path)
    values = read_mapping(path, "compare config")
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (known: {', '.join(KEYS)})")
    base = with_changes(base_run(path, values), overrides)
    defaults = CompareConfig(base, ())
    seeds = values.get("seeds", list(defaults.seeds))
    if not (isinstance(seeds, list) and seeds and all(type(s) is int for s in seeds)) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: expected a list of distinct integers, got {seeds!r}")
    target = values.get("target_accuracy", defaults.target_accuracy)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ConfigError(f"target_accuracy: must be in (0, 1], got {target!r}")
    variants = values.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ConfigError("variants: expected a mapping of names to run-config overrides")
    built = []
    for label, changes in variants.items():
        config = with_changes(overridden(base, changes or {}, f"variants.{label}"), overrides)
        try:
            check_strategy(config)
        except ConfigError as error:
            raise ConfigError(f"variants.{label}: {error}") from None
        require_tensorboard(config)
        built.append((str(label), config))
    return CompareConfig(base, tuple(built), tuple(seeds), float(target),
                         str(values.get("output_dir", defaults.output_dir)))


def base_run(path: Path, values: Mapping[str, Any]) -> Config:
    """The run config a compare or tune config at ``path`` builds on: its ``run`` file (relative
    to ``path``; none: the built-in defaults) with its ``set`` overrides."""
    base = load_config(path.parent / values["run"] if values.get("run") else None)
    return overridden(base, values.get("set") or {}, "set")


def with_changes(config: Config, overrides: Mapping[str, Any] | None) -> Config:
    """``config`` with the caller's ``overrides`` (none: as it is)."""
    return overridden(config, overrides, "overrides") if overrides else config


def overridden(config: Config, values: Mapping[str, Any], where: str) -> Config:
    """``config`` with dotted ``key: value`` overrides, checked as ``--set`` checks them."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of run-config keys, got {values!r}")
    try:
        return from_dict(with_overrides(to_dict(config), values))
    except ConfigError as error:
        raise ConfigError(f"{where}.{error}") from None


def run_compare(compare: CompareConfig, folder: Path | None = None,
                on_run: Callable[[str], None] | None = None) -> CompareReport:
    """Run every variant with every seed, then write the report into ``folder``."""
    folder = folder or Path(compare.output_dir) / datetime.now().strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for label, variant in compare.variants:
        for seed in compare.seeds:
            config = dataclasses.replace(variant, seed=seed)
            started = time.perf_counter()
            _, records = simulate(config, RunFolder(folder / "runs" / label / f"seed-{seed}"))
            result = RunResult(label, seed, records, time.perf_counter() - started)
            results.append(result)
            if on_run:
                on_run(f"{label} seed {seed}: final accuracy {final_record(records).accuracy:.4f}, "
                       f"{byte_size(result.cumulative_mb()[-1] * 1e6)}, {result.wall_seconds:.1f} s")
    summaries = [summarize(label, config, [r for r in results if r.variant == label], compare.target_accuracy)
                 for label, config in compare.variants]
    table = summary_table(summaries, compare.target_accuracy)
    write_report(folder, compare, summaries, results, table)
    return CompareReport(folder, summaries, results, table)


def summarize(label: str, config: Config, results: list[RunResult], target: float) -> VariantSummary:
    finals = np.array([final_record(r.records).accuracy for r in results])
    reached = [(r.round_to_target(target), r) for r in results]
    reached = [(rnd, r) for rnd, r in reached if rnd is not None]
    return VariantSummary(
        variant=label, strategy=config.federation.strategy,
        codec=codec_label(config.codec),
        final_accuracy_mean=float(finals.mean()),
        final_accuracy_std=float(finals.std(ddof=1)) if finals.size > 1 else 0.0,
        reached=len(reached), seeds=len(results),
        rounds_to_target=float(np.mean([rnd for rnd, _ in reached])) if reached else None,
        mb_to_target=float(np.mean([r.cumulative_mb()[rnd] for rnd, r in reached])) if reached else None,
        total_mb=float(np.mean([r.cumulative_mb()[-1] for r in results])),
        wall_seconds=float(np.mean([r.wall_seconds for r in results])),
    )


def summary_table(summaries: list[VariantSummary], target: float) -> Table:
    table = Table(title=f"pollen compare: mean ± std over seeds; target accuracy {target:g}; traffic = uplink + "
                        "downlink on the wire; (k/n): only k of n seeds reached the target, the mean is theirs",
                  title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("variant", no_wrap=True)
    for column in ("final acc", "rounds\nto target", "traffic\nto target", "total\ntraffic", "wall\ns"):
        table.add_column(column, justify="right", no_wrap=True)
    for s in summaries:
        partial = f" ({s.reached}/{s.seeds})" if s.reached < s.seeds else ""
        table.add_row(
            s.variant,
            f"{s.final_accuracy_mean:.3f}±{s.final_accuracy_std:.3f}",
            "never" if s.rounds_to_target is None else f"{s.rounds_to_target:.1f}{partial}",
            "-" if s.mb_to_target is None else byte_size(s.mb_to_target * 1e6),
            byte_size(s.total_mb * 1e6), f"{s.wall_seconds:.1f}",
        )
    return table


def write_report(folder: Path, compare: CompareConfig, summaries: list[VariantSummary],
                 results: list[RunResult], table: Table) -> None:
    text = io.StringIO()
    Console(file=text, width=140, color_system=None).print(table)
    (folder / "table.txt").write_text("".join(line.rstrip() + "\n" for line in text.getvalue().splitlines()))
    with (folder / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in dataclasses.fields(VariantSummary)])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(s) for s in summaries)
    with (folder / "rounds.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "seed", "round", "accuracy", "loss", "f1", "uplink_bytes",
                         "downlink_bytes", "cumulative_mb", "wall_seconds"])
        for result in results:
            for record, mb in zip(result.records, result.cumulative_mb()):
                writer.writerow([result.variant, result.seed, record.round, record.accuracy, record.loss,
                                 record.f1, record.uplink_bytes, record.downlink_bytes, mb,
                                 record.wall_seconds])
    plot_curves(folder / "accuracy_by_round.png", results, [label for label, _ in compare.variants],
                by_mb=False, target=compare.target_accuracy)
    plot_curves(folder / "accuracy_by_mb.png", results, [label for label, _ in compare.variants],
                by_mb=True, target=compare.target_accuracy)
    write_html(folder, compare, summaries)


def write_html(folder: Path, compare: CompareConfig, summaries: list[VariantSummary]) -> Path:
    """report.html: the table, the two plots inlined and the configs that produced them; one file, offline."""
    import base64
    import html

    columns = ("variant", "strategy", "codec", "final accuracy (mean ± std)", "seeds at target",
               "rounds to target", "traffic to target", "total traffic", "wall s")
    rows = []
    for s in summaries:
        cells = (s.variant, s.strategy, s.codec, f"{s.final_accuracy_mean:.3f} ± {s.final_accuracy_std:.3f}",
                 f"{s.reached}/{s.seeds}", "never" if s.rounds_to_target is None else f"{s.rounds_to_target:.1f}",
                 "-" if s.mb_to_target is None else byte_size(s.mb_to_target * 1e6), byte_size(s.total_mb * 1e6),
                 f"{s.wall_seconds:.1f}")
        rows.append("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>")
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode((folder / name).read_bytes()).decode()}"><figcaption>{name}</figcaption></figure>'
        for name in ("accuracy_by_round.png", "accuracy_by_mb.png"))
    configs = yaml.safe_dump({"base": to_dict(compare.base), "seeds": list(compare.seeds),
                              "target_accuracy": compare.target_accuracy,
                              "variants": {label: {key: run_config_of(config).get(key)
                                                   for key in differences(compare.base, config)}
                                           for label, config in compare.variants}}, sort_keys=False)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pollen compare</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}td:first-child,th:first-child{{text-align:left}}
img{{max-width:100%}}pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head><body>
<h1>pollen compare</h1>
<p>Mean ± standard deviation over seeds {", ".join(map(str, compare.seeds))}; target accuracy
{compare.target_accuracy:g}. Rounds and traffic to target are means over the seeds that reached it. Traffic counts
uplink and downlink on the wire.</p>
<table><thead><tr>{"".join(f"<th>{html.escape(c)}</th>" for c in columns)}</tr></thead>
<tbody>{"".join(rows)}</tbody></table>
{images}
<h2>Configuration</h2><pre>{html.escape(configs)}</pre>
</body></html>
"""
    path = folder / "report.html"
    path.write_text(page)
    return path


def plot_curves(path: Path, results: list[RunResult], labels: list[str], by_mb: bool, target: float) -> None:
    """Mean accuracy over seeds per variant, with a band of one standard deviation either side (the
    table's ±), by round or by cumulative MB (log scale when the variants span more than tenfold)."""
    fig, axis = plt.subplots(figsize=(9, 5))
    spans = []
    for label in labels:
        runs = [r for r in results if r.variant == label]
        accuracy = np.array([[rec.accuracy for rec in r.records] for r in runs])
        x = np.mean([r.cumulative_mb() for r in runs], axis=0) if by_mb else np.array([rec.round for rec in runs[0].records])
        if by_mb:  # round 0 has sent nothing yet: no place on a log axis
            x, accuracy = x[1:], accuracy[:, 1:]
            spans.extend(x.tolist())
        mean = accuracy.mean(axis=0)
        std = accuracy.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros_like(mean)
        line, = axis.plot(x, mean, marker="o", markersize=3, label=label)
        axis.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    axis.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    seeds = len({r.seed for r in results})
    axis.set(xlabel="cumulative uplink + downlink MB on the wire" if by_mb else "round",
             ylabel="central test accuracy",
             title=f"{'Accuracy by traffic' if by_mb else 'Accuracy by round'}: mean of {counted(seeds, 'seed')}, "
                   "band ±1 std")
    if by_mb:
        log_scale_if_wide(axis, spans)
    else:
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside the curves
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

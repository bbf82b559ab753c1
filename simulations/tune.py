"""``pollen tune``: search run-config keys with Optuna, pruning weak federations round by round.

A tune config names a base run config, a search space over any run-config keys, an
objective and a budget::

    run: tiny.yaml                  # the base run config, relative to this file (default: the built-in)
    set: {federation.rounds: 8}     # overrides of the base, for every trial
    space:                          # each key: low/high (ints when both are ints), log, or choices
      train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
      train.local_epochs: {low: 1, high: 3}
      federation.strategy: {choices: [sparse-fedavg, fedadam]}
    objective: final                # central accuracy of the last round, or `best` round
    max_total_mb: 2.0               # optional: uplink + downlink MB over the run must stay below
    trials: 20                      # trials to finish (complete, pruned or failed)
    sampler: tpe                    # tpe (Bayesian), random or grid (choices only)
    pruner: median                  # median, halving or none
    warmup_rounds: 2                # no trial is pruned before this round
    seed: 0                         # the sampler's; every trial runs the base config's seed

Every trial is one ``simulate`` run; it reports its central accuracy to Optuna after
each round, and the pruner stops a federation that trails the others at the same round.
The study lives in ``study.db`` (SQLite) in the report folder, so an interrupted tune
carries on when run again on the same folder; a trial cut short is tried again. The
folder holds:

    study.db                 the Optuna study
    trials.csv, table.txt    one row per trial: state, objective, MB, rounds, parameters
    best.yaml                the best trial's whole run config: ``pollen simulate best.yaml``
    objective_by_trial.png   each trial's objective (pruned: where it stopped), best so far
    accuracy_by_mb.png       accuracy against total MB for every trial, the Pareto front marked
    runs/trial-<n>/          each trial's run folder
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from rich import box  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from pollen.config import Config, ConfigError, read_mapping, save_config  # noqa: E402
from pollen.run_folder import RoundRecord, RunFolder, final_record  # noqa: E402
from pollen.server.plot import log_scale_if_wide  # noqa: E402
from pollen.simulations.compare import base_run, overridden  # noqa: E402
from pollen.simulations.run import simulate  # noqa: E402
from pollen.simulations.report import print_whole  # noqa: E402
from pollen.strategies import check_strategy  # noqa: E402

MB = 1e6
KEYS = ("run", "set", "space", "objective", "max_total_mb", "trials", "sampler", "pruner", "warmup_rounds",
        "seed", "output_dir")
OBJECTIVES, SAMPLERS, PRUNERS = ("final", "best"), ("tpe", "random", "grid"), ("median", "halving", "none")
FILES = ("study.db", "trials.csv", "table.txt", "best.yaml", "objective_by_trial.png", "accuracy_by_mb.png")
ERROR = "error"  # a failed trial's user attribute: its config error. Failed without one: cut short, tried again


@dataclass(frozen=True)
class Param:
    """One searched key: a range (``low``..``high``, ints when both are ints; ``log`` scale) or ``choices``."""

    key: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple | None = None

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.key, self.low, self.high, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def values(self) -> tuple:
        """What the key can take, as the run config is checked against: both ends, or every choice."""
        return self.choices if self.choices is not None else (self.low, self.high)


@dataclass(frozen=True)
class TuneConfig:
    base: Config
    space: tuple[Param, ...]
    objective: str = "final"
    max_total_mb: float | None = None
    trials: int = 20
    sampler: str = "tpe"
    pruner: str = "median"
    warmup_rounds: int = 2
    seed: int = 0
    output_dir: str = "runs/tune"


def load_tune(path: str | Path) -> TuneConfig:
    """Read and check a tune config; every value a key may take is checked against the run config."""
    path = Path(path)
    values = read_mapping(path, "tune config")
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key of a tune config (known: {', '.join(KEYS)})")
    base = base_run(path, values)
    space = values.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError("space: expected a mapping of run-config keys to {low, high[, log]} or {choices}")
    params = tuple(_param(str(key), spec) for key, spec in space.items())
    for param in params:
        for value in param.values():
            check_strategy(overridden(base, {param.key: value}, "space"))
    defaults = TuneConfig(base, params)
    tune = TuneConfig(
        base, params,
        objective=_one_of("objective", values.get("objective", defaults.objective), OBJECTIVES),
        max_total_mb=_number("max_total_mb", values["max_total_mb"]) if values.get("max_total_mb") is not None
        else None,
        trials=_count("trials", values.get("trials", defaults.trials), 1),
        sampler=_one_of("sampler", values.get("sampler", defaults.sampler), SAMPLERS),
        pruner=_one_of("pruner", values.get("pruner", defaults.pruner), PRUNERS),
        warmup_rounds=_count("warmup_rounds", values.get("warmup_rounds", defaults.warmup_rounds), 0),
        seed=_count("seed", values.get("seed", defaults.seed), 0),
        output_dir=str(values.get("output_dir", defaults.output_dir)),
    )
    if tune.sampler == "grid" and any(p.choices is None for p in params):
        raise ConfigError("sampler: grid searches choices only; give every key of space its choices")
    return tune


def _param(key: str, spec: Any) -> Param:
    where = f"space.{key}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected {{low, high[, log]}} or {{choices: [...]}}, got {spec!r}")
    unknown = sorted(set(spec) - {"low", "high", "log", "choices"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown (known: low, high, log, choices)")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices or set(spec) != {"choices"}:
            raise ConfigError(f"{where}: choices must be a non-empty list, alone")
        return Param(key, choices=tuple(choices))
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: give low and high, or choices")
    low, high = _number(f"{where}.low", spec["low"]), _number(f"{where}.high", spec["high"])
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log: must be true or false, got {log!r}")
    if not low < high or (log and low <= 0):
        raise ConfigError(f"{where}: needs low < high{' and low > 0 on a log scale' if log else ''}, "
                          f"got {low}..{high}")
    return Param(key, low, high, log)


def _number(where: str, value: Any) -> float | int:
    """A finite number; YAML reads ``1e-4`` (no dot) as a string, so numeric strings are numbers too."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return value


def _count(where: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{where}: expected an integer of at least {least}, got {value!r}")
    return value


def _one_of(where: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{where}: must be one of {', '.join(allowed)}, got {value!r}")
    return value


@dataclass(frozen=True)
class TuneReport:
    folder: Path
    study: optuna.Study
    best: optuna.trial.FrozenTrial | None  # the best complete trial within the MB limit; None: none yet
    table: Table
    files: tuple[str, ...] = FILES


def run_tune(tune: TuneConfig, folder: Path, on_trial: Callable[[str], None] | None = None) -> TuneReport:
    """Run trials until ``tune.trials`` have finished in the folder's study, then write the report."""
    study = open_study(tune, folder)
    left = tune.trials - len(finished(study))

    def reported(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if on_trial:
            on_trial(trial_line(trial, tune))

    if left > 0:
        try:
            study.optimize(lambda trial: run_trial(tune, folder, trial), n_trials=left, callbacks=[reported],
                           catch=(ConfigError,))
        except KeyboardInterrupt:  # Optuna has failed the trial it was running: queue it for the next time
            last = study.trials[-1]
            if last.state == TrialState.FAIL and ERROR not in last.user_attrs:
                study.enqueue_trial(last.params)
            write_report(tune, folder, study)
            raise
    return write_report(tune, folder, study)


def open_study(tune: TuneConfig, folder: Path) -> optuna.Study:
    """The folder's study, created or carried on: a trial that was cut short is queued again."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder.mkdir(parents=True, exist_ok=True)
    sampler = {"tpe": lambda: optuna.samplers.TPESampler(seed=tune.seed),
               "random": lambda: optuna.samplers.RandomSampler(seed=tune.seed),
               "grid": lambda: optuna.samplers.GridSampler({p.key: list(p.choices) for p in tune.space},
                                                           seed=tune.seed)}[tune.sampler]()
    pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=tune.warmup_rounds),
              "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, tune.warmup_rounds)),
              "none": optuna.pruners.NopPruner}[tune.pruner]()
    study = optuna.create_study(storage=f"sqlite:///{folder / 'study.db'}", study_name="pollen-tune",
                                direction="maximize", sampler=sampler, pruner=pruner, load_if_exists=True)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # the process was killed
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params)
    return study


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial counts against the budget and shows in the report: not one cut short."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and ERROR in trial.user_attrs)


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials that count against the budget: complete, pruned or failed with a config error."""
    return [t for t in study.get_trials(deepcopy=False) if counted(t)]


def run_trial(tune: TuneConfig, folder: Path, trial: optuna.Trial) -> float:
    """One federation with the trial's values; pruned when it trails the others at the same round."""
    values = {param.key: param.suggest(trial) for param in tune.space}
    try:
        config = overridden(tune.base, values, f"trial {trial.number}")
        check_strategy(config)
    except ConfigError as error:  # a combination of values the run config refuses
        trial.set_user_attr(ERROR, str(error))
        raise
    started = time.perf_counter()
    accuracies: list[float] = []
    total_bytes = 0

    def on_round(record: RoundRecord) -> None:
        nonlocal total_bytes
        accuracies.append(record.accuracy)
        total_bytes += record.uplink_bytes + record.downlink_bytes
        for name, value in (("rounds", record.round), ("total_mb", total_bytes / MB),
                            ("final_accuracy", record.accuracy), ("best_accuracy", max(accuracies)),
                            ("seconds", time.perf_counter() - started)):
            trial.set_user_attr(name, value)
        trial.report(record.accuracy if tune.objective == "final" else max(accuracies), record.round)
        if record.round < config.federation.rounds and trial.should_prune():
            limit_bytes(tune, trial, total_bytes)
            raise optuna.TrialPruned(f"round {record.round}: accuracy {record.accuracy:.4f}")

    _, records = simulate(config, RunFolder(folder / "runs" / f"trial-{trial.number}"), on_round)
    limit_bytes(tune, trial, total_bytes)
    final = final_record(records).accuracy  # early stopping ends the run with its kept round's model
    trial.set_user_attr("final_accuracy", final)
    return final if tune.objective == "final" else max(accuracies)


def limit_bytes(tune: TuneConfig, trial: optuna.Trial, total_bytes: int) -> None:
    """Tell the sampler how far the trial is over ``max_total_mb`` (feasible at 0 or less)."""
    if tune.max_total_mb is not None:
        trial.set_constraint("total_mb", total_bytes / MB - tune.max_total_mb)


def best_trial(tune: TuneConfig, study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The complete trial with the highest objective among those within ``max_total_mb``."""
    feasible = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if tune.max_total_mb is None or t.user_attrs.get("total_mb", math.inf) <= tune.max_total_mb]
    return max(feasible, key=lambda t: t.value, default=None)


def trial_line(trial: optuna.trial.FrozenTrial, tune: TuneConfig) -> str:
    """One line per finished trial, for the console."""
    values = ", ".join(f"{key.rsplit('.', 1)[-1]} {_shown(value)}" for key, value in trial.params.items())
    attrs = trial.user_attrs
    state = trial.state.name.lower()
    if trial.state == TrialState.FAIL:
        return f"trial {trial.number} failed ({values}): {attrs.get(ERROR, 'cut short')}"
    return (f"trial {trial.number} {state} at round {attrs.get('rounds', 0)}: "
            f"{tune.objective} accuracy {_objective(trial, tune):.4f}, {attrs.get('total_mb', 0.0):.2f} MB ({values})")


def _objective(trial: optuna.trial.FrozenTrial, tune: TuneConfig) -> float:
    """A complete trial's value; a pruned one's where it stopped."""
    if trial.value is not None:
        return trial.value
    return trial.user_attrs.get("final_accuracy" if tune.objective == "final" else "best_accuracy", math.nan)


def _shown(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_report(tune: TuneConfig, folder: Path, study: optuna.Study) -> TuneReport:
    """trials.csv, table.txt, best.yaml and the two plots, from what the study holds now."""
    trials = finished(study)
    keys = [param.key for param in tune.space]
    with (folder / "trials.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", "state", "objective", "final_accuracy", "best_accuracy", "total_mb", "rounds",
                         "seconds", *keys])
        for t in trials:
            a = t.user_attrs
            writer.writerow([t.number, t.state.name.lower(), _objective(t, tune), a.get("final_accuracy"),
                             a.get("best_accuracy"), a.get("total_mb"), a.get("rounds"), a.get("seconds"),
                             *(t.params.get(key) for key in keys)])
    best = best_trial(tune, study)
    table = trials_table(tune, trials, best)
    buffer = io.StringIO()
    print_whole(Console(file=buffer, no_color=True), table)
    (folder / "table.txt").write_text(buffer.getvalue())
    if best is not None:
        save_config(overridden(tune.base, best.params, "best"), folder / "best.yaml")
    plot_objective(tune, trials, folder / "objective_by_trial.png")
    plot_accuracy_by_mb(tune, trials, folder / "accuracy_by_mb.png")
    return TuneReport(folder, study, best, table)


def trials_table(tune: TuneConfig, trials: list[optuna.trial.FrozenTrial],
                 best: optuna.trial.FrozenTrial | None) -> Table:
    limit = f"; MB limit {tune.max_total_mb:g}" if tune.max_total_mb is not None else ""
    table = Table(title=f"pollen tune: {tune.objective} central accuracy{limit}; * best",
                  title_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True, show_edge=False)
    for column in ("trial", "state", "acc", "MB", "rounds"):
        table.add_column(column, justify="left" if column == "state" else "right", no_wrap=True)
    for param in tune.space:  # "local\nepochs": a header a word per line keeps the table within 80 columns
        table.add_column(param.key.rsplit(".", 1)[-1].replace("_", "\n"), justify="right", no_wrap=True)
    for t in trials:
        a = t.user_attrs
        table.add_row(f"{t.number}{'*' if best is not None and t.number == best.number else ''}",
                      t.state.name.lower(), f"{_objective(t, tune):.4f}", f"{a.get('total_mb', math.nan):.2f}",
                      str(a.get("rounds", "-")), *(_shown(t.params.get(p.key, "-")) for p in tune.space))
    return table


MARKERS = {TrialState.COMPLETE: ("o", "complete"), TrialState.PRUNED: ("x", "pruned (where it stopped)")}


def plot_objective(tune: TuneConfig, trials: list[optuna.trial.FrozenTrial], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for state, (marker, label) in MARKERS.items():
        shown = [t for t in trials if t.state == state]
        if shown:
            ax.scatter([t.number for t in shown], [_objective(t, tune) for t in shown], marker=marker, label=label)
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.number)
    if complete:
        best, so_far = -math.inf, []
        for t in complete:
            best = max(best, t.value)
            so_far.append(best)
        ax.step([t.number for t in complete], so_far, where="post", color="black", linewidth=1, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{tune.objective} central accuracy")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    _legend_below(fig, ax)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _legend_below(fig: plt.Figure, ax: plt.Axes) -> None:
    """The legend under the axes, where it covers no trial."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=4, fontsize="small", frameon=False)
    fig.tight_layout()


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (MB, accuracy) points no other point beats on both: fewer MB and higher accuracy."""
    front, best = [], -math.inf
    for mb, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if accuracy > best:
            front.append((mb, accuracy))
            best = accuracy
    return front


def plot_accuracy_by_mb(tune: TuneConfig, trials: list[optuna.trial.FrozenTrial], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for state, (marker, label) in MARKERS.items():
        shown = [t for t in trials if t.state == state and "total_mb" in t.user_attrs]
        if shown:
            ax.scatter([t.user_attrs["total_mb"] for t in shown], [_objective(t, tune) for t in shown],
                       marker=marker, label=label, alpha=0.8)
    front = pareto_front([(t.user_attrs["total_mb"], t.value) for t in trials
                          if t.state == TrialState.COMPLETE and "total_mb" in t.user_attrs])
    if front:
        ax.step(*zip(*front), where="post", color="black", linewidth=1, label="Pareto front (complete trials)")
    if tune.max_total_mb is not None:
        ax.axvline(tune.max_total_mb, color="grey", linestyle="--", linewidth=1, label="MB limit")
    log_scale_if_wide(ax, [t.user_attrs.get("total_mb", 0.0) for t in trials])
    ax.set_xlabel("MB on the wire over the run (uplink + downlink)")
    ax.set_ylabel(f"{tune.objective} central accuracy")
    ax.grid(alpha=0.3)
    _legend_below(fig, ax)
    fig.savefig(path, dpi=120)
    plt.close(fig)

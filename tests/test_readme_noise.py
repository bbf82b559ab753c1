"""The README's commands say only Pollen's own lines: no library warnings, tracebacks or colour codes.

Each command runs as a user runs it, a subprocess without ``-v`` in a scratch folder, on the
tiny config with few rounds: simulate (also with faulty devices, a factory model on an image
folder, a mistake in a key, a resumed run), compare, tune, certs, export in every format and
pruned, distill. Left out (each takes far longer, or a server): the default and text runs,
``flwr run .``, ``pollen server`` and ``pollen client``. Two commands run at a time; those that
read a run wait for it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import pytest

from pollen.server.export import KNOWN_LOG_LINES, known_notices_silenced

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "simulations" / "configs" / "tiny.yaml"
FAULTY = ROOT / "simulations" / "configs" / "devices-faulty.yaml"
FEW = ["--threads", "1", "--set", "federation.rounds=1"]
COMMAND_TIMEOUT = 600.0  # seconds: only a bound against a hung process, far above any of these

# Lines a library prints and Pollen does not: Python's warnings, tracebacks, log records
# (Python's and absl/glog's "W1201 12:00:00.000 ..." form), and terminal colour codes.
NOISE = re.compile(r"Warning\b|Traceback|^\s*(WARNING|ERROR|CRITICAL)\b|^[WEF]\d{4} \d\d:\d\d|\x1b\[")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Command:
    name: str
    argv: list[str]
    code: int = 0
    own_lines: tuple[str, ...] = ()  # what Pollen itself says there besides its normal output (regex)
    after: str | None = None  # the command whose output it reads


COMPARE = f"""run: {TINY}
set: {{federation.rounds: 1}}
seeds: [0]
target_accuracy: 0.2
variants:
  fedavg-dense: {{federation.strategy: fedavg, codec.name: identity}}
  sparse-fedavg-topk: {{federation.strategy: sparse-fedavg}}
"""
TUNE = f"""run: {TINY}
set: {{federation.rounds: 1}}
space:
  train.lr: {{low: 1.0e-3, high: 5.0e-2, log: true}}
trials: 2
warmup_rounds: 1
"""

COMMANDS = [
    Command("simulate", ["simulate", str(TINY), "--threads", "1", "--set", "federation.rounds=2", "--output", "run"]),
    Command("config mistake", ["simulate", "--set", "federation.roundz=3"], code=2,
            own_lines=(r"^pollen: config error: federation\.roundz: unknown key",)),
    Command("faulty devices", ["simulate", str(TINY), *FEW, "--set", f"simulation.devices={FAULTY}",
                               "--output", "faulty"]),
    Command("factory model", ["simulate", *FEW, "--set", "model.name=my_nets:small_cnn", "--set",
                              "model.image_size=32", "--set", "data.dataset=photos", "--set", "data.partition=iid",
                              "--set", "federation.num_clients=4", "--set", "federation.clients_per_round=2",
                              "--set", "data.test_size=12", "--output", "factory"]),
    Command("compare", ["compare", "compare.yaml", "--threads", "1", "--output", "compared"]),
    Command("tune", ["tune", "tune.yaml", "--threads", "1", "--output", "tuned"]),
    Command("certs", ["certs", "certs", "--server-name", "localhost", "--devices", "2"]),
    Command("certs add", ["certs", "certs", "--add-devices", "1"], after="certs"),
    Command("certs revoke", ["certs", "certs", "--revoke", "device-1"], after="certs add"),
    Command("export onnx", ["export", "run", "--format", "onnx"], after="simulate"),
    Command("export torch", ["export", "run", "--format", "torch"], after="simulate"),
    Command("export peft", ["export", "run", "--format", "peft"], after="simulate"),
    Command("export pruned", ["export", "run", "--prune", "0.3", "--finetune-rounds", "1"], after="simulate"),
    Command("distill", ["distill", "run", "--epochs", "1"], after="simulate"),
    # A finished run has no client state left: Pollen says its clients start afresh.
    Command("resume", ["simulate", "--resume", "resumed", "--threads", "1", "--set", "federation.rounds=3"],
            own_lines=(r"no client state \(the run had finished\)",), after="simulate"),
]


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str


def environment(folder: Path) -> dict[str, str]:
    """A user's plain environment: Flower offline, no forced colours or warning filters, my_nets importable."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("PYTHONWARNINGS", "FORCE_COLOR", "CLICOLOR_FORCE", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONPATH=str(folder))
    return env


def scratch_folder(folder: Path) -> None:
    """The files the commands read: configs, the README's my_nets.py and a folder of class folders of images."""
    import numpy as np
    from PIL import Image

    (folder / "compare.yaml").write_text(COMPARE)
    (folder / "tune.yaml").write_text(TUNE)
    readme = (ROOT / "README.md").read_text()
    (folder / "my_nets.py").write_text(re.search(r"```python\n(# my_nets\.py\n.*?)```", readme, re.S).group(1))
    rng = np.random.default_rng(0)
    for label in range(3):
        (folder / "photos" / str(label)).mkdir(parents=True)
        for index in range(20):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
                folder / "photos" / str(label) / f"{index}.png")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    folder = tmp_path_factory.mktemp("readme")
    scratch_folder(folder)
    env = environment(folder)

    def run(command: Command) -> Outcome:
        if command.name == "resume":  # on a copy, without what the exports write meanwhile: they read the run
            shutil.copytree(folder / "run", folder / "resumed",
                            ignore=shutil.ignore_patterns("model.*", "peft-adapter", "student"))
        done = subprocess.run([sys.executable, "-m", "pollen.cli", *command.argv], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)
        return Outcome(done.returncode, done.stdout, done.stderr)

    results: dict[str, Outcome] = {}
    pending, running = list(COMMANDS), {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        while pending or running:
            for command in [c for c in pending if c.after is None or c.after in results]:
                running[pool.submit(run, command)] = command.name
                pending.remove(command)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            results.update({running.pop(future): future.result() for future in finished})
    return results


def noise(text: str, own_lines: tuple[str, ...]) -> list[str]:
    """The lines of ``text`` that look like a library talking, Pollen's own expected lines excepted."""
    return [line for line in logical_lines(text) if NOISE.search(line) and not expected(line, own_lines)]


def expected(line: str, own_lines: tuple[str, ...]) -> bool:
    """One of Pollen's own lines for this command (colour codes aside)."""
    return any(re.search(own, ANSI.sub("", line)) for own in own_lines)


def logical_lines(text: str) -> list[str]:
    """The non-blank lines of ``text``, a wrapped line's indented continuations joined back on."""
    lines: list[str] = []
    for line in text.splitlines():
        if line[:1].isspace() and line.strip() and lines:
            lines[-1] += " " + line.strip()
        elif line.strip():
            lines.append(line)
    return lines


@pytest.mark.parametrize("command", COMMANDS, ids=[c.name for c in COMMANDS])
def test_the_command_says_only_pollens_own_lines(command, outcomes):
    outcome = outcomes[command.name]
    assert outcome.code == command.code, f"exit {outcome.code}:\n{outcome.stdout}\n{outcome.stderr}"
    assert "\x1b[" not in outcome.stdout  # no colour codes into a pipe or a file
    assert noise(outcome.stdout, command.own_lines) == []
    assert [line for line in logical_lines(outcome.stderr) if not expected(line, command.own_lines)] == []
    if command.code == 0:
        assert outcome.stdout.strip()  # it did say what it did


def test_the_noise_check_sees_what_libraries_print():
    own = ("no client state",)
    assert noise("W1201 14:40:17.077000 6717 site-packages/torch/onnx/x.py:107] torchvision is not installed", ())
    assert noise("/x/copyreg.py:105: FutureWarning: `isinstance(treespec, LeafSpec)` is deprecated", ())
    assert noise("Traceback (most recent call last):", ()) and noise("\x1b[1mround\x1b[0m 1", ())
    assert noise("WARNING: something a library said", own)
    assert not noise("WARNING: run: no client state (the run had finished): clients start afresh", own)
    assert not noise("round 1  acc 0.0833  loss 2.7004  F1 0.0154", ())
    assert logical_lines("WARNING: a, b,\n  c\n\nTraceback (most recent call last):\n  File x\n") == [
        "WARNING: a, b, c", "Traceback (most recent call last): File x"]


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_export_silences_only_the_known_notices():
    (logger_name, start), = KNOWN_LOG_LINES.items()
    logger, kept = logging.getLogger(logger_name), Kept()
    logger.addHandler(kept)  # torch's loggers do not propagate to pytest's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with known_notices_silenced():
            logger.warning(start + "torchvision::nms")
            logger.warning("another message from the same logger")
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
            warnings.warn("some other deprecation", FutureWarning)
        logger.warning(start + "torchvision::roi_pool")  # after the export: said again
    logger.removeHandler(kept)
    assert kept.lines == ["another message from the same logger", start + "torchvision::roi_pool"]
    assert [str(w.message) for w in caught] == ["some other deprecation"]
    assert not logger.filters

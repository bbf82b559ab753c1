"""Flower's processes, started and stopped from here: SuperLinks, SuperNodes, ``flwr run``.

Used alike by the deployment (``pollen.server.deploy``, ``pollen client``) and by the
Ray backend (``pollen.simulations.ray_backend``):

* ``ProcessTree.start`` runs a command in its own session with a log file;
  ``stop`` ends it and everything it spawned, by PID;
* ``free_port``, ``port_problem``, ``wait_until_ready``: where a SuperLink may listen, and
  when it answers;
* ``write_connection`` (the ``flwr`` CLI's settings under ``FLWR_HOME``) and
  ``write_app`` (a Flower App's ``pyproject.toml``);
* ``offline_env``: the environment that keeps Flower off the network.

A core module: it imports nothing of Pollen's server, client or simulations.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil
import tomli_w

# No telemetry, no update check, and no `uv sync` of an app's dependencies by the
# SuperLink (which would reach for the registry).
OFFLINE = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
CONNECTION = "pollen"  # the SuperLink connection's name in FLWR_HOME/config.toml
SUPERLINK_LOG = "superlink.log"  # in a run folder's logs/, wherever the SuperLink serves
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# A log line that says why a process stopped: a level, or a Python exception's or argparse's "...Error: "
# ("[uvicorn.error]", a logger's name, is not one).
ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL|FATAL)\b|\w*(Error|Exception|error): ")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class FlowerError(RuntimeError):
    """A Flower process or command failed; the message says which, with its log's end."""


def offline_env(flwr_home: Path | None = None) -> dict[str, str]:
    """This process's environment, offline, and with its own ``FLWR_HOME`` if given."""
    env = {**os.environ, **OFFLINE}
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def console_script(name: str) -> str:
    """A console script installed next to this Python, so the right environment runs it."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


class ProcessTree:
    """A command started in its own session, and every process it spawns, stopped by PID.

    Descendants are remembered while they live (``remember_children``), because Ray's
    processes leave the session and get re-parented away from whoever started them.
    """

    def __init__(self, popen: subprocess.Popen, log: Path, name: str | None = None) -> None:
        self.popen = popen
        self.log = log
        self.label = name
        self.known: dict[int, psutil.Process] = {}
        self.remember_children()

    @classmethod
    def start(cls, command: list[str], log: Path, env: Mapping[str, str],
              cwd: Path | None = None, name: str | None = None) -> ProcessTree:
        """``name`` is what messages call it (default: the program's file name)."""
        # A session of its own: Ctrl-C reaches only this process, which then stops the tree;
        # should this process be killed outright, the kernel stops the child (Linux).
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            popen = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=dict(env), cwd=cwd, start_new_session=True,
                                     preexec_fn=_die_with_parent())
        return cls(popen, log, name)

    @property
    def name(self) -> str:
        return self.label or Path(self.popen.args[0]).name

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def remember_children(self) -> None:
        """Note every process now in the tree; call it while they run (each poll)."""
        try:
            root = psutil.Process(self.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in tree:
            self.known.setdefault(process.pid, process)

    def alive(self) -> list[psutil.Process]:
        """The remembered processes still running (is_running also checks the start time,
        so a recycled PID never counts)."""
        alive = []
        for process in self.known.values():
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
            except psutil.NoSuchProcess:
                pass
        return alive

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the tree, SIGKILL whatever outlives ``grace`` seconds, reap the root."""
        self.remember_children()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            self._signal_all(sig)
            # Polled rather than psutil.wait_procs: a re-parented zombie nobody reaps counts as gone.
            deadline = time.monotonic() + grace
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self.alive():
                break
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass

    def _signal_all(self, sig: int) -> None:
        # The session's process group reaches children spawned since the last look.
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for process in self.alive():
            try:
                process.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def why_stopped(self, limit: int = 300) -> str:
        """One line of the log's end that says why the process stopped: the last error, else the last line."""
        lines = [ANSI_ESCAPE.sub("", line).strip() for line in self.tail(50).splitlines()]
        lines = [line for line in lines if line]
        errors = [line for line in lines if ERROR_LINE.search(line)]
        return (errors or lines or ["its log is empty"])[-1][:limit]

    def exit_report(self) -> str:
        """One line for a process that exited: its code, the reason from its log, where the log is."""
        return f"{self.name} exited with code {self.popen.poll()}: {self.why_stopped()} (log: {self.log})"


def _die_with_parent() -> Callable[[], None] | None:
    """What the child runs before exec so the kernel SIGTERMs it when the launcher dies (Linux).

    prctl is looked up here, in the parent: loading a library after fork may deadlock.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (another process may take it before you do)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def port_problem(host: str, port: int) -> str | None:
    """Why a server could not listen on ``host:port`` now (in use, no such address), or None.

    Bound with SO_REUSEADDR, as uvicorn binds: a closed connection lingering in TIME_WAIT is no problem.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return "already in use"
            return error.strerror or str(error)
    return None


def wait_until_ready(host: str, port: int, process: ProcessTree, timeout: float = 60.0) -> None:
    """Block until ``host:port`` accepts connections; raise if ``process`` exits or time runs out.

    A TCP connect works for TLS and plain SuperLinks alike, and the SuperLink binds its
    port only once its services have started (uvicorn runs the app's start-up first).
    """
    deadline = time.monotonic() + timeout
    while not _accepts(host, port):
        if not process.running():
            raise FlowerError(f"{process.name} exited with code {process.popen.returncode} before "
                              f"listening on {host}:{port}: {process.why_stopped()} (log: {process.log})")
        if time.monotonic() > deadline:
            raise FlowerError(f"{process.name} did not listen on {host}:{port} within {timeout:.0f} s; "
                              f"see {process.log}")
        time.sleep(0.2)


def _accepts(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def write_connection(flwr_home: Path, address: str, ca_cert: Path | None) -> None:
    """The ``flwr`` CLI's settings: how it reaches the SuperLink at ``address`` (``CONNECTION``).

    ``ca_cert`` None: plain HTTP (``insecure``).
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    connection: dict[str, Any] = {"address": address}
    if ca_cert is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(Path(ca_cert).resolve())
    (flwr_home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}))


def write_app(folder: Path, serverapp: str, clientapp: str, run_config: Mapping[str, Any]) -> Path:
    """A Flower App of just ``folder/pyproject.toml``: the components come from installed packages.

    ``run_config`` is flat (``{"federation.rounds": 20}``); TOML holds dotted keys as nested tables.
    """
    nested: dict[str, Any] = {}
    for key, value in run_config.items():
        *sections, name = key.split(".")
        table = nested
        for section in sections:
            table = table.setdefault(section, {})
        table[name] = value
    project = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": "pollen-run", "version": "1.0.0", "description": "One Pollen federation run",
                    "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": "pollen",
                                  "components": {"serverapp": serverapp, "clientapp": clientapp},
                                  "config": nested}}},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project))
    return folder

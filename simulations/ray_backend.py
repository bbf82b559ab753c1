"""Run a simulated federation on Flower's simulation engine (Ray), through ``flwr run``.

A private SuperLink in simulation mode starts on a free local port with its own
FLWR_HOME (so it never meets another SuperLink on this machine); ``flwr run`` submits a
generated Flower App whose ServerApp is ``simulations.ray_app:app`` and ClientApp
``client.app:app``, with the whole Pollen config as run config and the client
resources as federation config. Ray starts on this machine, or joins the cluster at
``simulation.ray_address``. Progress comes from the run record the ServerApp appends.

When the run ends, fails or is interrupted, the SuperLink and every process it
started (the ServerApp and Ray's processes) are stopped by PID.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import tomli_w

from pollen.config import Config, to_flat
from pollen.server.records import RoundRecord, RunRecord, read_records

CONNECTION = "pollen"
SUPERLINK_LOG = "superlink.log"
FLWR_LOG = "flwr-run.log"
STARTUP_SECONDS = 60.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h
POLL_SECONDS = 0.5
OFFLINE = {  # the SuperLink and its children must stay offline too
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def run_on_ray(config: Config, folder: Path, on_round: Callable[[RoundRecord], None] | None = None,
               timeout: float | None = None, processes: ProcessTree | None = None) -> list[RoundRecord]:
    """Run ``config`` on Flower's engine; the run record lands in ``folder`` as in process.

    ``processes`` collects (and at the end stops) every process the run started.
    """
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pollen-ray-") as scratch:
        scratch = Path(scratch)
        port = free_port()
        env = {**os.environ, **OFFLINE, "FLWR_HOME": str(scratch / "flwr-home")}
        if config.simulation.ray_address:
            env["RAY_ADDRESS"] = config.simulation.ray_address
        write_connection(scratch / "flwr-home", port)
        app_dir = write_flower_app(scratch / "app", config, folder)
        processes = processes if processes is not None else ProcessTree()
        try:
            with (folder / SUPERLINK_LOG).open("w") as log:
                superlink = processes.start(
                    ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
                     "--host", "127.0.0.1", "--port", str(port)], env, scratch, log)
            wait_until_healthy(port, superlink)
            with (folder / FLWR_LOG).open("w") as log:
                runner = processes.start(
                    ["flwr", "run", str(app_dir), CONNECTION, "--stream",
                     *federation_config(config)], env, scratch, log)
            follow(folder, runner, processes, on_round, timeout)
        finally:
            processes.stop()
        records = read_records(folder) if (folder / RunRecord.FILENAME).exists() else []
        if len(records) != config.federation.rounds + 1:
            raise RuntimeError(f"the Ray run ended after {max(len(records) - 1, 0)} of "
                               f"{config.federation.rounds} rounds; see {folder / FLWR_LOG} "
                               f"and {folder / SUPERLINK_LOG}")
        return records


def federation_config(config: Config) -> list[str]:
    sim = config.simulation
    settings = {"num-supernodes": config.federation.num_clients, "backend": "ray",
                "client-resources-num-cpus": sim.client_cpus,
                "client-resources-num-gpus": sim.client_gpus}
    return [arg for key, value in settings.items()
            for arg in ("--federation-config", f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}")]


def write_flower_app(app_dir: Path, config: Config, folder: Path) -> Path:
    """A Flower App (just its pyproject.toml) running Pollen's apps from the installed packages."""
    run_config = to_flat(config)
    if config.simulation.devices:  # the ServerApp runs in another working directory
        run_config["simulation.devices"] = str(Path(config.simulation.devices).resolve())
    run_config["output_dir"] = str(folder)  # simulations.ray_app writes the run record here
    nested: dict = {}
    for key, value in run_config.items():
        *sections, name = key.split(".")
        table = nested
        for section in sections:
            table = table.setdefault(section, {})
        table[name] = value
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "pollen-simulation", "version": "1.0.0", "dependencies": [],
                    "description": "A Pollen federation on Flower's simulation engine",
                    "license": "Apache-2.0"},
        "tool": {"flwr": {"app": {
            "publisher": "pollen",
            "components": {"serverapp": "pollen.simulations.ray_app:app", "clientapp": "pollen.client.app:app"},
            "config": nested,
        }}},
    }
    app_dir.mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(project))
    return app_dir


def write_connection(home: Path, port: int) -> None:
    home.mkdir(parents=True)
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {
        "default": CONNECTION, CONNECTION: {"address": f"127.0.0.1:{port}", "insecure": True}}}))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(port: int, superlink: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if superlink.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {superlink.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"flower-superlink did not answer on 127.0.0.1:{port} in {STARTUP_SECONDS:.0f} s")


def follow(folder: Path, runner: subprocess.Popen, processes: ProcessTree,
           on_round: Callable[[RoundRecord], None] | None, timeout: float | None) -> None:
    """Report rounds as the ServerApp writes them, until ``flwr run --stream`` returns."""
    deadline = None if timeout is None else time.monotonic() + timeout
    seen = 0
    while True:
        processes.remember_children()
        done = runner.poll() is not None
        path = folder / RunRecord.FILENAME
        records = read_records(folder) if path.exists() else []
        for entry in records[seen:]:
            if on_round:
                on_round(entry)
        seen = max(seen, len(records))
        if done:
            return
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"the Ray run took longer than {timeout:.0f} s")
        time.sleep(POLL_SECONDS)


class ProcessTree:
    """Processes started here and everything they start, stopped by PID at the end.

    Children are remembered while they live, because Ray's processes can outlive
    (and be re-parented away from) the process that started them.
    """

    def __init__(self) -> None:
        self.roots: list[subprocess.Popen] = []
        self.known: dict[int, psutil.Process] = {}

    def start(self, command: list[str], env: dict, cwd: Path, log) -> subprocess.Popen:
        # A session of its own: Ctrl-C reaches only this process, which then stops the tree.
        # Should this process be killed outright, the kernel stops the child (Linux).
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=_die_with_parent)
        self.roots.append(process)
        self.remember_children()
        return process

    def remember_children(self) -> None:
        for root in self.roots:
            try:
                tree = [psutil.Process(root.pid), *psutil.Process(root.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for process in tree:
                self.known.setdefault(process.pid, process)

    def alive(self) -> list[psutil.Process]:
        # psutil.Process.is_running also checks the start time, so a recycled PID never counts.
        return [process for process in self.known.values() if process.is_running()
                and process.status() != psutil.STATUS_ZOMBIE]

    def stop(self, grace: float = 10.0) -> None:
        self.remember_children()
        for process in self.alive():
            try:
                process.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, left = psutil.wait_procs(self.alive(), timeout=grace)
        for process in left:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=grace)
        for root in self.roots:
            try:
                root.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies, where the OS offers it."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

"""The server side of a deployed federation: Flower's SuperLink with TLS and node authentication.

``Deployment(config, folder, certs).start()`` then ``.submit()`` does what an operator
would do by hand with Flower's tools:

1. start ``flower-superlink`` on one port with the server certificate and
   ``--enable-supernode-auth`` (only registered device keys may connect);
2. ``flwr supernode register`` every device public key in ``CERTS/devices/``;
3. ``flwr run`` a Flower App whose ``pyproject.toml`` carries this run's whole config,
   so the SuperLink runs the same ServerApp (``server.app:app``) the simulations use
   and devices run the same ClientApp (``client.app:app``) from their installed Pollen.

Flower's CLI keeps its connection settings under ``FLWR_HOME``; each run gets its own,
inside the run folder, so nothing in the user's home is touched. Every process is
started in its own session and stopped by its process-group id, which reaches the
helpers the SuperLink spawns (SuperExec, the ServerApp) as well.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from pollen.certs import CA_CERT, DEVICES, SERVER_CERT, SERVER_KEY, CertificateError, server_names_of
from pollen.config import Config, to_flat
from pollen.server.app import RESUME, RUN_FOLDER

# Keep Flower offline: no telemetry, no update check, no `uv sync` of the app's dependencies.
OFFLINE = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
CONNECTION = "pollen"  # the SuperLink connection's name in FLWR_HOME/config.toml
DEFAULT_PORT = 9093


class DeploymentError(RuntimeError):
    """The federation could not be started or run; the message says which step failed."""


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    env = {**os.environ, **OFFLINE}
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


@dataclass
class Process:
    """A started command, its log file, and how to stop it with everything it spawned."""

    name: str
    popen: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, name: str, command: list[str], log: Path, env: dict[str, str],
              cwd: Path | None = None) -> Process:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            popen = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        return cls(name, popen, log)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group (the process and its helpers), SIGKILL what outlives ``grace``."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
            if not _group_alive(self.pid, grace):
                break

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _group_alive(pgid: int, wait: float) -> bool:
    """Whether any process of the group is left after up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.1)


def superlink_command(host: str, port: int, certs: Path | None, node_auth: bool) -> list[str]:
    command = [_tool("flower-superlink"), "--host", host, "--port", str(port),
               "--disable-runtime-dependency-installation"]
    if certs is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(certs / CA_CERT), "--ssl-certfile", str(certs / SERVER_CERT),
                    "--ssl-keyfile", str(certs / SERVER_KEY)]
    if node_auth:
        command.append("--enable-supernode-auth")
    return command


def write_app(folder: Path, config: Config) -> Path:
    """A Flower App holding only ``pyproject.toml``: the components come from the installed Pollen."""
    app = folder / "app"
    app.mkdir(parents=True, exist_ok=True)
    run_config = to_flat(config)
    project = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": "pollen-run", "version": "1.0.0", "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": "pollen",
                                  "components": {"serverapp": "pollen.server.app:app", "clientapp": "pollen.client.app:app"},
                                  "config": run_config}}},
    }
    (app / "pyproject.toml").write_text(tomli_w.dumps(project))
    return app


def write_connection(flwr_home: Path, address: str, certs: Path | None) -> None:
    """Flower CLI settings: how ``flwr run``/``flwr supernode register`` reach this SuperLink."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    connection: dict[str, Any] = {"address": address}
    if certs is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str((certs / CA_CERT).resolve())
    (flwr_home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}))


def device_public_keys(certs: Path) -> list[Path]:
    keys = sorted((certs / DEVICES).glob("*.pub"))
    if not keys:
        raise DeploymentError(f"{certs / DEVICES}: no device public keys (*.pub); create them with "
                              f"`pollen certs {certs} --server-name HOST --devices N`")
    return keys


@dataclass
class Deployment:
    """One federation run on a SuperLink started here; use as a context manager to stop it."""

    config: Config
    folder: Path  # the run folder: records, checkpoint, logs, Flower's settings
    certs: Path | None  # None: plain HTTP, no node authentication (--insecure)
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    resume: bool = False
    public_keys: list[Path] = field(default_factory=list)
    superlink: Process | None = None
    run_id: int | None = None
    node_ids: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.folder = self.folder.resolve()
        self.flwr_home = self.folder / "flwr"
        if self.certs is not None:
            self.certs = self.certs.resolve()
            for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
                if not (self.certs / name).is_file():
                    raise DeploymentError(f"{self.certs / name}: missing; create the certificates with "
                                          f"`pollen certs {self.certs} --server-name HOST`")
            self.public_keys = self.public_keys or device_public_keys(self.certs)
            local = self.local_host
            try:
                names = server_names_of(self.certs / SERVER_CERT)
            except (CertificateError, ValueError) as error:
                raise DeploymentError(f"{self.certs / SERVER_CERT}: unreadable ({error})") from None
            if local not in names:
                raise DeploymentError(f"{self.certs / SERVER_CERT} is not valid for {local}, the address "
                                      f"this server manages the SuperLink on (valid for {', '.join(names)})")

    @property
    def local_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def address(self) -> str:
        return f"{self.local_host}:{self.port}"

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        """Start the SuperLink, wait until it answers, register the device keys."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_connection(self.flwr_home, self.address, self.certs)
        command = superlink_command(self.host, self.port, self.certs, node_auth=self.certs is not None)
        env = {**flower_env(self.flwr_home), RUN_FOLDER: str(self.folder), RESUME: "1" if self.resume else "0"}
        self.superlink = Process.start("superlink", command, self.folder / "logs" / "superlink.log",
                                       env, cwd=self.folder)
        deadline = time.monotonic() + timeout
        while not _port_open(self.local_host, self.port):
            if not self.superlink.running():
                raise DeploymentError(f"the SuperLink exited:\n{self.superlink.tail()}")
            if time.monotonic() > deadline:
                raise DeploymentError(f"the SuperLink did not listen on {self.address} within {timeout:.0f} s")
            time.sleep(0.2)
        for key in self.public_keys:
            reply = self.flwr(["supernode", "register", str(key), CONNECTION], deadline)
            self.node_ids[str(key)] = int(reply["node-id"])

    def submit(self, timeout: float = 60.0) -> int:
        """Submit the Pollen app for the configured rounds; returns Flower's run id."""
        app = write_app(self.folder, self.config)
        reply = self.flwr(["run", str(app), CONNECTION], time.monotonic() + timeout)
        self.run_id = int(reply["run-id"])
        return self.run_id

    def status(self) -> dict[str, Any]:
        """Flower's view of the run: status, bytes in and out, compute seconds."""
        reply = self.flwr(["list", CONNECTION, "--run-id", str(self.run_id)], time.monotonic() + 30)
        return reply["runs"][0]

    def wait(self, timeout: float | None = None, on_poll: Callable[[], None] | None = None,
             poll: float = 2.0) -> dict[str, Any]:
        """Block until the run finishes; returns its final status. Raises if it failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if on_poll:
                on_poll()
            status = self.status()
            if status["status"].startswith("finished"):
                if on_poll:
                    on_poll()
                if status["status"] != "finished:completed":
                    raise DeploymentError(f"run {self.run_id} ended {status['status']}: "
                                          f"{status.get('status-details')}; see `FLWR_HOME={self.flwr_home} "
                                          f"flwr log {self.run_id} {CONNECTION}` and {self.superlink.log}")
                return status
            if self.superlink is not None and not self.superlink.running():
                raise DeploymentError(f"the SuperLink exited:\n{self.superlink.tail()}")
            if deadline is not None and time.monotonic() > deadline:
                raise DeploymentError(f"run {self.run_id} did not finish within {timeout:.0f} s")
            time.sleep(poll)

    def stop(self) -> None:
        if self.superlink is not None:
            self.superlink.stop()

    def flwr(self, args: list[str], deadline: float) -> dict[str, Any]:
        """Run one ``flwr`` CLI command with JSON output, retrying while the SuperLink warms up."""
        while True:
            done = subprocess.run([_tool("flwr"), *args, "--format", "json"], capture_output=True, text=True,
                                  env=flower_env(self.flwr_home), cwd=self.folder,
                                  timeout=max(5.0, deadline - time.monotonic()))
            try:
                reply = json.loads(done.stdout)
            except json.JSONDecodeError:
                reply = {"success": False, "error-message": (done.stdout + done.stderr).strip()[-500:]}
            if reply.get("success"):
                return reply
            if time.monotonic() > deadline:
                raise DeploymentError(f"`flwr {' '.join(args)}` failed: {reply.get('error-message', reply)}")
            time.sleep(0.5)


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def _tool(name: str) -> str:
    """A console script installed next to this Python, so the right environment runs it."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name

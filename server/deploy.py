"""The server side of a deployed federation: Flower's SuperLink with TLS and node authentication.

``Deployment(config, folder, certs).start()`` then ``.submit()`` does what an operator
would do by hand with Flower's tools:

1. start ``flower-superlink`` on one port with the server certificate and
   ``--enable-supernode-auth`` (only registered device keys may connect);
2. ``flwr supernode register`` every device public key in ``CERTS/devices/``;
3. ``flwr run`` a Flower App whose ``pyproject.toml`` carries this run's whole config,
   so the SuperLink runs the same ServerApp (``pollen.server.app:app``) the simulations
   use and devices run the same ClientApp (``pollen.client.app:app``) from their
   installed Pollen.

Flower's CLI keeps its connection settings under ``FLWR_HOME``; each run gets its own,
inside the run folder, so nothing in the user's home is touched. The SuperLink and
what it spawns are started and stopped by ``pollen.flower_processes``.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pollen.certs import CA_CERT, DEVICES, SERVER_CERT, SERVER_KEY, CertificateError, server_names_of
from pollen.config import Config, run_config_of
from pollen.flower_processes import (CONNECTION, SUPERLINK_LOG, FlowerError, ProcessTree, console_script,
                                     offline_env, wait_until_ready, write_app, write_connection)
from pollen.run_folder import RunFolder

DEFAULT_PORT = 9093
SERVERAPP, CLIENTAPP = "pollen.server.app:app", "pollen.client.app:app"


class DeploymentError(FlowerError):
    """The federation could not be started or run; the message says which step failed."""


def superlink_command(host: str, port: int, certs: Path | None, node_auth: bool) -> list[str]:
    command = [console_script("flower-superlink"), "--host", host, "--port", str(port),
               "--disable-runtime-dependency-installation"]
    if certs is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(certs / CA_CERT), "--ssl-certfile", str(certs / SERVER_CERT),
                    "--ssl-keyfile", str(certs / SERVER_KEY)]
    if node_auth:
        command.append("--enable-supernode-auth")
    return command


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
    superlink: ProcessTree | None = None
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
        write_connection(self.flwr_home, self.address, None if self.certs is None else self.certs / CA_CERT)
        command = superlink_command(self.host, self.port, self.certs, node_auth=self.certs is not None)
        env = {**offline_env(self.flwr_home), **RunFolder.environment(self.folder, self.resume)}
        self.superlink = ProcessTree.start(command, RunFolder(self.folder).logs / SUPERLINK_LOG, env,
                                           cwd=self.folder)
        deadline = time.monotonic() + timeout
        wait_until_ready(self.local_host, self.port, self.superlink, timeout)
        for key in self.public_keys:
            reply = self.flwr(["supernode", "register", str(key), CONNECTION], deadline)
            self.node_ids[str(key)] = int(reply["node-id"])

    def submit(self, timeout: float = 60.0) -> int:
        """Submit the Pollen app for the configured rounds; returns Flower's run id."""
        app = write_app(self.folder / "app", SERVERAPP, CLIENTAPP, run_config_of(self.config))
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
            if self.superlink is not None:
                if not self.superlink.running():
                    raise DeploymentError(f"the SuperLink exited:\n{self.superlink.tail()}")
                self.superlink.remember_children()
            if deadline is not None and time.monotonic() > deadline:
                raise DeploymentError(f"run {self.run_id} did not finish within {timeout:.0f} s")
            time.sleep(poll)

    def stop(self) -> None:
        if self.superlink is not None:
            self.superlink.stop()

    def flwr(self, args: list[str], deadline: float) -> dict[str, Any]:
        """Run one ``flwr`` CLI command with JSON output, retrying while the SuperLink warms up."""
        while True:
            done = subprocess.run([console_script("flwr"), *args, "--format", "json"], capture_output=True,
                                  text=True, env=offline_env(self.flwr_home), cwd=self.folder,
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


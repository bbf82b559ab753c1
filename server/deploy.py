"""The server side of a deployed federation: Flower's SuperLink behind the Fleet proxy.

``Deployment(config, folder, certs).start()`` then ``.submit()`` does what an operator
would do by hand with Flower's tools:

1. start ``flower-superlink`` on 127.0.0.1 only, on an internal port, with the server
   certificate and ``--enable-supernode-auth`` (only registered device keys may connect):
   Flower serves its Control API (``flwr run``, ``ls``, ``stop``) on that same port, so
   that port must not face the network;
2. ``flwr supernode register`` every device public key in ``CERTS/devices/``, through
   that internal address;
3. start the Fleet proxy (``pollen.server.fleet_proxy``) on the public host and port:
   TLS with the same certificate, Flower's Fleet routes only, bounded requests; it opens
   after the keys are registered, so an early device waits instead of being refused;
4. ``flwr run`` a Flower App whose ``pyproject.toml`` carries this run's whole config,
   so the SuperLink runs the same ServerApp (``pollen.server.app:app``) the simulations
   use and devices run the same ClientApp (``pollen.client.app:app``) from their
   installed Pollen.

Flower's CLI keeps its connection settings under ``FLWR_HOME``; each run gets its own,
inside the run folder, so nothing in the user's home is touched. The SuperLink, what it
spawns, and the proxy are processes started and stopped by PID (``pollen.flower_processes``).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pollen.certs import CA_CERT, DEVICES, SERVER_CERT, SERVER_KEY, CertificateError, server_names_of
from pollen.config import Config, run_config_of
from pollen.flower_processes import (CONNECTION, SUPERLINK_LOG, FlowerError, ProcessTree, console_script, free_port,
                                     offline_env, wait_until_ready, write_app, write_connection)
from pollen.run_folder import RunFolder
from pollen.server.fleet_proxy import ProxySettings, RequestLimits

DEFAULT_PORT = 9093
LOCALHOST = "127.0.0.1"  # where the SuperLink listens: its Control API is for this machine only
PROXY_LOG = "fleet-proxy.log"
# Above the dense update: a push carries one object of a message plus its protobuf
# envelope and ids, and the other Fleet calls are a few kB.
REQUEST_MARGIN_BYTES = 1 << 20
# Set in the environment, these would make the SuperLink also open its legacy gRPC Control
# and Fleet APIs, on 0.0.0.0 by default, past the proxy.
LEGACY_GRPC_SWITCHES = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")
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


def dense_update_bytes(config: Config) -> int:
    """Bytes on the wire of one dense fp32 update of the run's trainable arrays."""
    from pollen.codec import dense_wire_bytes, layout_of
    from pollen.data import num_classes
    from pollen.models import initial_arrays

    return dense_wire_bytes(layout_of(initial_arrays(config.model, num_classes(config.data), config.seed)))


def default_max_request_bytes(config: Config) -> int:
    """The largest request a device needs: its whole update sent dense, plus the envelope."""
    return dense_update_bytes(config) + REQUEST_MARGIN_BYTES


@dataclass
class Deployment:
    """One federation run on a SuperLink started here; use as a context manager to stop it."""

    config: Config
    folder: Path  # the run folder: records, checkpoint, logs, Flower's settings
    certs: Path | None  # None: plain HTTP, no node authentication (--insecure)
    host: str | None = None  # where devices connect; None: every address, or 127.0.0.1 when insecure
    port: int = DEFAULT_PORT
    resume: bool = False
    limits: RequestLimits = field(default_factory=RequestLimits)  # max_request_bytes None: sized to the model
    internal_port: int | None = None  # the SuperLink's, on 127.0.0.1; None: a free one
    public_keys: list[Path] = field(default_factory=list)
    superlink: ProcessTree | None = None
    proxy: ProcessTree | None = None
    run_id: int | None = None
    node_ids: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.folder = self.folder.resolve()
        self.flwr_home = self.folder / "flwr"
        if self.host is None:
            self.host = LOCALHOST if self.certs is None else "0.0.0.0"
        if self.certs is not None:
            self.certs = self.certs.resolve()
            for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
                if not (self.certs / name).is_file():
                    raise DeploymentError(f"{self.certs / name}: missing; create the certificates with "
                                          f"`pollen certs {self.certs} --server-name HOST`")
            self.public_keys = self.public_keys or device_public_keys(self.certs)
            try:
                names = server_names_of(self.certs / SERVER_CERT)
            except (CertificateError, ValueError) as error:
                raise DeploymentError(f"{self.certs / SERVER_CERT}: unreadable ({error})") from None
            if LOCALHOST not in names:
                raise DeploymentError(f"{self.certs / SERVER_CERT} is not valid for {LOCALHOST}, the address "
                                      f"the SuperLink listens on behind the Fleet proxy (valid for {', '.join(names)})")

    @property
    def local_host(self) -> str:
        """Where this machine reaches the proxy."""
        return LOCALHOST if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def internal_address(self) -> str:
        """The SuperLink with every API, Control included: for this machine's ``flwr`` only."""
        return f"{LOCALHOST}:{self.internal_port}"

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        """Start the SuperLink, register the device keys, then open the Fleet proxy to devices."""
        self.folder.mkdir(parents=True, exist_ok=True)
        logs = RunFolder(self.folder).logs
        while self.internal_port in (None, self.port):
            self.internal_port = free_port()
        ca = None if self.certs is None else self.certs / CA_CERT
        write_connection(self.flwr_home, self.internal_address, ca)
        command = superlink_command(LOCALHOST, self.internal_port, self.certs, node_auth=self.certs is not None)
        env = {**offline_env(self.flwr_home), **RunFolder.environment(self.folder, self.resume)}
        for name in LEGACY_GRPC_SWITCHES:
            env.pop(name, None)
        self.superlink = ProcessTree.start(command, logs / SUPERLINK_LOG, env, cwd=self.folder)
        deadline = time.monotonic() + timeout
        if self.limits.max_request_bytes is None:  # builds the model: done while the SuperLink starts
            self.limits = dataclasses.replace(self.limits, max_request_bytes=default_max_request_bytes(self.config))
        wait_until_ready(LOCALHOST, self.internal_port, self.superlink, timeout)
        for key in self.public_keys:
            reply = self.flwr(["supernode", "register", str(key), CONNECTION], deadline)
            self.node_ids[str(key)] = int(reply["node-id"])
        self.proxy = ProcessTree.start(self.proxy_settings().command(), logs / PROXY_LOG, offline_env(),
                                       cwd=self.folder)
        wait_until_ready(self.local_host, self.port, self.proxy, max(5.0, deadline - time.monotonic()))

    def proxy_settings(self) -> ProxySettings:
        scheme = "http" if self.certs is None else "https"
        upstream = f"{scheme}://{self.internal_address}"
        if self.certs is None:
            return ProxySettings(self.host, self.port, upstream, self.limits)
        return ProxySettings(self.host, self.port, upstream, self.limits, certfile=self.certs / SERVER_CERT,
                             keyfile=self.certs / SERVER_KEY, upstream_ca=self.certs / CA_CERT)

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
            for process, name in ((self.superlink, "the SuperLink"), (self.proxy, "the Fleet proxy")):
                if process is not None:
                    if not process.running():
                        raise DeploymentError(f"{name} exited:\n{process.tail()}")
                    process.remember_children()
            if deadline is not None and time.monotonic() > deadline:
                raise DeploymentError(f"run {self.run_id} did not finish within {timeout:.0f} s")
            time.sleep(poll)

    def stop(self) -> None:
        """Close the devices' door first, then the SuperLink and what it spawned."""
        for process in (self.proxy, self.superlink):
            if process is not None:
                process.stop()

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


"""``pollen certs | server | client | export | distill``: run a federation on real devices, and ship its model.

Kept apart from ``pollen.cli`` so the simulation commands stay readable; the server,
client, export and distillation code is imported inside each command (``pollen`` imports none of
those packages at module level).

Every failure these commands expect (bad input, a busy port, a process that died, a
damaged file) ends as one line naming the file or port and the problem, exit code 2
for bad input and 1 for a deployment that failed; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pollen.cli.options import (add_tensorboard_option, add_threads_option, add_verbose_option, run_overrides,
                                use_threads)
from pollen.config import ConfigError, load_config
from pollen.flower_processes import FlowerError

COMMANDS = ("certs", "server", "client", "export", "distill")
LOCAL_NAMES = ["localhost", "127.0.0.1"]  # the server's own `flwr` calls reach the SuperLink here


def add_commands(commands: argparse._SubParsersAction) -> None:
    certs = commands.add_parser("certs", help="create a CA, the server certificate and device keys; "
                                              "add, revoke devices; renew the server certificate")
    certs.add_argument("folder", help="where to write them (created; private keys are owner-only)")
    certs.add_argument("--server-name", action="append", default=[], metavar="HOST",
                       help="a host name or IP address devices dial (repeatable; needed to create; default with "
                            "--renew-server: the current certificate's); localhost and 127.0.0.1 are always added")
    certs.add_argument("--devices", type=int, default=3, metavar="N", help="device key pairs to create (default 3)")
    certs.add_argument("--force", action="store_true", help="replace existing files")
    change = certs.add_mutually_exclusive_group()
    change.add_argument("--revoke", action="append", default=[], metavar="device-N",
                        help="take a device out of the federation (repeatable): its keys move to revoked/")
    change.add_argument("--add-devices", type=int, metavar="K",
                        help="write K more device key pairs, numbered after the highest issued")
    change.add_argument("--renew-server", action="store_true",
                        help="re-issue server.pem/server.key from the existing CA (devices change nothing); "
                             "--server-name as when created, or kept from the current certificate")
    add_verbose_option(certs)

    server = commands.add_parser("server", help="run the federation's server (Flower SuperLink + Pollen)")
    server.add_argument("config", nargs="?", help="YAML config (default: the built-in default run)")
    # The config was once an option here: still taken, not shown.
    server.add_argument("--config", dest="config_option", metavar="CONFIG", help=argparse.SUPPRESS)
    server.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key (repeatable; default: none)")
    server.add_argument("--certs", metavar="DIR", help="folder written by pollen certs: TLS and the device keys "
                                                         "to admit (needed unless --insecure)")
    server.add_argument("--host", default=None,
                        help="address devices connect to (default: every address; 127.0.0.1 with --insecure)")
    server.add_argument("--port", type=int, default=None, help="port devices connect to (default 9093)")
    server.add_argument("--max-request-bytes", type=int, default=None, metavar="BYTES",
                        help="largest request a device may send (default: the model's dense update + 1 MiB)")
    # Defaults are pollen.server.fleet_proxy.RequestLimits' (not imported here: see the module docstring).
    server.add_argument("--rate-limit", type=float, default=None, metavar="PER_SECOND",
                        help="requests a second per device address (default 20)")
    server.add_argument("--rate-burst", type=int, default=None, metavar="N",
                        help="requests a device address may make at once (default 400)")
    server.add_argument("--output", metavar="DIR", help="run folder (default: OUTPUT_DIR/<timestamp>)")
    server.add_argument("--resume", metavar="RUN_DIR",
                        help="go on from RUN_DIR's last checkpoint (default: a new run)")
    server.add_argument("--insecure", action="store_true",
                        help="plain HTTP and no device authentication (only on a trusted network)")
    server.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="give up after this many seconds (default: wait until the run ends)")
    add_threads_option(server)  # the server's evaluation
    add_verbose_option(server)
    add_tensorboard_option(server)

    client = commands.add_parser("client", help="run a device: a Flower SuperNode training on local data")
    client.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's address")
    client.add_argument("--ca", metavar="FILE", help="the federation's ca.pem (needed unless --insecure)")
    client.add_argument("--key", metavar="FILE",
                        help="this device's private key, devices/device-N.key (needed unless --insecure)")
    client.add_argument("--data", required=True, metavar="PATH",
                        help="training data: a folder of class folders 0/, 1/, ... of images, or an .npz/.csv file")
    client.add_argument("--local-port", type=int, default=None, metavar="PORT",
                        help="port on 127.0.0.1 for the SuperNode's ClientApp (default 9094; "
                             "give each SuperNode on one machine its own)")
    client.add_argument("--insecure", action="store_true", help="plain HTTP (a server started with --insecure)")
    add_threads_option(client)  # the model arrives with the run: without --threads, sized as a large one
    add_verbose_option(client)

    export = commands.add_parser("export", help="write a run's fine-tuned model for on-device inference")
    export.add_argument("run", help="run folder holding checkpoint.pt and config.yaml")
    export.add_argument("--format", choices=("onnx", "torch", "peft"), default="onnx",
                        help="onnx or torch: the merged model; peft: adapters and head as a peft adapter folder "
                             "(default onnx)")
    export.add_argument("--output", metavar="PATH", help="file or (peft) folder to write "
                                         "(default: RUN/model.onnx, RUN/model.pt2 or RUN/peft-adapter; "
                                         "pruned: RUN/model.onnx.xz or RUN/model.pt2.xz)")
    export.add_argument("--prune", type=float, metavar="S",
                        help="set the smallest share S in [0, 1) of each layer's weights to zero; the file is "
                             "written xz-compressed (the zeros shrink the download, not the model in memory; "
                             "default: no pruning)")
    export.add_argument("--finetune-rounds", type=int, default=0, metavar="N",
                        help="with --prune: fine-tune N epochs on a seeded half of the held-out split; accuracy "
                             "is then measured on the other half (default 0)")
    add_threads_option(export)  # the fine-tune
    add_verbose_option(export)

    distill = commands.add_parser("distill", help="train a small student on a run's soft labels, for the edge")
    distill.add_argument("run", help="run folder holding checkpoint.pt and config.yaml")
    distill.add_argument("--student", default="tiny-cnn", metavar="NAME",
                         help="the student's model.name: a built-in or a module:function factory (default tiny-cnn)")
    distill.add_argument("--data", metavar="PATH",
                         help="the server's own images to learn from (labels ignored; default: a seeded "
                              "half of the run's held-out split, the other half measures)")
    distill.add_argument("--epochs", type=int, default=30, metavar="N",
                         help="epochs over the transfer data (default 30)")
    distill.add_argument("--temperature", type=float, default=4.0, metavar="T",
                         help="softmax temperature (default 4)")
    distill.add_argument("--image-size", type=int, metavar="PIXELS",
                         help="the student's input size (default: the run's)")
    add_threads_option(distill)
    add_verbose_option(distill)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        return {"certs": certs_command, "server": server_command, "client": client_command,
                "export": export_command, "distill": distill_command}[args.command](args)
    # Every bad-input error of these commands is a ValueError; OSError: a file that cannot be
    # read or written; FlowerError: a deployment that could not start or run.
    except (ValueError, OSError, FlowerError) as error:
        if getattr(args, "debug", False):
            raise
        prefix = "pollen: config error" if isinstance(error, ConfigError) else f"pollen {args.command}"
        if isinstance(error, FlowerError):
            print(f"{prefix}: {one_line(error)}", file=sys.stderr)
            return 1
        parser.exit(2, f"{prefix}: {one_line(error)}\n")


def one_line(error: Exception) -> str:
    """The error's first line: the rest (a log's end, a library's detail) is in the logs or --debug."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def certs_command(args: argparse.Namespace) -> int:
    from pollen.certs import CertificateError, make_certificates

    if args.revoke:
        return revoke_command(args)
    if args.add_devices is not None:
        return add_devices_command(args)
    if args.renew_server:
        return renew_server_command(args)
    if not args.server_name:
        raise CertificateError("--server-name HOST is required to create a federation's certificates "
                               "(the name or IP address devices dial)")
    names = list(dict.fromkeys([*args.server_name, *LOCAL_NAMES]))
    paths = make_certificates(args.folder, names, devices=args.devices, force=args.force)
    print(f"CA:      {paths.ca_cert}  (copy to every device)")
    print(f"server:  {paths.server_cert}, {paths.server_key}  (valid for {', '.join(names)})")
    print(f"devices: {len(paths.device_keys)} key pairs in {paths.folder / 'devices'}; copy device-N.key to "
          "device N, keep the .pub files here: the server admits exactly those")
    return 0


def revoke_command(args: argparse.Namespace) -> int:
    from pollen.certs import REVOKED, revoke_devices

    revoke_devices(args.folder, args.revoke)
    print(f"revoked {', '.join(dict.fromkeys(args.revoke))}: keys moved to {Path(args.folder) / REVOKED}; "
          "a running pollen server unregisters them at its next poll, a restarted one never registers them")
    return 0


def add_devices_command(args: argparse.Namespace) -> int:
    from pollen.certs import DEVICES, add_devices

    keys = add_devices(args.folder, args.add_devices)
    print(f"added {', '.join(key.stem for key in keys)} in {Path(args.folder) / DEVICES}: copy device-N.key to "
          "device N; a running pollen server registers them at its next poll")
    return 0


def renew_server_command(args: argparse.Namespace) -> int:
    from pollen.certs import SERVER_CERT, expires_on, renew_server_certificate, server_names_of

    current = Path(args.folder) / SERVER_CERT
    given = args.server_name or (server_names_of(current) if current.is_file() else [])
    names = list(dict.fromkeys([*given, *LOCAL_NAMES]))
    cert = renew_server_certificate(args.folder, names)
    print(f"renewed {cert} (valid for {', '.join(names)} until {expires_on(cert):%Y-%m-%d}); ca.pem and the "
          "device keys are unchanged; restart pollen server (--resume RUN) to use it")
    return 0


def server_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pollen.flower_processes import CONNECTION
    from pollen.run_folder import RunFolder
    from pollen.server.deploy import DEFAULT_PORT, Deployment
    from pollen.server.fleet_proxy import RequestLimits
    from pollen.simulations.report import note_lines
    from pollen.tensorboard_log import require_tensorboard
    from pollen.threads import thread_environment
    from pollen.wording import byte_size, counted

    console = Console()
    if args.config_option:
        if args.config:
            raise ConfigError(f"{args.config} and --config {args.config_option}: give the config once")
        print("pollen server: --config is deprecated; give the config as the first argument", file=sys.stderr)
    if args.resume:
        run = RunFolder(args.resume)
        if not run.config_path.is_file():
            raise ConfigError(f"--resume {run}: no {RunFolder.CONFIG}, not a run folder")
        config = run.read_config(run_overrides(args))
    else:
        config = load_config(args.config or args.config_option, run_overrides(args))
        run = RunFolder(args.output) if args.output else RunFolder.new(config.output_dir)
    # The evaluation runs in Flower's ServerApp process, which the SuperLink starts with this environment.
    os.environ.update(thread_environment(use_threads(args.threads, config)))
    require_tensorboard(config)
    if not args.insecure and not args.certs:
        raise ValueError("--certs DIR is required (create it with `pollen certs DIR --server-name HOST`), "
                         "or pass --insecure")
    given = {"max_request_bytes": args.max_request_bytes, "requests_per_second": args.rate_limit,
             "burst": args.rate_burst}
    limits = RequestLimits(**{name: value for name, value in given.items() if value is not None})
    certs = None if args.insecure else Path(args.certs)
    deployment = Deployment(config, run.path, certs, host=args.host, port=args.port or DEFAULT_PORT,
                            resume=bool(args.resume), limits=limits)
    deployment.check_ports()  # a busy port is the first thing said
    for warning in deployment.warnings:
        console.print(f"[bold yellow]WARNING[/]: {warning}", soft_wrap=True)
    if args.insecure:
        reach = ("listening on 127.0.0.1 only; pass --host to open it to a network you trust"
                 if args.host is None else f"listening on {deployment.host}: anyone who reaches it may join")
        console.print(f"[bold red]WARNING[/]: --insecure: updates travel unencrypted and any device may join; "
                      f"{reach}.")
    fed = config.federation
    started = time.monotonic()
    with deployment:
        try:
            deployment.start()
            limits = deployment.limits
            door = f"TLS, {len(deployment.node_ids)} registered device keys" if certs else "insecure"
            console.print(f"[bold]pollen server[/]: devices connect to {deployment.host}:{deployment.port}, Fleet API "
                          f"only ({door}; requests up to {limits.max_request_bytes} B, "
                          f"{limits.requests_per_second:g}/s and {limits.burst} at once per address)")
            console.print(f"SuperLink and its Control API on {deployment.internal_address}, this machine only "
                          f"(`FLWR_HOME={deployment.flwr_home} flwr ls {CONNECTION}`)")
            run_id = deployment.submit()
            console.print(f"run {run_id}: {counted(fed.rounds, 'round')}, {fed.clients_per_round} devices per round "
                          + (f"(up to {fed.most_sampled} sampled as earlier rounds lose some) "
                             if fed.most_sampled > fed.clients_per_round else "")
                          + "(waits until that many are connected)")
            console.print(f"records: [bold]{run.records_path}[/], checkpoint: [bold]{run.checkpoint}[/], "
                          f"logs: {run.logs}")
            shown = [0]

            def show_rounds() -> None:
                records = run.records()
                for entry in records[shown[0]:]:
                    console.print(f"round {entry.round}: accuracy {entry.accuracy:.4f}, {entry.clients} devices, "
                                  f"up {byte_size(entry.uplink_bytes)}, down {byte_size(entry.downlink_bytes)} "
                                  f"({time.monotonic() - started:.0f} s)")
                    for note in note_lines(entry, console.width):  # who was turned away and why, by device name
                        console.print(note, markup=False, highlight=False, soft_wrap=True)
                shown[0] = len(records)

            status = deployment.wait(args.timeout, on_poll=show_rounds,
                                     on_change=lambda line: console.print(f"devices: {line}", soft_wrap=True))
        except KeyboardInterrupt:
            console.print(f"stopped; go on with `pollen server --resume {deployment.folder} "
                          f"--certs {args.certs or '...'}`")
            return 130
    traffic = status.get("network-traffic", {})
    console.print(f"done in {time.monotonic() - started:.0f} s; Flower counted {traffic.get('total-bytes', '?')} "
                  f"bytes to and from the devices; export with `pollen export {deployment.folder}`")
    return 0


def client_command(args: argparse.Namespace) -> int:
    from pollen.client.device import DEFAULT_LOCAL_PORT, DeviceError, supernode_command
    from pollen.data_files import read_path
    from pollen.flower_processes import offline_env
    from pollen.threads import default_threads, thread_environment

    if args.insecure:
        print("WARNING: --insecure: this device's updates travel unencrypted", file=sys.stderr)
    elif not (args.ca and args.key):
        raise DeviceError("--ca and --key are required (from `pollen certs`), or pass --insecure")
    # Check the format now, not mid-round; the run's class count is checked when a round loads it.
    split = read_path(args.data)
    command = supernode_command(args.server, Path(args.data), None if args.insecure else Path(args.ca),
                                Path(args.key) if args.key else None, args.local_port or DEFAULT_LOCAL_PORT)
    print(f"device: {len(split)} examples in {args.data}; connecting to {args.server}"
          + ("" if args.verbose else " (-v shows the SuperNode's log)"), flush=True)
    # The SuperNode starts the ClientApp with this environment: its threads, and how much Flower logs.
    env = {**offline_env(), **thread_environment(args.threads or default_threads(None))}
    if args.verbose:
        env["FLWR_LOG_LEVEL"] = "INFO"
    else:
        env.setdefault("FLWR_LOG_LEVEL", "WARNING")
    # Become the SuperNode: same PID, so whoever started `pollen client` can stop it.
    os.execvpe(command[0], command, env)
    return 0  # not reached


def export_command(args: argparse.Namespace) -> int:
    from pollen.server.export import ExportError, Pruning, export_run

    use_threads(args.threads, run_config(args.run))
    if args.prune is None and args.finetune_rounds:
        raise ExportError("--finetune-rounds: fine-tunes a pruned model; give --prune S as well")
    pruning = None if args.prune is None else Pruning(args.prune, args.finetune_rounds)
    result = export_run(Path(args.run), args.format, Path(args.output) if args.output else None, pruning)
    print(f"wrote {result.path} ({result.bytes / 1e6:.2f} MB, {result.format}); outputs match the "
          f"PyTorch model within {result.max_difference:.2e} on {result.checked} test images")
    if pruning is not None:
        print(f"pruned to sparsity {result.sparsity:.3f}, xz-compressed ({result.loaded_bytes / 1e6:.2f} MB "
              f"once decompressed); accuracy {result.accuracy:.4f} on {result.evaluated} held-out images"
              + (f" not used by the {pruning.finetune_rounds}-epoch fine-tune" if pruning.finetune_rounds else ""))
    return 0


def distill_command(args: argparse.Namespace) -> int:
    from pollen.server.distill import distill_run

    use_threads(args.threads, run_config(args.run))
    result = distill_run(Path(args.run), args.student, args.data, args.epochs, args.temperature,
                         image_size=args.image_size)
    print(result.summary())
    return 0


def run_config(path: str):
    """The Config a run folder holds, for its thread count; None where it has none (the command then says so)."""
    from pollen.run_folder import RunFolder

    folder = RunFolder(path)
    return folder.read_config() if folder.config_path.is_file() else None

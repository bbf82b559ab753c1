"""pollen.flower_processes: processes stopped by PID, ports, Flower's settings files, readiness.

Every process a test starts is stopped by PID in ``finally``; servers listen on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import psutil
import pytest

from pollen.flower_processes import (CONNECTION, OFFLINE, FlowerError, ProcessTree, console_script, free_port,
                                     offline_env, port_problem, wait_until_ready, write_app, write_connection)

BOUND = 30.0  # seconds: a bound on every wait here


def python(tmp_path: Path, code: str, name: str = "child") -> ProcessTree:
    return ProcessTree.start([sys.executable, "-c", textwrap.dedent(code)], tmp_path / f"{name}.log",
                             offline_env(), cwd=tmp_path)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {BOUND:.0f} s")
        time.sleep(0.05)


def test_stop_ends_a_child_and_a_grandchild_that_left_the_session(tmp_path):
    # The grandchild starts a session of its own, as Ray's processes do: only its PID reaches it.
    tree = python(tmp_path, """
        import subprocess, time
        subprocess.Popen(['sleep', '300'], start_new_session=True)
        time.sleep(300)
    """)
    try:
        def both_known() -> bool:
            tree.remember_children()
            return len(tree.known) == 2

        wait_for(both_known, "grandchild")
        assert len(tree.alive()) == 2
        assert len({os.getsid(p.pid) for p in tree.alive()}) == 2
    finally:
        tree.stop(grace=5)
    assert tree.alive() == [] and not tree.running()


def test_stop_kills_what_ignores_sigterm_after_the_grace_period(tmp_path):
    tree = python(tmp_path, """
        import signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print('ready', flush=True)
        time.sleep(300)
    """)
    try:
        wait_for(lambda: "ready" in tree.tail(), "start-up")
        started = time.monotonic()
        tree.stop(grace=0.5)
        assert time.monotonic() - started < 10
    finally:
        tree.stop(grace=1)
    assert tree.popen.returncode == -signal.SIGKILL and tree.alive() == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_started_process_dies_with_its_launcher(tmp_path):
    launcher = python(tmp_path, f"""
        import time
        from pathlib import Path
        from pollen.flower_processes import ProcessTree, offline_env
        child = ProcessTree.start(['sleep', '300'], Path({str(tmp_path)!r}) / 'sleep.log', offline_env())
        print('child', child.pid, flush=True)
        time.sleep(300)
    """, name="launcher")
    child = None
    try:
        wait_for(lambda: "child" in launcher.tail(), "child")
        child = psutil.Process(int(launcher.tail().split()[-1]))
        assert child.is_running()
        launcher.popen.kill()  # no chance to stop its child: the kernel must
        launcher.popen.wait(timeout=BOUND)
        # Re-parented, it may stay a zombie nobody reaps: that counts as gone.
        wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, "child's end")
    finally:
        launcher.stop(grace=1)
        if child is not None and child.is_running():
            child.kill()


def test_tail_shows_the_end_of_the_log(tmp_path):
    tree = python(tmp_path, "print('\\n'.join(str(i) for i in range(100)))")
    try:
        tree.popen.wait(timeout=BOUND)
    finally:
        tree.stop(grace=1)
    assert tree.tail(3) == "97\n98\n99"
    assert tree.name == Path(sys.executable).name


def test_free_port_can_be_bound(tmp_path):
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))


def test_wait_until_ready_returns_once_the_port_listens(tmp_path):
    port = free_port()
    server = python(tmp_path, f"""
        import socket, time
        time.sleep(0.5)
        with socket.create_server(('127.0.0.1', {port})) as server:
            time.sleep(300)
    """)
    try:
        wait_until_ready("127.0.0.1", port, server, timeout=BOUND)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        server.stop(grace=2)


def test_wait_until_ready_says_when_the_process_exited_first(tmp_path):
    failing = python(tmp_path, "import sys; print('bad flag --nope'); sys.exit(3)")
    try:
        with pytest.raises(FlowerError) as exited:
            wait_until_ready("127.0.0.1", free_port(), failing, timeout=BOUND)
    finally:
        failing.stop(grace=1)
    message = str(exited.value)
    assert "exited with code 3 before listening on 127.0.0.1:" in message and ": bad flag --nope (log: " in message
    assert "\n" not in message


def test_wait_until_ready_gives_up_after_the_timeout(tmp_path):
    silent = python(tmp_path, "import time; time.sleep(300)")
    try:
        with pytest.raises(FlowerError, match="did not listen on 127.0.0.1:.* within 1 s"):
            wait_until_ready("127.0.0.1", free_port(), silent, timeout=1.0)
        assert silent.running()
    finally:
        silent.stop(grace=1)


def test_offline_env_keeps_the_environment_and_adds_the_offline_switches(tmp_path, monkeypatch):
    monkeypatch.setenv("POLLEN_TEST_VARIABLE", "kept")
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")
    env = offline_env(tmp_path / "home")
    assert env["POLLEN_TEST_VARIABLE"] == "kept" and env["FLWR_HOME"] == str(tmp_path / "home")
    assert {name: env[name] for name in OFFLINE} == {
        "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def test_importing_pollen_sets_the_offline_switches_it_was_not_given():
    code = "import os, pollen; print([os.environ[n] for n in pollen.flower_processes.OFFLINE])"
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert out.strip() == str(list(OFFLINE.values()))


def test_console_script_is_the_one_beside_this_python():
    assert console_script("flwr") == str(Path(sys.executable).parent / "flwr")
    assert console_script("no-such-tool-here") == "no-such-tool-here"


def test_write_connection_is_a_superlink_connection_flower_reads(tmp_path):
    from flwr.cli.flower_config import parse_superlink_connection

    (tmp_path / "ca.pem").write_text("not read here")
    write_connection(tmp_path / "tls", "127.0.0.1:9093", tmp_path / "ca.pem")
    write_connection(tmp_path / "plain", "127.0.0.1:9094", None)
    tls, plain = (tomllib.loads((tmp_path / name / "config.toml").read_text())["superlink"]
                  for name in ("tls", "plain"))
    assert tls["default"] == plain["default"] == CONNECTION
    tls = parse_superlink_connection(tls[CONNECTION], CONNECTION)
    plain = parse_superlink_connection(plain[CONNECTION], CONNECTION)
    assert (tls.address, tls.root_certificates, tls.insecure) == ("127.0.0.1:9093", str(tmp_path / "ca.pem"), False)
    assert (plain.address, plain.insecure) == ("127.0.0.1:9094", True)


def test_write_app_is_a_valid_flower_app_carrying_the_run_config(tmp_path):
    from flwr.cli.config_utils import load_and_validate
    from flwr.common.config import flatten_dict

    run_config = {"federation.rounds": 7, "model.name": "tiny-cnn", "seed": 3, "strategy": "{eta: 0.1}",
                  "simulation.client_gpus": 0.5, "codec.stochastic": False}
    app = write_app(tmp_path / "app", "some.server:app", "some.client:app", run_config)
    project, warnings = load_and_validate(app / "pyproject.toml", check_module=False)
    assert warnings == []
    flwr = project["tool"]["flwr"]
    assert "federations" not in flwr  # Flower >= 1.42 keeps connections in FLWR_HOME, not here
    assert flwr["app"]["components"] == {"serverapp": "some.server:app", "clientapp": "some.client:app"}
    assert flwr["app"]["config"]["federation"] == {"rounds": 7}  # dotted keys as nested tables
    assert flatten_dict(flwr["app"]["config"]) == run_config


def test_port_problem_says_in_use_or_why_nothing_can_listen_there():
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert port_problem("127.0.0.1", port) == "already in use"
        assert port_problem("0.0.0.0", port) == "already in use"  # every address includes 127.0.0.1
    assert port_problem("127.0.0.1", port) is None
    assert port_problem("192.0.2.1", free_port()) not in (None, "already in use")  # not this machine's address


def test_why_stopped_is_the_last_error_line_of_the_log_without_colours(tmp_path):
    code = r"""
        print("\x1b[92mINFO \x1b[0m: starting")
        print("2026-12-01T11:49:08Z ERROR [uvicorn.error] [Errno 98] address already in use")
        print("2026-12-01T11:49:08Z INFO [uvicorn.error] Application shutdown complete.")
        raise SystemExit(1)
    """
    tree = python(tmp_path, code, name="server")
    try:
        tree.popen.wait(timeout=BOUND)
    finally:
        tree.stop(grace=1)
    assert tree.why_stopped() == "2026-12-01T11:49:08Z ERROR [uvicorn.error] [Errno 98] address already in use"
    assert tree.exit_report() == (f"{tree.name} exited with code 1: {tree.why_stopped()} (log: {tree.log})")
    traceback = python(tmp_path, "import json; json.loads('{')", name="traceback")
    quiet = ProcessTree.start([sys.executable, "-c", "print('done')"], tmp_path / "quiet.log", offline_env(),
                              name="the quiet one")
    try:
        traceback.popen.wait(timeout=BOUND)
        quiet.popen.wait(timeout=BOUND)
    finally:
        traceback.stop(grace=1)
        quiet.stop(grace=1)
    assert traceback.why_stopped().startswith("json.decoder.JSONDecodeError: Expecting property name")
    assert quiet.why_stopped() == "done" and quiet.name == "the quiet one"
    assert quiet.exit_report().startswith("the quiet one exited with code 0: done")

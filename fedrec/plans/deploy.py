"""``fedrec plan deploy``: a loopback deployment over Flower's Deployment Engine.

It starts what a real deployment runs on separate machines, as local processes: one
SuperLink, one SuperNode per client data file (each with the plan, its own data file and
its client id as node config, its ClientApp in a process of its own) and submits the
run with ``flwr run``; the ServerApp (``flower_app.py``) runs fedrec's rounds. Every
process is stopped at the end, also on error or Ctrl-C; each one's log is kept in
``<logdir>/flower/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from fedrec.plans.format import PlanError
from fedrec.utilities.config import ConfigError


class DeploymentError(PlanError):
    """The loopback deployment could not finish; the message says where its logs are."""

_APP_TOML = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedrec-plan"
version = "1.0.0"
description = "fedrec plans over Flower: the ServerApp and ClientApp live in the installed fedrec package"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedrec"

[tool.flwr.app.components]
serverapp = "fedrec.plans.flower_app:server_app"
clientapp = "fedrec.plans.flower_app:client_app"

[tool.flwr.app.config]
fedrec-config = ""
logdir = ""
plan = ""
round-timeout = 120.0
connect-timeout = 60.0
min-clients = 1
"""


def add_deploy_parsers(inner: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    deploy = inner.add_parser("deploy", help="loopback deployment over Flower: a SuperLink, a SuperNode per "
                              "client data file running the plan, fedrec's rounds in the ServerApp")
    add_common(deploy)
    deploy.add_argument("--plan", required=True)
    deploy.add_argument("--data", nargs="+", required=True,
                        help="the clients' data files (from fedrec plan data), one SuperNode each")
    deploy.add_argument("--logdir", required=True, help="metrics, checkpoints and the Flower processes' logs")
    deploy.add_argument("--round_timeout", type=float, default=120.0,
                        help="seconds the server waits for a round's replies; later ones are dropped")
    deploy.add_argument("--min_clients", type=int,
                        help="fewer replies than this abandon the round (default: every selected client)")
    deploy.add_argument("--exit_client_at", metavar="CLIENT:ROUND", action="append", default=[],
                        help="(testing the policy) that client's ClientApp process exits at the start of that round")


def run_deploy_command(args: argparse.Namespace, config_from: Callable[[argparse.Namespace], dict[str, Any]]
                       ) -> int | None:
    config = config_from(args)
    summary = deploy_loopback(config, args.plan, args.data, args.logdir, round_timeout=args.round_timeout,
                              min_clients=args.min_clients, exits=_exits(args.exit_client_at))
    print(f"deployment done: {summary['rounds']} rounds, clients {sorted(int(c) for c in summary['clients'])}"
          + (f", dropped {summary['dropped']}" if summary["dropped"] else "") + f"; metrics in {args.logdir}")
    return None


def _exits(values: list[str]) -> dict[int, int]:
    out = {}
    for value in values:
        try:
            client, round_idx = (int(v) for v in value.split(":"))
        except ValueError:
            raise ConfigError(f"--exit_client_at {value!r}: expected CLIENT:ROUND, e.g. 2:1") from None
        out[client] = round_idx
    return out


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def _client_id(path: Path) -> int:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            value = (handle.metadata() or {}).get("client_id")
    except Exception as err:  # noqa: BLE001 - one line naming the file
        raise ConfigError(f"--data {path} is not a readable client data file ({err})") from None
    if value is None:
        raise ConfigError(f"--data {path} does not say which client it is (no client_id in its metadata); "
                          "write client files with: fedrec plan data --clients ...")
    return int(value)


def deploy_loopback(config: dict[str, Any], plan: str | Path, data: list[str | Path], logdir: str | Path,
                    round_timeout: float = 120.0, min_clients: int | None = None,
                    exits: dict[int, int] | None = None, timeout: float = 1800.0) -> dict[str, Any]:
    """Run the loopback deployment to its end; returns ``deployment.json``'s summary."""
    import importlib.util

    from fedrec.plans.format import read_plan

    if importlib.util.find_spec("flwr") is None:
        raise ConfigError("fedrec plan deploy runs over Flower, which is not installed: "
                          "pip install -e '.[deploy]' (make install does)")
    plan = Path(plan).resolve()
    read_plan(plan)  # a bad plan fails here, before any process starts
    files = [Path(p).resolve() for p in data]
    for path in files:
        if not path.is_file():
            raise ConfigError(f"--data {path} does not exist")
    clients = [_client_id(p) for p in files]
    if len(set(clients)) != len(clients):
        raise ConfigError(f"--data: two files hold the same client ({clients})")
    num_workers = int(config["fl"]["num_workers"])
    if sorted(clients) != list(range(num_workers)):
        raise ConfigError(f"fl.num_workers is {num_workers} but --data holds clients {sorted(clients)}: the "
                          "server's split must be the clients', 0..fl.num_workers-1 (cut them with "
                          "fedrec plan data --clients)")
    logdir = Path(logdir).resolve()
    flower = logdir / "flower"
    flower.mkdir(parents=True, exist_ok=True)
    (flower / "app").mkdir(exist_ok=True)
    (flower / "app" / "pyproject.toml").write_text(_APP_TOML)
    config_file = flower / "fedrec-config.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    # Flower 1.42 serves the Fleet, Control and Runtime APIs on one HTTP port
    link, *node_ports = _free_ports(1 + len(files))
    home = flower / "home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    env = dict(os.environ, FLWR_HOME=str(home), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])))
    bin_dir = Path(sys.executable).parent
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])  # the SuperLink starts flower-superexec
    procs: list[subprocess.Popen] = []

    def start(name: str, argv: list[str]) -> subprocess.Popen:
        with open(flower / f"{name}.log", "w") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(argv, env=env, cwd=flower, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        procs.append(proc)
        return proc

    exits = exits or {}
    (logdir / "deployment.json").unlink(missing_ok=True)
    try:
        start("superlink", [str(bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                            "--port", str(link)])
        _wait_port(link, procs[0], flower / "superlink.log")
        for path, cid, port in zip(files, clients, node_ports):
            node_config = f"plan={json.dumps(str(plan))} data-file={json.dumps(str(path))} client-id={cid}"
            if cid in exits:
                node_config += f" fail-at-round={exits[cid]}"
            start(f"supernode-{cid}", [str(bin_dir / "flower-supernode"), "--insecure", "--superlink",
                                       f"127.0.0.1:{link}", "--port", str(port), "--node-config", node_config])
        run_config = " ".join([f"fedrec-config={json.dumps(str(config_file))}", f"logdir={json.dumps(str(logdir))}",
                               f"plan={json.dumps(str(plan))}", f"round-timeout={float(round_timeout)}",
                               f"min-clients={int(min_clients if min_clients is not None else len(files))}"])
        submit = start("flwr-run", [str(bin_dir / "flwr"), "run", str(flower / "app"), "loopback", "--stream",
                                    "--run-config", run_config])
        _wait_done(submit, logdir, flower, timeout)
    finally:
        for proc in reversed(procs):
            _stop(proc)
    summary_file = logdir / "deployment.json"
    if not summary_file.is_file():
        tail = (flower / "flwr-run.log").read_text()[-2000:] if (flower / "flwr-run.log").is_file() else ""
        raise DeploymentError(f"the deployment ended without a summary; see the logs in {flower}: {tail}")
    summary = json.loads(summary_file.read_text())
    if summary.get("error"):
        raise DeploymentError(f"the ServerApp failed in round {summary['rounds'] + 1}: {summary['error']} "
                              f"(logs in {flower})")
    return summary


def _wait_port(port: int, proc: subprocess.Popen, log: Path, wait: float = 60.0) -> None:
    """Until the SuperLink listens (submitting a run before that fails)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeploymentError(f"the SuperLink exited ({proc.returncode}): {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise DeploymentError(f"the SuperLink did not listen on port {port} within {wait:g}s; see {log}")


def _wait_done(submit: subprocess.Popen, logdir: Path, flower: Path, timeout: float) -> None:
    """Until the ServerApp wrote its summary (``flwr run --stream`` may keep streaming)."""
    deadline = time.monotonic() + timeout
    summary = logdir / "deployment.json"
    while time.monotonic() < deadline:
        if summary.is_file():
            return
        if submit.poll() is not None and submit.returncode != 0:
            raise DeploymentError(f"flwr run failed ({submit.returncode}): "
                               f"{(flower / 'flwr-run.log').read_text()[-2000:]}")
        time.sleep(0.2)
    raise DeploymentError(f"the deployment did not finish within {timeout:g}s; logs in {flower}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def command_line(argv: list[str]) -> str:
    return shlex.join(argv)

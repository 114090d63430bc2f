"""Spawn mode's watcher: a dead MPI worker must not end ``fedrec simulate`` without a word.

With ``fl.backend: mpi`` in a plain run (no mpiexec) the simulation spawns its worker
processes through MPI: the process becomes an MPI singleton and MPICH's process manager
(hydra) starts the workers. When one worker dies (killed, out of memory), hydra cleans
up the whole job: it kills the simulation's whole process group with SIGKILL, so
``fedrec`` would end with exit status 137 and no message, whatever it tried to catch.

So in spawn mode ``fedrec simulate`` runs the simulation in a child process in its own
session and only waits for it. When the child dies from a signal, the watcher reads the
workers' crash markers (``logdir/mpi/rank-*.json``, left by a worker that stops
mid-round; the next ``--resume`` reports them too) and says which workers were running
which clients, and how to resume. Ctrl-C and SIGTERM are passed on to the child, which
stops and prints its own "interrupted; resume with" line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

__all__ = ["CHILD_ENV", "as_watched_child", "needs_watcher", "run_watched"]

CHILD_ENV = "FEDREC_SPAWN_CHILD"
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def needs_watcher(config: Dict[str, Any]) -> bool:
    """True for a plain process whose simulation would spawn MPI workers."""
    from fedrec.federated.mpi_env import launcher_world_size
    from fedrec.federated.config import fl_config_from

    if os.environ.get(CHILD_ENV) or "mpi4py.futures" in sys.modules or launcher_world_size() > 1:
        return False
    return fl_config_from(config).backend == "mpi"


def as_watched_child() -> None:
    """In the watched child: Ctrl-C passed on by the watcher raises KeyboardInterrupt here
    (the child may have inherited an ignored SIGINT, as in a background job)."""
    if os.environ.get(CHILD_ENV):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run_watched(argv: List[str], logdir: Path, resume_command: str) -> int:
    """Run ``fedrec <argv>`` in a child process and wait; returns the exit status to use."""
    import fedrec

    root = str(Path(fedrec.__file__).resolve().parent.parent)
    env = dict(os.environ, **{CHILD_ENV: "1"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    child = subprocess.Popen([sys.executable, "-m", "fedrec.cli", *argv], env=env, start_new_session=True)
    forwarded: List[int] = []

    def forward(signum: int, frame: Any) -> None:
        forwarded.append(signum)
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    try:
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status >= 0:
        return status
    if forwarded:  # the child was stopped on request and killed before it could say so
        print(f"fedrec simulate: interrupted; resume with: {resume_command}", file=sys.stderr)
        return 130
    print(_death_message(logdir, -status, child.pid, resume_command), file=sys.stderr)
    return 1


def _death_message(logdir: Path, signum: int, pid: int, resume_command: str) -> str:
    from fedrec.federated.mpi_backend import describe_clients, read_crash_markers
    from fedrec.utilities.checkpoint import CheckpointManager

    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    markers = read_crash_markers(logdir)
    if markers:
        running = "; ".join(f"rank {m['rank']} (pid {m['pid']} on {m['host']}): clients "
                            f"{describe_clients(m['clients'])}" for m in markers)
        what = (f"an MPI process died during round {markers[0]['round']} (0-based) and MPI "
                f"stopped the whole job ({name}); workers mid-round: {running}")
    else:
        what = f"the simulation process (pid {pid}) was killed by {name}"
    newest = CheckpointManager(Path(logdir) / "checkpoints").latest()
    kept = f"the last round's checkpoint, {newest}, is intact" if newest else "no round had finished"
    return (f"fedrec simulate: {what}\n"
            f"  {kept}: find the cause (memory? a killed process?) and resume with: {resume_command}")

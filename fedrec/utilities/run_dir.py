"""A run's ``--logdir`` as a resource: one writer at a time, earlier runs archived, metrics repaired.

Why each part exists:

* :class:`LogdirLock`: two runs writing into one logdir silently mix their metrics,
  configs and checkpoints. A run holds an OS lock (``fcntl.flock``) on
  ``logdir/.fedrec.lock`` while it writes; the lock file says who holds it (pid, host,
  command, start time) so a second writer is refused with a message naming the first.
  The OS drops the lock when its process dies, however it dies, so a stale lock file
  left by a killed run never blocks the next one.
* :func:`archive_previous_run`: a fresh run into a used logdir moves the earlier run's
  files to ``previous/<time>/`` rather than deleting or mixing them. Callers do it only
  after everything about the new run has been checked.
* :func:`repair_metrics`: ``--resume`` drops the ``metrics.jsonl`` records written after
  the checkpoint (the resumed run writes them again) and a torn last line left by a
  killed run, which would otherwise be glued to the next record.
* :func:`remove_partial_writes`: files are written to a temporary name and renamed; a
  run killed mid-write leaves the temporary file (a partial checkpoint can be
  gigabytes), which the next run in the logdir removes, holding the lock.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_FILE",
    "RUN_FILES",
    "LogdirBusyError",
    "LogdirLock",
    "archive_previous_run",
    "launcher_rank",
    "remove_partial_writes",
    "repair_metrics",
]

LOCK_FILE = ".fedrec.lock"
# What a run leaves in its logdir (archived when a fresh run starts in the same folder).
RUN_FILES = ("metrics.jsonl", "config.yml", "run.log", "checkpoints", "summary.json", "partition.npz",
             "client_state",  # client_state: per-client state a fresh run must not read
             "devices.npz", "virtual_clock.jsonl", "participation.json")  # fl.devices' profiles and records
PREVIOUS = "previous"


class LogdirBusyError(RuntimeError):
    """Another live process is writing into the logdir; the message names it."""


def launcher_rank() -> int:
    """This process's rank when an MPI launcher (mpiexec/mpirun/srun) started it, else 0."""
    for var in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def _command_line() -> str:
    argv = list(sys.argv) or ["?"]
    name = Path(argv[0]).name
    argv[0] = "fedrec" if name in ("cli.py", "__main__.py") else name  # python -m fedrec.cli
    return shlex.join(argv)


class LogdirLock:
    """An exclusive, non-blocking lock on ``logdir`` for one run (a context manager).

    Only MPI rank 0 locks: the other ranks of a run serve rank 0 and never write run
    files. The lock file is removed on release; a lock file without a live holder (a
    killed run's) is simply taken over.
    """

    def __init__(self, logdir: str | Path, command: Optional[str] = None) -> None:
        self.logdir = Path(logdir)
        self.path = self.logdir / LOCK_FILE
        self.command = command or _command_line()
        self._fd: Optional[int] = None

    def acquire(self) -> "LogdirLock":
        if fcntl is None or launcher_rank() != 0 or self._fd is not None:
            return self
        self.logdir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise LogdirBusyError(self._busy_message(holder)) from None
            except BaseException:
                os.close(fd)
                raise
            # The holder before us may have removed the file between our open and our
            # lock: then we hold a lock on a deleted file; open the path again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)  # while still locked: no one else can be using it
        except OSError:
            pass
        os.close(fd)  # releases the lock

    def _busy_message(self, holder: Dict[str, Any]) -> str:
        who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
               f"{holder.get('started', '?')}: {holder.get('command', '?')}") if holder else "another process"
        return (f"{self.logdir} is in use by another fedrec run ({who}); two runs in one logdir "
                "would mix their files: wait for it to finish, stop it, or use another --logdir")

    def __enter__(self) -> "LogdirLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> Dict[str, Any]:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        holder = json.loads(text)
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def archive_previous_run(logdir: Path) -> Optional[Path]:
    """Move an earlier run's files out of ``logdir`` (into ``previous/<time>``), if any."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        return None
    found = [logdir / name for name in RUN_FILES if (logdir / name).exists()]
    found += sorted(logdir.glob("events.out.tfevents.*"))
    if not found:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = logdir / PREVIOUS / stamp
    n = 1
    while target.exists():
        n += 1
        target = logdir / PREVIOUS / f"{stamp}-{n}"
    target.mkdir(parents=True)
    for path in found:
        shutil.move(str(path), str(target / path.name))
    return target


# Temporary names of the logdir's atomic writes (checkpoint.py, logger.py, simulation.py,
# partition.py, repair_metrics), relative to the logdir.
_PARTIAL_WRITES = ("checkpoints/.ckpt-*.pt.*.tmp", "checkpoints/.best.pt.*.tmp", "metrics.jsonl.tmp",
                   "config.yml.tmp", "summary.json.tmp", "participation.json.tmp", "partition.npz.tmp-*")


def remove_partial_writes(logdir: Path) -> List[str]:
    """Remove temporary files a killed run left half-written; returns a note, if any.

    Call it only while holding the :class:`LogdirLock`: no other run is writing here.
    """
    removed = 0
    for pattern in _PARTIAL_WRITES:
        for path in Path(logdir).glob(pattern):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
    return [f"removed {removed} partial file(s) that a killed run left in {logdir}"] if removed else []


def repair_metrics(path: Path, step: int, rerun_phases: Iterable[str] = (), unit: str = "step") -> List[str]:
    """Make ``metrics.jsonl`` end where a resume from ``step`` starts; returns notes.

    Drops the records logged after ``step`` and those of ``rerun_phases`` logged at
    ``step`` (e.g. the final ``test`` record, written after the last checkpoint), since
    the resumed run writes them again; and drops a torn last line (a run killed while
    writing it). The file is rewritten atomically, and only when something changed.
    """
    path = Path(path)
    if not path.is_file():
        return []
    rerun = set(rerun_phases)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    kept: List[str] = []
    dropped = torn = 0
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if record is None and index == len(lines) - 1:
            torn = 1  # the last line, cut short when an earlier run was killed
            continue
        record_step = record.get("step") if isinstance(record, dict) else None
        if isinstance(record_step, int) and (record_step > step or
                                             (record_step == step and record.get("phase") in rerun)):
            dropped += 1
            continue
        kept.append(line if line.endswith("\n") else line + "\n")
    notes = []
    if torn:
        notes.append(f"dropped the torn last line of {path} (an earlier run stopped while writing it)")
    if dropped:
        notes.append(f"dropped {dropped} {path.name} line(s) logged after {unit} {step}'s checkpoint; "
                     "the resumed run writes them again")
    if torn or dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)
    return notes


def start_writing(logdir: Path, resume_step: Optional[int], resume_requested: bool,
                  rerun_phases: Iterable[str] = (), unit: str = "step") -> List[str]:
    """The first changes a run makes to its (locked, checked) logdir; returns notes.

    Half-written files of a killed run go; a resumed run (``resume_step``) drops the
    metrics lines after its checkpoint, since it writes them again; a fresh run moves an
    earlier run's files to ``previous/<time>/``.
    """
    notes = remove_partial_writes(logdir)
    if resume_step is not None:
        return notes + repair_metrics(logdir / "metrics.jsonl", resume_step, rerun_phases=rerun_phases, unit=unit)
    if resume_requested:
        notes.append(f"--resume: no checkpoint under {logdir / 'checkpoints'}; starting fresh")
    archived = archive_previous_run(logdir)
    if archived is not None:
        notes.append(f"{logdir} held an earlier run: moved its files to {archived} "
                     "(pass --resume to continue a run instead)")
    return notes

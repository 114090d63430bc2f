"""The ``mpi`` backend: client work on MPI processes through ``mpi4py.futures``.

Launch with ``mpiexec -n K python -m mpi4py.futures train_fl.py ...`` (rank 0 runs the
simulation, ranks 1..K-1 serve it; see docs/mpi.md), or set ``fl.backend: mpi`` in a
plain run to spawn ``fl.mpi_processes`` MPI processes. Each MPI process builds its own
model replica and opens the memory-mapped data once (pool initializer); the data are
never shipped.

A round is one task per MPI process, carrying its blocks of clients (balanced by
sample count, ``assign_blocks``). The global weights travel once per process and round,
and each process replies once: the summed update of each of its blocks (linear
algorithms) or every client's model. The fixed blocks make the sums, and so the
results, identical for the local backend and any number of processes.

The bulk data (weights down, updates up) move as one flat byte buffer per message
(``pack``/``unpack``: tensors leave the pickle stream and travel as raw bytes). Under
``python -m mpi4py.futures`` they take a direct channel on ``COMM_WORLD`` between rank 0
and the worker, with blocking point-to-point calls that both sides are in at the same
time: ``mpi4py.futures`` itself carries only the small task and its completion. Its
pool polls with sleeps (``MPI4PY_FUTURES_BACKOFF``, 1 ms), so that idle processes leave
the CPU to the busy ones, but a large message then moves one MPI progress step per
poll (about 8 KB per millisecond with MPICH's shared-memory transport: 2 s for 14 MB).
Rank 0 waits for the round the same way, sleeping between probes, so it does not take
CPU from the MPI processes. Spawned processes (no shared ``COMM_WORLD``) send the same packed
buffers through the futures instead.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pickle
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from fedrec.federated.backends import Backend, Block, assign_blocks
from fedrec.federated.client_runner import ClientRunner, JobResult, PeerStarts, RoundJob
from fedrec.federated.context import RoundContext
from fedrec.utilities.registry import RegistryError

log = logging.getLogger("fedrec")

INSTALL_HINT = "pip install 'fedrec[mpi]'  (mpi4py and the mpich wheel from PyPI; or `make install`)"

# Tags of the direct channel on COMM_WORLD (mpi4py.futures uses its own communicator).
TAG_REQUEST = 7301  # worker -> rank 0: (token, job): send me the round's weights
TAG_WEIGHTS = 7302  # rank 0 -> worker: packed weights (header, then bytes on TAG + 1)
TAG_RESULT = 7304  # worker -> rank 0: packed ((token, job), JobResult) (bytes on TAG + 1)
_CHUNK = 1 << 30  # bytes per MPI message of a buffer (counts stay far below INT_MAX)
_ALIGN = 64

_RUNNER: Optional[ClientRunner] = None


class MPIUnavailableError(RegistryError):
    """``fl.backend: mpi`` without mpi4py (or without an MPI library)."""


class MPIProcessError(RuntimeError):
    """A client failed on an MPI process; names the rank, round and client."""


class StoppedByAnotherTask(MPIProcessError):
    """A task of :meth:`MPIBackend.run_on_every_process` that stopped because another
    one failed: reported after that failure's own error, never in its place."""


WorkerProcessError = MPIProcessError  # the name before "worker" was kept for simulated clients


# -- packing: tensors as one flat byte buffer ----------------------------------------------
class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, tensors: List[torch.Tensor]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors = tensors
        self.seen: Dict[int, int] = {}

    def persistent_id(self, obj: Any) -> Any:
        if (isinstance(obj, torch.Tensor) and type(obj) in (torch.Tensor, torch.nn.Parameter)
                and obj.layout == torch.strided):
            index = self.seen.get(id(obj))
            if index is None:
                index = self.seen[id(obj)] = len(self.tensors)
                self.tensors.append(obj)
            return index
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, tensors: List[torch.Tensor]) -> None:
        super().__init__(file)
        self.tensors = tensors

    def persistent_load(self, pid: Any) -> Any:
        return self.tensors[pid]


@dataclasses.dataclass
class Packed:
    """An object whose CPU tensors were taken out of its pickle into one byte buffer."""

    header: bytes  # the pickle, with tensors as references
    specs: List[Tuple[str, Tuple[int, ...], int, bool, bool, str]]  # dtype, shape, offset, grad, param, device
    data: np.ndarray  # uint8, every tensor's bytes at its offset

    @property
    def nbytes(self) -> int:
        return len(self.header) + int(self.data.nbytes)


def pack(obj: Any) -> Packed:
    """``obj`` as a small pickle plus one flat buffer of its tensors' bytes (exact copies)."""
    tensors: List[torch.Tensor] = []
    stream = io.BytesIO()
    _Pickler(stream, tensors).dump(obj)
    specs, offset = [], 0
    for t in tensors:
        specs.append((str(t.dtype).removeprefix("torch."), tuple(t.shape), offset,
                      bool(t.requires_grad), isinstance(t, torch.nn.Parameter), str(t.device)))
        offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    data = np.empty(offset, dtype=np.uint8)
    for t, spec in zip(tensors, specs):
        if t.numel():
            start = spec[2]
            raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            data[start:start + raw.numel()] = raw.numpy()
    return Packed(stream.getvalue(), specs, data)


def unpack(packed: Packed) -> Any:
    """The object back; its CPU tensors are views into ``packed.data`` (no copy), the
    others are copied to their device (to the CPU where this process has no such device)."""
    tensors = []
    for dtype_name, shape, offset, requires_grad, is_param, device in packed.specs:
        dtype = getattr(torch, dtype_name)
        numel = int(np.prod(shape, dtype=np.int64))
        if numel:
            t = torch.frombuffer(packed.data, dtype=dtype, count=numel, offset=offset).reshape(shape)
        else:
            t = torch.empty(shape, dtype=dtype)
        if device != "cpu" and _has_device(device):
            t = t.to(device)
        if is_param:
            t = torch.nn.Parameter(t, requires_grad=requires_grad)
        elif requires_grad:
            t.requires_grad_(True)
        tensors.append(t)
    return _Unpickler(io.BytesIO(packed.header), tensors).load()


def _has_device(device: str) -> bool:
    try:
        torch.empty(0, device=device)
        return True
    except (RuntimeError, AssertionError):
        return False


def _send_packed(comm: Any, packed: Packed, dest: int, tag: int) -> None:
    comm.send((packed.header, packed.specs, int(packed.data.nbytes)), dest=dest, tag=tag)
    for start in range(0, packed.data.nbytes, _CHUNK):
        comm.Send(packed.data[start:start + _CHUNK], dest=dest, tag=tag + 1)


def _recv_packed(comm: Any, source: int, tag: int) -> Packed:
    header, specs, nbytes = comm.recv(source=source, tag=tag)
    data = np.empty(nbytes, dtype=np.uint8)
    for start in range(0, nbytes, _CHUNK):
        comm.Recv(data[start:start + _CHUNK], source=source, tag=tag + 1)
    return Packed(header, specs, data)


# -- MPI processes -------------------------------------------------------------------
def _rank() -> int:
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank()


def _init_process(config: Dict[str, Any], logdir: str, config_path: Optional[str]) -> None:
    """Pool initializer: one replica, the data and the partition, once per process."""
    global _RUNNER
    from fedrec.federated.client_runner import build_client_runner

    try:
        _RUNNER = build_client_runner(config, Path(logdir), config_path=config_path)
        # this process only trains clients: it runs at fl.client_threads throughout
        torch.set_num_threads(_RUNNER.fl.client_threads)
    except BaseException as err:
        print(f"fedrec: MPI rank {_rank()} on {socket.gethostname()} failed to start: "
              f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise


def _marker_path(logdir: str, rank: int) -> Path:
    return Path(logdir) / "mpi" / f"rank-{rank}.json"


def _run_job(job: RoundJob, logdir: str, token: Optional[Tuple[int, int]], weights: Optional[Packed]
             ) -> Tuple[Optional[Packed], Dict[str, float]]:
    """Runs on an MPI process; records what it is doing, so that a crash can be named.

    With ``token`` (round, job) the weights come and the result goes over the direct
    channel, and only timings return through the future; otherwise ``weights`` came in
    the task and the packed result returns.
    """
    start = time.perf_counter()
    rank = _rank()
    marker = _marker_path(logdir, rank)
    marker.parent.mkdir(parents=True, exist_ok=True)
    clients = [c for _, ids in job.blocks for c in ids]
    marker.write_text(json.dumps({"rank": rank, "pid": os.getpid(), "host": socket.gethostname(),
                                  "round": job.round_idx, "clients": clients}))
    try:  # an error is reported through the future; only a killed process leaves the marker
        if _RUNNER is None:
            raise MPIProcessError(f"rank {rank}: MPI process was not initialised")
        comm = None
        if token is not None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
            comm.send(token, dest=0, tag=TAG_REQUEST)
            weights = _recv_packed(comm, 0, TAG_WEIGHTS)
        received = time.perf_counter()
        global_state, server_values = unpack(weights)
        job = dataclasses.replace(job, global_state=global_state,
                                  context=dataclasses.replace(job.context, server_values=server_values))
        try:
            result = _RUNNER.run_job(job)
        except Exception as err:  # re-raised on rank 0; the message names the round and client
            raise MPIProcessError(f"rank {rank}: {err}") from None
        computed = time.perf_counter()
        packed: Optional[Packed] = pack(result)
        if comm is not None:
            _send_packed(comm, Packed(pickle.dumps((token, packed.header)), packed.specs, packed.data),
                         0, TAG_RESULT)
            packed = None
    finally:
        marker.unlink(missing_ok=True)
    timings = {"rank": rank, "receive": received - start, "compute": computed - received,
               "send": time.perf_counter() - computed}
    return packed, timings


def read_crash_markers(logdir: Path) -> List[Dict[str, Any]]:
    """What each MPI process left mid-round (rank, pid, host, round, clients), by rank."""
    found = []
    for path in sorted((Path(logdir) / "mpi").glob("rank-*.json")):
        try:
            info = json.loads(path.read_text())
            found.append({"rank": info["rank"], "pid": info["pid"], "host": info.get("host", "?"),
                          "round": info["round"], "clients": list(info["clients"])})
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return found


def describe_clients(clients: Sequence[int]) -> str:
    more = f" and {len(clients) - 10} more" if len(clients) > 10 else ""
    return f"{list(clients[:10])}{more}"


def report_crashed_processes(logdir: Path) -> List[str]:
    """Messages for MPI processes that were mid-round when an earlier run stopped
    (a process killed, or the whole job aborted because one died); clears the markers."""
    messages = [
        f"an earlier run stopped while MPI rank {info['rank']} (pid {info['pid']} on {info['host']}) "
        f"was running round {info['round']} (0-based), clients {describe_clients(info['clients'])}; "
        "that round did not finish and is run again from the last checkpoint"
        for info in read_crash_markers(logdir)]
    for path in (Path(logdir) / "mpi").glob("rank-*.json"):
        path.unlink(missing_ok=True)
    return messages


# -- rank 0 -------------------------------------------------------------------------------
def _mpiexec_on_path() -> None:
    """Spawning MPI processes needs ``mpiexec`` on PATH; the mpich wheel puts it beside python."""
    if shutil.which("mpiexec") is None:
        here = Path(sys.executable).parent
        if (here / "mpiexec").exists():
            os.environ["PATH"] = f"{here}{os.pathsep}{os.environ.get('PATH', '')}"


def _evaluate_with_all_cores() -> None:
    """Rank 0 evaluates while the MPI processes wait: let it use the cores it may run on.

    Under mpiexec, OpenMP runtimes start each process with one thread; a plain process
    (the local backend) has one per core. Client training is unaffected (it runs on the
    MPI processes, at ``fl.client_threads``). An explicit OMP_NUM_THREADS is respected.
    """
    if "OMP_NUM_THREADS" in os.environ or not hasattr(os, "sched_getaffinity"):
        return
    cores = len(os.sched_getaffinity(0))
    if cores > torch.get_num_threads():
        torch.set_num_threads(cores)


def require_mpi4py(import_mpi: bool = True) -> None:
    """Raise :class:`MPIUnavailableError` saying how to install mpi4py when it is missing
    (checked before a run touches its logdir). ``import_mpi=False`` only looks for the
    package, without starting MPI in this process."""
    try:
        if not import_mpi:
            import importlib.util

            if importlib.util.find_spec("mpi4py") is None:
                raise ImportError("No module named 'mpi4py'")
            return
        from mpi4py import MPI  # noqa: F401
        from mpi4py.futures import MPIPoolExecutor  # noqa: F401
    except ImportError as err:
        raise MPIUnavailableError(
            f"fl.backend 'mpi' needs mpi4py and an MPI library, which are not installed "
            f"({err}): {INSTALL_HINT}; or use fl.backend: local") from None


class MPIBackend(Backend):
    name = "mpi"

    def __init__(self, config: Dict[str, Any], logdir: Path, client_sizes: np.ndarray,
                 processes: Optional[int] = None, config_path: Optional[str] = None,
                 rows_for: Optional[Callable[[List[int], int], Dict[str, torch.Tensor]]] = None) -> None:
        require_mpi4py()
        from mpi4py import MPI
        from mpi4py.futures import MPIPoolExecutor

        from fedrec.federated.mpi_env import launched_under_mpi_futures

        self.MPI = MPI
        self.rows_for = rows_for  # sparse mode: the embedding rows a group of clients uses
        self.logdir = Path(logdir)
        self.sizes = np.asarray(client_sizes)
        for message in report_crashed_processes(self.logdir):
            log.warning(message)
        # The direct channel needs COMM_WORLD shared with the MPI processes (python -m
        # mpi4py.futures) and MPI calls from two threads (the pool's and ours).
        self.direct = launched_under_mpi_futures() and MPI.Query_thread() == MPI.THREAD_MULTIPLE
        if launched_under_mpi_futures():
            _evaluate_with_all_cores()
        else:
            _mpiexec_on_path()
            if processes is None:
                processes = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                else (os.cpu_count() or 1))
        self.executor = MPIPoolExecutor(
            max_workers=processes,
            initializer=_init_process,
            initargs=(config, str(self.logdir), config_path),
        )
        self.processes = self._count_processes(processes)
        self.last_timings: List[Dict[str, float]] = []
        log.info("mpi backend: %d MPI processes (%s)", self.processes,
                 "direct channel" if self.direct else "data through mpi4py.futures")

    def _count_processes(self, requested: Optional[int]) -> int:
        num = getattr(self.executor, "num_workers", None)
        if num is None:  # older mpi4py
            num = max(self.MPI.COMM_WORLD.Get_size() - 1, 1)
        num = int(num)
        return min(num, requested) if requested else num

    def run_round(self, context: RoundContext, blocks: List[Block], global_state: Dict[str, Any]
                  ) -> List[JobResult]:
        round_idx = context.round_idx
        groups = [g for g in assign_blocks(blocks, self.sizes, self.processes) if g]
        weights = self._weights_for(groups, global_state, context.server_values, context.round_idx)
        futures = []
        for index, group in enumerate(groups):
            # the tensors travel in the packed weights, not in the task
            job = RoundJob(dataclasses.replace(context, server_values={}), group, {})
            if self.direct:
                futures.append(self.executor.submit(_run_job, job, str(self.logdir), (round_idx, index), None))
            else:
                futures.append(self.executor.submit(_run_job, job, str(self.logdir), None, weights[index]))
        received = self._serve(futures, weights, round_idx) if self.direct else {}
        results, errors, timings = [], [], []
        for index, future in enumerate(futures):
            try:
                packed, timing = future.result()
            except Exception as err:
                errors.append(err)
                continue
            timings.append(timing)
            results.append(unpack(received[index] if self.direct else packed))
        if errors:
            raise MPIProcessError("; ".join(_describe(e) for e in errors)) from errors[0]
        self.last_timings = timings
        if log.isEnabledFor(logging.DEBUG):
            log.debug("round %d on %d processes: %s", round_idx, len(groups),
                      "; ".join(f"rank {t['rank']}: weights {t['receive']:.3f}s, clients "
                                f"{t['compute']:.3f}s, reply {t['send']:.3f}s" for t in timings))
        return results

    @property
    def pool_size(self) -> int:
        """Every MPI process of the pool (``run_on_every_process`` runs a task on each)."""
        num = getattr(self.executor, "num_workers", None)
        return int(num) if num is not None else max(self.MPI.COMM_WORLD.Get_size() - 1, 1)

    def run_on_every_process(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> List[Any]:
        """``fn(task)`` for ``pool_size`` tasks at once, one on each MPI process (tasks that
        talk to each other, as a graph's peer groups do); their results in task order."""
        if len(tasks) != self.pool_size:
            raise MPIProcessError(f"{len(tasks)} tasks for {self.pool_size} MPI processes")
        futures = [self.executor.submit(fn, task) for task in tasks]
        results, errors = [], []
        for future in futures:
            try:
                results.append(future.result())
            except Exception as err:
                errors.append(err)
        if errors:  # the first failure first; the others stopped because of it
            errors.sort(key=lambda e: isinstance(e, StoppedByAnotherTask))
            raise MPIProcessError("; ".join(_describe(e) for e in errors[:1])) from errors[0]
        return results

    def _weights_for(self, groups: List[List[Block]], global_state: Dict[str, Any],
                     server_values: Dict[str, Any], round_idx: int = 0) -> List[Packed]:
        """What each process downloads with the round's server values: the whole model,
        packed once per round, or in sparse mode a submodel with the MLPs and only the
        rows its clients use (table-shaped server values cut the same way)."""
        if isinstance(global_state, PeerStarts):  # each process gets its own clients' models
            return [pack((PeerStarts({c: global_state[c] for _, ids in group for c in ids}), server_values))
                    for group in groups]
        if self.rows_for is None:
            return [pack((global_state, server_values))] * len(groups)
        from fedrec.federated.update import submodel

        packed = []
        for group in groups:
            rows = self.rows_for([c for _, ids in group for c in ids], round_idx)
            packed.append(pack((submodel(global_state, rows), submodel(server_values, rows))))
        return packed

    def _serve(self, futures: Sequence[Any], weights: List[Packed], round_idx: int) -> Dict[int, Packed]:
        """Rank 0 during a round: send the weights to each worker that asks, receive each
        result; sleep between probes (up to 1 ms) so that the MPI processes have the CPU."""
        MPI = self.MPI
        comm = MPI.COMM_WORLD
        status = MPI.Status()
        received: Dict[int, Packed] = {}
        pause, stalled_since = 0.0, None
        while True:
            if comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_REQUEST, status=status):
                source = status.Get_source()
                token = comm.recv(source=source, tag=TAG_REQUEST)
                if token[0] != round_idx:
                    raise MPIProcessError(f"rank {source} asked for round {token[0]}'s weights "
                                             f"during round {round_idx}")
                _send_packed(comm, weights[token[1]], source, TAG_WEIGHTS)
                pause = 0.0
                continue
            if comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_RESULT, status=status):
                source = status.Get_source()
                packed = _recv_packed(comm, source, TAG_RESULT)
                (result_round, index), header = pickle.loads(packed.header)
                if result_round != round_idx:
                    raise MPIProcessError(f"rank {source} sent a result of round {result_round} "
                                             f"during round {round_idx}")
                received[index] = Packed(header, packed.specs, packed.data)
                pause = 0.0
                continue
            if all(f.done() for f in futures):
                missing = [i for i, f in enumerate(futures) if f.exception() is None and i not in received]
                if not missing:
                    return received
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 60:
                    raise MPIProcessError(f"round {round_idx}: jobs {missing} finished without "
                                             "sending their results")
            time.sleep(pause)
            pause = min(1e-3, max(2 * pause, 2e-5))

    def close(self) -> None:
        self.executor.shutdown(wait=True)


def _describe(err: BaseException) -> str:
    text = str(err)
    if type(err).__name__ == "BrokenExecutor" or "initializer failed" in text:
        return (f"MPI processes failed to start ({text}); their error is printed above "
                "as 'fedrec: MPI rank N ... failed to start'")
    return text

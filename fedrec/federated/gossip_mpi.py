"""A graph's peer groups on MPI processes: each process runs its own peers, and the
processes exchange only their boundary peers' models, directly with each other.

Rank 0 submits one task per MPI process of the pool (``MPIBackend.run_on_every_process``);
task ``k`` runs group ``k`` of the placement. ``mpi4py.futures`` decides which process
gets which task, so a round starts with a handshake: every task tells every other
process which group it runs (a few bytes), then each group

1. trains its peers (``PeerGroup.begin_round``), from the models in its stores;
2. sends each other group the models of its peers that the other group's peers may ask
   for (one packed buffer per pair of groups that share a link, non-blocking sends, so no
   order of sends can deadlock) and receives the same from them;
3. mixes its peers (``finish_round``) and returns its per-block sums, stats and bytes.

A group whose training fails still takes part in the exchange, sending its error instead
of models, so that no message is left pending (MPI would then fail at exit); the groups it
reaches stop after the exchange, and rank 0 reports the first error. (A group that cannot
even be built tells every other group, ``TAG_ABORT``.) Every wait polls with short sleeps,
like rank 0's, so that waiting processes leave the CPU to the working ones. Under
``mpiexec ... -m mpi4py.futures`` the processes are ``COMM_WORLD``'s ranks 1..K-1; spawned
ones (``fl.backend: mpi`` in a plain run) have their own ``COMM_WORLD``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from fedrec.federated import mpi_backend
from fedrec.federated.gossip import PartResult, PeerGroup, initial_path
from fedrec.federated.mpi_backend import MPIProcessError, Packed, StoppedByAnotherTask, pack, unpack

TAG_HELLO = 7310  # group k runs on this rank, this round
TAG_MODELS = 7311  # packed boundary models (header; bytes on TAG + 1)
TAG_ABORT = 7313  # this group failed: stop waiting for it
HANDSHAKE_SECONDS = 300.0  # how long a group waits for the others to start

_GROUPS: Dict[Tuple[int, int, str], PeerGroup] = {}
_RUNS: Dict[str, Tuple[Any, Any, Dict[str, Any]]] = {}  # logdir -> (topology, order, first model)


@dataclasses.dataclass
class GroupTask:
    round_idx: int
    checkpointed_round: int
    part: int
    parts: int
    logdir: str


def run_groups(backend: Any, logdir: Path, round_idx: int, checkpointed_round: int) -> List[PartResult]:
    """Rank 0: one task per MPI process, each running one group; their results."""
    parts = backend.pool_size
    tasks = [GroupTask(round_idx, checkpointed_round, k, parts, str(logdir)) for k in range(parts)]
    return [unpack(packed) for packed in backend.run_on_every_process(run_group, tasks)]


# -- on an MPI process ---------------------------------------------------------------------------
def _world() -> Tuple[Any, List[int]]:
    """The communicator the pool's processes share, and their ranks in it."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    spawned = MPI.Comm.Get_parent() != MPI.COMM_NULL
    return comm, list(range(comm.Get_size())) if spawned else list(range(1, comm.Get_size()))


def _group(task: GroupTask) -> PeerGroup:
    """This process's group ``task.part``. ``mpi4py.futures`` may give a process another
    group in a later round: the graph, the order and the first model are kept per run, the
    group's peers are rebuilt (their state is in the stores)."""
    from safetensors.torch import load_file

    from fedrec.federated.placement import ORDER_FILE, graph_digest, place, read_order
    from fedrec.federated.topology import build_topology

    key = (task.part, task.parts, task.logdir)
    group = _GROUPS.get(key)
    if group is not None:
        return group
    runner = mpi_backend._RUNNER
    if runner is None:
        raise MPIProcessError("MPI process was not initialised")
    run = _RUNS.get(task.logdir)
    if run is None:
        topology = build_topology(runner.fl)
        logdir = Path(task.logdir)
        order = read_order(logdir / ORDER_FILE, graph_digest(topology.graph, topology.placement))
        if order is None:
            raise MPIProcessError(f"{logdir / ORDER_FILE} is missing or was made for another graph")
        initial = {k: v.clone() for k, v in load_file(str(initial_path(logdir))).items()}
        _RUNS.clear()
        run = _RUNS[task.logdir] = (topology, order, initial)
    topology, order, initial = run
    _GROUPS.clear()  # one group per process and round
    group = _GROUPS[key] = PeerGroup(runner, topology, place(order, runner.fl.reduce_blocks, task.parts), task.part,
                                     Path(task.logdir), initial, runner.fl.client_threads)
    return group


def run_group(task: GroupTask) -> Packed:
    """One group's round on this process (the task ``run_groups`` submits)."""
    comm, ranks = _world()
    rank = comm.Get_rank()
    marker = mpi_backend._marker_path(task.logdir, rank)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"rank": rank, "pid": os.getpid(), "host": socket.gethostname(),
                                  "round": task.round_idx, "clients": [f"peer group {task.part}"]}))
    try:
        if len(ranks) != task.parts:
            raise MPIProcessError(f"rank {rank}: {task.parts} peer groups for {len(ranks)} MPI processes")
        rank_of = _handshake(comm, ranks, rank, task)
        try:
            group = _group(task)
        except Exception as err:  # nothing sent yet: tell the others to stop waiting for this group
            requests = [comm.isend((task.round_idx, _describe(err)), dest=other_rank, tag=TAG_ABORT)
                        for other, other_rank in rank_of.items() if other != task.part]
            MPI_waitall(requests)
            raise MPIProcessError(f"rank {rank}, peer group {task.part}: {_describe(err)}") from None
        failure = None
        try:
            group.begin_round(task.round_idx, task.checkpointed_round)
        except Exception as err:  # still exchanged (an empty message), so that nothing is left pending
            failure = err
        incoming = _exchange(comm, rank_of, group, task, failure)
        try:
            result = group.finish_round(incoming)
        except Exception as err:
            raise MPIProcessError(f"rank {rank}, peer group {task.part}, round {task.round_idx}: "
                                  f"{_describe(err)}") from None
        return pack(result)
    finally:
        marker.unlink(missing_ok=True)


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def MPI_waitall(requests: List[Any]) -> None:
    from mpi4py import MPI

    MPI.Request.Waitall(requests)


class _Aborted(StoppedByAnotherTask):
    """Another group failed; this one stops."""


def _poll(comm: Any, ready: Any, what: str, task: GroupTask, deadline: Optional[float] = None) -> Any:
    """Wait until ``ready()`` gives a value, sleeping between probes (up to 1 ms); stop when
    another group aborts or (``deadline``) when waiting too long."""
    from mpi4py import MPI

    status, pause = MPI.Status(), 0.0
    while True:
        value = ready()
        if value is not None:
            return value
        if comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_ABORT, status=status):
            failed_round, message = comm.recv(source=status.Get_source(), tag=TAG_ABORT)
            if failed_round == task.round_idx:
                raise _Aborted(f"peer group {task.part} stopped: rank {status.Get_source()} failed ({message})")
        if deadline is not None and time.monotonic() > deadline:
            raise MPIProcessError(f"peer group {task.part}, round {task.round_idx}: {what} did not come "
                                  f"in {HANDSHAKE_SECONDS:.0f}s")
        time.sleep(pause)
        pause = min(1e-3, max(2 * pause, 2e-5))


def _handshake(comm: Any, ranks: Sequence[int], rank: int, task: GroupTask) -> Dict[int, int]:
    """Every group's rank this round (each task tells every other process its group)."""
    from mpi4py import MPI

    sends = [comm.isend((task.round_idx, task.part), dest=other, tag=TAG_HELLO) for other in ranks if other != rank]
    rank_of = {task.part: rank}
    status = MPI.Status()
    deadline = time.monotonic() + HANDSHAKE_SECONDS
    while len(rank_of) < task.parts:
        def hello() -> Optional[Tuple[int, int]]:
            if not comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_HELLO, status=status):
                return None
            source = status.Get_source()
            return source, comm.recv(source=source, tag=TAG_HELLO)

        source, (hello_round, part) = _poll(comm, hello, "the other peer groups' handshake", task, deadline)
        if hello_round != task.round_idx or part in rank_of:
            raise MPIProcessError(f"rank {rank}: rank {source} announced peer group {part} of round {hello_round} "
                                  f"during round {task.round_idx}")
        rank_of[part] = source
    MPI.Request.Waitall(sends)
    return rank_of


def _exchange(comm: Any, rank_of: Dict[int, int], group: PeerGroup, task: GroupTask,
              failure: Optional[BaseException]) -> Dict[int, Any]:
    """Send this group's boundary models to the groups that need them, receive theirs.

    Every pair of groups that share a link exchanges exactly one message each way, even
    when a group failed to train (it then sends its error instead of models), so that no
    message is left unreceived; after the exchange a failure stops every group it reached.
    """
    from mpi4py import MPI

    requests, buffers = [], []
    rank = comm.Get_rank()
    for dst in sorted(group.sends):
        dest = rank_of[dst]
        if failure is not None:
            requests.append(comm.isend((task.round_idx, None, _describe(failure), 0), dest=dest, tag=TAG_MODELS))
            continue
        packed = pack(group.outgoing(dst))  # one flat buffer; the loaded models are freed here
        buffers.append(packed)
        requests.append(comm.isend((task.round_idx, packed.header, packed.specs, int(packed.data.nbytes)),
                                   dest=dest, tag=TAG_MODELS))
        for start in range(0, packed.data.nbytes, mpi_backend._CHUNK):
            requests.append(comm.Isend(packed.data[start:start + mpi_backend._CHUNK], dest=dest, tag=TAG_MODELS + 1))
    incoming: Dict[int, Any] = {}
    failed: List[str] = []
    for src in sorted(group.receives):
        source = rank_of[src]
        header = _poll(comm, lambda source=source: comm.recv(source=source, tag=TAG_MODELS)
                       if comm.Iprobe(source=source, tag=TAG_MODELS) else None, f"group {src}'s models", task)
        sent_round, pickled, specs, nbytes = header
        if sent_round != task.round_idx:
            raise MPIProcessError(f"peer group {task.part}: group {src} sent models of round {sent_round} "
                                  f"during round {task.round_idx}")
        if pickled is None:
            failed.append(f"rank {source} (peer group {src}) failed: {specs}")
            continue
        data = np.empty(nbytes, dtype=np.uint8)
        for start in range(0, nbytes, mpi_backend._CHUNK):
            comm.Recv(data[start:start + mpi_backend._CHUNK], source=source, tag=TAG_MODELS + 1)
        incoming.update(unpack(Packed(pickled, specs, data)))
    _poll(comm, lambda: True if MPI.Request.Testall(requests) else None, "the delivery of this group's models", task)
    del buffers
    if failure is not None:
        raise MPIProcessError(f"rank {rank}, peer group {task.part}, round {task.round_idx}: "
                              f"{_describe(failure)}") from None
    if failed:
        raise _Aborted(f"peer group {task.part} stopped: {failed[0]}")
    return incoming

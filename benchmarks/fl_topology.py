"""Topologies compared: star FedAvg, 2-level HierFAVG, ring and random-graph gossip; and the
memory of 10,000 decentralized workers.

    .venv/bin/python benchmarks/fl_topology.py [--rows 200000] [--workers 100] [--rounds 30]
    .venv/bin/python benchmarks/fl_topology.py --memory 1000,10000 [--reader safe_open]
    .venv/bin/python benchmarks/fl_topology.py --interprocess 10000 [--mpi 2]

Quality (the README's table): the demo DLRM on synthetic Criteo-format data, ``--workers``
workers, Dirichlet alpha 0.5, every worker trains ``--local-steps`` steps (batch 32, lr
0.3) in every round of local training, so every setting runs the same number of local
steps: star FedAvg with every worker each round; HierFAVG over 10 edges of 10 workers with
2 edge rounds per cloud round (half as many cloud rounds); gossip on a ring and on a random
4-regular graph; D-PSGD on the random graph. One JSON line per setting: val AUC / log
loss at the end (gossip: of the peers' mean model), consensus distance, and bytes: in all,
over the most loaded link and at the busiest node, summed over the rounds (with every
worker in every round each link's load is the same every round, so these are exact).

Memory (``--memory``): gossip on a random 4-regular graph of N peers, a small DLRM (26
hashed tables of 100 rows, dimension 4), 2 rounds of one local step each, each N in a fresh
process: the RSS before the simulation is built, once built, once the peers are built
(``peers_python_kib``: their Python objects, traced), after each round (each saves a
checkpoint, as a run does), the peak through round 1 (before the final evaluation) and the
peak overall; the graph's arrays and the peers' models on disk.
``--reader safe_open`` reads the peer stores through safetensors' ``safe_open`` as before
(it keeps ~56 bytes per tensor read: the per-round growth it caused).

Inter-process traffic (``--interprocess N``): ring and random 4-regular graphs of N peers
over 2, 3, 4 and 8 MPI processes: the fraction of links cut and the peer models (and MiB
of the memory benchmark's model) that cross processes per round, for the placement
(``fedrec.federated.placement``) against id blocks and round robin. ``--mpi K`` also runs
1,000 peers of the memory benchmark's model under ``mpiexec`` (K processes, one round, both
placements) and prints the ``bytes_interprocess`` that the run's metrics recorded.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
from _common import ROOT, emit, make_data, peak_rss_mib

SETTINGS: Dict[str, Dict[str, Any]] = {
    "star": {"fl_algo": {"name": "fed_avg"}, "topology": {"name": "star"}},
    "hierarchical": {"fl_algo": {"name": "hier_favg"},
                     "topology": {"name": "hierarchical", "num_edges": 10, "edge_rounds": 2}},
    "ring gossip": {"fl_algo": {"name": "gossip"}, "topology": {"name": "graph", "kind": "ring"}},
    "random 4-regular gossip": {"fl_algo": {"name": "gossip"},
                                "topology": {"name": "graph", "kind": "k_regular", "degree": 4}},
    "random 4-regular D-PSGD": {"fl_algo": {"name": "dpsgd"},
                                "topology": {"name": "graph", "kind": "k_regular", "degree": 4}},
}


def quality(config: Dict[str, Any], name: str, workers: int, rounds: int, steps: int, workdir: Path) -> None:
    from fedrec.federated.simulation import Simulation

    setting = SETTINGS[name]
    edge_rounds = setting["topology"].get("edge_rounds", 1)
    config = copy.deepcopy(config)
    config["fl"].update({"num_workers": workers, "client_num_per_round": workers, "num_rounds": rounds // edge_rounds,
                         "partitioner": {"name": "dirichlet", "alpha": 0.5}, "local_epochs": None,
                         "local_steps": steps, "local_lr": 0.3, "local_batch_size": 32,
                         "eval_every_n_rounds": 1000, "progress_bar": False, **copy.deepcopy(setting)})
    start = time.perf_counter()
    sim = Simulation(config, workdir / name.replace(" ", "_"))
    try:
        history = sim.run()
    finally:
        sim.close()
    last = history[-1]
    emit(bench="fl_topology", setting=name, rounds=len(history), local_steps_per_worker=len(history) * edge_rounds * steps,
         samples=sum(r["samples"] for r in history), auc=last["roc_auc"], log_loss=last["log_loss"], consensus_distance=last.get("consensus_distance"),
         bytes_total=sum(r["bytes_up"] + r["bytes_down"] for r in history),
         bytes_max_link=sum(r["bytes_max_link"] for r in history),
         bytes_max_node=sum(r["bytes_max_node"] for r in history),
         bytes_edge_cloud=sum(r.get("bytes_edge_cloud", 0) for r in history),
         seconds_per_round=sum(r["round_seconds"] for r in history) / len(history),
         wall_seconds=time.perf_counter() - start)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def small_model(config: Dict[str, Any]) -> Dict[str, Any]:
    """The memory benchmark's DLRM: 26 tables of 100 rows, dimension 4 (64 KiB)."""
    config["model"]["arch_feature_emb_size"] = 4
    config["model"]["arch_mlp_bot"] = [13, 16, 4]
    config["model"]["arch_mlp_top"] = [16, 1]
    return config


def _read_with_safe_open(path: Any) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """The peer stores' reads as they were: tensor by tensor through ``safe_open``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})


def memory_run(peers: int, workdir: Path, rows: int, reader: str) -> None:
    import tracemalloc

    from fedrec.federated import gossip
    from fedrec.federated.simulation import Simulation

    if reader == "safe_open":
        gossip.read_state_file = _read_with_safe_open
    config = small_model(make_data(workdir / "data-memory", rows, max_ind_range=100))
    config["fl"].update({"num_workers": peers, "client_num_per_round": peers, "num_rounds": 2,
                         "partitioner": {"name": "iid"}, "local_epochs": None, "local_steps": 1,
                         "local_batch_size": 16, "eval_every_n_rounds": 1000, "progress_bar": False,
                         "fl_algo": {"name": "gossip"},
                         "topology": {"name": "graph", "kind": "k_regular", "degree": 4}})
    before = _rss_mib()
    start = time.perf_counter()
    logdir = workdir / f"memory-{peers}-{reader}"
    shutil.rmtree(logdir, ignore_errors=True)
    sim = Simulation(config, logdir)
    built = time.perf_counter() - start
    rss_built = _rss_mib()
    network = sim.topology_runtime
    tracemalloc.start()
    network._place()  # the peers' objects (what the first round would build)
    peers_python = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    rss_peers = _rss_mib()
    history, after, peaks = [], [], []
    try:
        for _ in range(2):  # as Simulation.run, a checkpoint a round; the last round ends with the evaluation
            history.append(sim.run_round())
            sim.save_checkpoint()
            after.append(_rss_mib())
            peaks.append(peak_rss_mib())
    finally:
        sim.close()
    graph = network.graph
    model_bytes = network.model_bytes
    on_disk = sum(p.stat().st_size for d in ("peer_models", "peer_sent") for p in (logdir / d).rglob("*.safetensors"))
    emit(bench="fl_topology_memory", peers=peers, reader=reader, model_kib=model_bytes / 1024,
         graph_links=graph.num_edges, graph_kib=graph.nbytes() / 1024, rss_before_mib=before,
         rss_built_mib=rss_built, rss_peers_built_mib=rss_peers, peers_python_kib=peers_python / 1024,
         rss_after_round1_mib=after[0], rss_after_round2_mib=after[1], peak_rss_round1_mib=peaks[0],
         peak_rss_mib=peaks[1], models_on_disk_mib=on_disk / 2**20,
         models_in_ram_if_held_mib=peers * model_bytes / 2**20, build_seconds=built,
         seconds_per_round=sum(r["round_seconds"] for r in history) / len(history),
         consensus_distance=history[-1]["consensus_distance"])


def interprocess(peers: int) -> None:
    """Links cut and models crossing processes: the placement against the naive ones."""
    from fedrec.federated.placement import cut_fraction, interprocess_models, peer_order, place, round_robin
    from fedrec.federated.topology import GraphTopology, make_graph

    model_mib = 64.08 / 1024  # the memory benchmark's model
    for kind in ("ring", "k_regular"):
        graph = make_graph(GraphTopology(kind=kind, degree=4), peers)
        start = time.perf_counter()
        order = peer_order(graph, kind)
        seconds = time.perf_counter() - start
        for processes in (2, 3, 4, 8):
            placements = {"placed": place(order, 12, processes).part_of,
                          "id_blocks": place(np.arange(peers), 12, processes).part_of,
                          "round_robin": round_robin(peers, processes)}
            row = {"bench": "fl_topology_interprocess", "graph": kind, "peers": peers, "processes": processes,
                   "order_seconds": seconds}
            for name, part_of in placements.items():
                models = interprocess_models(graph, part_of)
                row.update({f"{name}_cut": cut_fraction(graph, part_of), f"{name}_models": models,
                            f"{name}_mib_per_round": models * model_mib})
            emit(**row)


MPI_PEERS = 1000


def mpi_check(processes: int, workdir: Path) -> None:
    """A real run under mpiexec: 1,000 peers of the small model, one round, both placements."""
    import yaml

    from fedrec.federated.mpi_backend import _mpiexec_on_path
    from fedrec.utilities.logger import read_metrics

    config = small_model(make_data(workdir / "data-memory", 200_000, max_ind_range=100))
    _mpiexec_on_path()
    for kind in ("ring", "k_regular"):
        for placement in ("auto", "identity"):
            run = copy.deepcopy(config)
            run["fl"].update({"num_workers": MPI_PEERS, "client_num_per_round": MPI_PEERS,
                              "partitioner": {"name": "iid"}, "num_rounds": 1, "local_epochs": None,
                              "local_steps": 1, "backend": "mpi", "fl_algo": {"name": "gossip"},
                              "topology": {"name": "graph", "kind": kind, "degree": 4, "placement": placement}})
            logdir = workdir / f"mpi-{kind}-{placement}-{processes}"
            shutil.rmtree(logdir, ignore_errors=True)
            path = workdir / f"mpi-{kind}-{placement}.yml"
            path.write_text(yaml.safe_dump(run))
            subprocess.run(["mpiexec", "-n", str(processes + 1), sys.executable, "-m", "mpi4py.futures", "-m",
                            "fedrec.cli", "simulate", "--config", str(path), "--logdir", str(logdir)],
                           check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            row = [r for r in read_metrics(logdir / "metrics.jsonl") if r.get("phase") == "fl"][-1]
            emit(bench="fl_topology_mpi", graph=kind, placement=placement, processes=processes, peers=MPI_PEERS,
                 bytes_interprocess=row["bytes_interprocess"], bytes_up=row["bytes_up"],
                 round_seconds=row["round_seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=30, help="rounds of local training (star rounds)")
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--memory", default="", help="comma-separated peer counts: the memory benchmark")
    parser.add_argument("--memory-one", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--reader", choices=["load", "safe_open"], default="load",
                        help="how the peer stores read a model (safe_open: as before, for comparison)")
    parser.add_argument("--interprocess", type=int, default=0, help="peers: links cut and models across processes")
    parser.add_argument("--mpi", type=int, default=0, help="also a real run under mpiexec with this many processes")
    parser.add_argument("--workdir", default="")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fl_topology-"))
    if args.memory_one:
        memory_run(args.memory_one, workdir, args.rows, args.reader)
        return
    if args.interprocess or args.mpi:
        if args.interprocess:
            interprocess(args.interprocess)
        if args.mpi:
            mpi_check(args.mpi, workdir)
        return
    if args.memory:
        make_data(workdir / "data-memory", args.rows, max_ind_range=100)  # once, outside the measured runs
        for peers in [int(p) for p in args.memory.split(",")]:
            subprocess.run([sys.executable, __file__, "--memory-one", str(peers), "--rows", str(args.rows),
                            "--workdir", str(workdir), "--reader", args.reader], check=True, cwd=ROOT)
        return
    config = make_data(workdir / "data", args.rows)
    for name in args.settings.split(","):
        quality(config, name, args.workers, args.rounds, args.local_steps, workdir)


if __name__ == "__main__":
    main()

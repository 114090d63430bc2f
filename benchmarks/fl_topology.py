"""Topologies compared: star FedAvg, 2-level HierFAVG, ring and random-graph gossip; and the
memory of 10,000 decentralized workers.

    .venv/bin/python benchmarks/fl_topology.py [--rows 200000] [--workers 100] [--rounds 30]
    .venv/bin/python benchmarks/fl_topology.py --memory 1000,10000

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
process: peak RSS, the RSS before the simulation is built, the graph's arrays and the
peers' models on disk.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

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


def memory_run(peers: int, workdir: Path, rows: int) -> None:
    from fedrec.federated.simulation import Simulation

    config = make_data(workdir / "data-memory", rows, max_ind_range=100)
    config["model"]["arch_feature_emb_size"] = 4
    config["model"]["arch_mlp_bot"] = [13, 16, 4]
    config["model"]["arch_mlp_top"] = [16, 1]
    config["fl"].update({"num_workers": peers, "client_num_per_round": peers, "num_rounds": 2,
                         "partitioner": {"name": "iid"}, "local_epochs": None, "local_steps": 1,
                         "local_batch_size": 16, "eval_every_n_rounds": 1000, "progress_bar": False,
                         "fl_algo": {"name": "gossip"},
                         "topology": {"name": "graph", "kind": "k_regular", "degree": 4}})
    before = _rss_mib()
    start = time.perf_counter()
    logdir = workdir / f"memory-{peers}"
    sim = Simulation(config, logdir)
    built = time.perf_counter() - start
    rss_built = _rss_mib()
    try:
        history = sim.run()
    finally:
        sim.close()
    network = sim.topology_runtime
    graph = network.graph
    model_bytes = network.model_bytes
    on_disk = sum(p.stat().st_size for d in ("peer_models", "peer_sent") for p in (logdir / d).rglob("*.safetensors"))
    emit(bench="fl_topology_memory", peers=peers, model_kib=model_bytes / 1024, graph_links=graph.num_edges,
         graph_kib=graph.nbytes() / 1024, rss_before_mib=before, rss_built_mib=rss_built, peak_rss_mib=peak_rss_mib(),
         models_on_disk_mib=on_disk / 2**20, models_in_ram_if_held_mib=peers * model_bytes / 2**20,
         build_seconds=built, seconds_per_round=sum(r["round_seconds"] for r in history) / len(history),
         consensus_distance=history[-1]["consensus_distance"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=30, help="rounds of local training (star rounds)")
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--memory", default="", help="comma-separated peer counts: the memory benchmark")
    parser.add_argument("--memory-one", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default="")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fl_topology-"))
    if args.memory_one:
        memory_run(args.memory_one, workdir, args.rows)
        return
    if args.memory:
        make_data(workdir / "data-memory", args.rows, max_ind_range=100)  # once, outside the measured runs
        for peers in [int(p) for p in args.memory.split(",")]:
            subprocess.run([sys.executable, __file__, "--memory-one", str(peers), "--rows", str(args.rows),
                            "--workdir", str(workdir)], check=True, cwd=ROOT)
        return
    config = make_data(workdir / "data", args.rows)
    for name in args.settings.split(","):
        quality(config, name, args.workers, args.rounds, args.local_steps, workdir)


if __name__ == "__main__":
    main()

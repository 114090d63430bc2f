"""Per-client state at scale: SCAFFOLD's peak RSS against FedAvg's at 100,000 workers.

    .venv/bin/python benchmarks/fl_state_memory.py [--workers 100000] [--rounds 3]

SCAFFOLD keeps a control variate per client (MLPs plus the client's embedding rows) in
the on-disk state store and one server control variate; FedAvg keeps nothing per client.
Each algorithm runs in a fresh process (local backend, the demo DLRM, 100 clients per
round, sparse updates); prints peak RSS, the state store's bytes on disk, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, emit, make_data, peak_rss_mib


def child(workdir: Path, rows: int, workers: int, rounds: int, algo: str) -> None:
    from fedrec.federated.client_state import STATE_DIR, ClientStateStore
    from fedrec.federated.simulation import Simulation

    config = make_data(workdir, rows)
    config["fl"].update({"num_workers": workers, "client_num_per_round": 100, "num_rounds": rounds,
                         "partitioner": {"name": "iid"}, "local_epochs": 1, "local_lr": 0.1,
                         "eval_every_n_rounds": rounds, "embedding_updates": "sparse",
                         "fl_algo": {"name": algo}})
    logdir = workdir / f"fl-{algo}-{workers}"
    start = time.perf_counter()
    sim = Simulation(config, logdir)
    sim.run()
    sim.close()
    print(json.dumps({"algorithm": algo, "workers": workers, "seconds": time.perf_counter() - start,
                      "peak_rss_mib": peak_rss_mib(),
                      "state_store_mib": ClientStateStore(logdir / STATE_DIR).nbytes() / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir")
    parser.add_argument("--child")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        if args.child:
            child(workdir, args.rows, args.workers, args.rounds, args.child)
            return
        make_data(workdir, args.rows)
        results = {}
        for algo in ("fed_avg", "scaffold"):
            out = subprocess.run([sys.executable, __file__, "--child", algo, "--rows", str(args.rows),
                                  "--workers", str(args.workers), "--rounds", str(args.rounds),
                                  "--workdir", str(workdir)], capture_output=True, text=True, cwd=ROOT,
                                 check=True)
            results[algo] = json.loads(out.stdout.strip().splitlines()[-1])
            emit(bench="state_memory", **results[algo])
        emit(bench="state_memory_ratio",
             scaffold_over_fed_avg_rss=results["scaffold"]["peak_rss_mib"] / results["fed_avg"]["peak_rss_mib"])


if __name__ == "__main__":
    main()

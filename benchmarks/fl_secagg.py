"""Secure aggregation: what SecAgg (100 clients per round, every pair) and SecAgg+ (1,000
clients per round, ``--neighbours`` neighbours) cost a round, against plain FedAvg.

    .venv/bin/python benchmarks/fl_secagg.py [--rows 100000] [--workers 2000] [--rounds 3]

A small dense model (the demo DLRM with ``--emb-dim`` embeddings and tables cut to
``--table-rows`` rows, dense embedding updates) and one local step per client, so that the
protocol's cost is visible beside the training. Per setting, one JSON line with the
median round seconds of plain FedAvg and of secure aggregation and their ratio, the
protocol's seconds per round (client key agreement and masking summed over the cohort;
the clients' sharing round, played on rank 0; the server's recovery), the dropped clients,
and the extra bytes per client (up and down: ring elements instead of floats, public keys,
encrypted shares, the unmasking round's shares).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from _common import emit, make_data

PROTOCOL_KEYS = ("secagg_seconds_keys", "secagg_seconds_masking", "secagg_seconds_sharing",
                 "secagg_seconds_recovery", "secagg_dropped")


def run(config: Dict[str, Any], logdir: Path, secagg: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
    from fedrec.federated.simulation import Simulation

    config = copy.deepcopy(config)
    config["fl"]["postprocessors"] = [secagg] if secagg else []
    sim = Simulation(config, logdir)
    try:
        return sim.run()
    finally:
        sim.close()


def largest_client(config: Dict[str, Any], logdir: Path) -> int:
    """The largest client's data size: secure aggregation's max_weight (FedAvg's weights)."""
    from fedrec.federated.client_runner import build_client_runner

    return int(build_client_runner(copy.deepcopy(config), None, new_partition=True).partition.sizes.max())


def median(rows: List[Dict[str, Any]], key: str) -> float:
    values = [float(r.get(key, 0.0)) for r in (rows[1:] if len(rows) > 1 else rows)]  # round 1 warms up
    return statistics.median(values)


def setting(config: Dict[str, Any], workdir: Path, per_round: int, neighbours: Optional[int],
            dropout: float, max_weight: int) -> None:
    config = copy.deepcopy(config)
    config["fl"]["client_num_per_round"] = per_round
    secagg = {"name": "secure_aggregation", "max_weight": float(max_weight), "neighbours": neighbours,
              "dropout_rate": dropout}
    name = f"{per_round}-{neighbours or 'all'}"
    plain = run(config, workdir / f"plain-{name}", None)
    secure = run(config, workdir / f"secagg-{name}", secagg)
    clients = median(secure, "clients")
    result = {"clients_per_round": per_round, "neighbours": neighbours or per_round - 1,
              "protocol": "SecAgg+" if neighbours else "SecAgg", "dropout_rate": dropout,
              "plain_round_seconds": median(plain, "round_seconds"),
              "secagg_round_seconds": median(secure, "round_seconds")}
    result["round_seconds_ratio"] = result["secagg_round_seconds"] / result["plain_round_seconds"]
    result.update({key: median(secure, key) for key in PROTOCOL_KEYS})
    # the protocol's own messages (keys, encrypted shares, unmasking shares) per client:
    # what is left of the upload after the survivors' masked vectors (32-bit ring elements
    # here: the float upload's numbers plus the masked weight, 4 bytes each)
    survivors = clients - result["secagg_dropped"]
    masked_upload = median(plain, "bytes_up") / clients + 4
    result["key_and_share_bytes_up_per_client"] = (median(secure, "bytes_up") - survivors * masked_upload) / clients
    for way in ("up", "down"):
        extra = median(secure, f"bytes_{way}") - median(plain, f"bytes_{way}")
        result[f"extra_bytes_{way}_per_client"] = extra / clients
        result[f"plain_bytes_{way}_per_client"] = median(plain, f"bytes_{way}") / clients
    emit(bench="fl_secagg", **result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--table-rows", type=int, default=100)
    parser.add_argument("--emb-dim", type=int, default=8)
    parser.add_argument("--neighbours", type=int, default=20, help="SecAgg+'s neighbours at 1,000 clients")
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--settings", default="100,1000", help="clients per round: 100 (SecAgg), 1000 (SecAgg+)")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        config = make_data(workdir, args.rows, max_ind_range=args.table_rows)
        config["model"].update({"arch_feature_emb_size": args.emb_dim, "arch_mlp_bot": [13, 16, args.emb_dim],
                                "arch_mlp_top": [16, 1]})
        config["fl"].update({"num_workers": args.workers, "num_rounds": args.rounds,
                             "eval_every_n_rounds": args.rounds, "partitioner": {"name": "iid"},
                             "local_steps": 1, "local_epochs": None, "local_batch_size": 32,
                             "embedding_updates": "dense", "checkpoint_every_n_rounds": args.rounds})
        max_weight = largest_client(config, workdir)
        for per_round in (int(s) for s in args.settings.split(",") if s):
            neighbours = None if per_round <= 100 else args.neighbours
            setting(config, workdir, per_round, neighbours, args.dropout, max_weight)


if __name__ == "__main__":
    main()

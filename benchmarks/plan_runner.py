"""FL plans: plan size, export and load time, and the plan runner's seconds per local step
against the simulator's for the same clients, in one process.

    .venv/bin/python benchmarks/plan_runner.py [--rows 100000] [--clients 30]

The demo DLRM of configs/dlrm_fl.yml (26 tables of up to 10,000 rows, dimension 16),
1,000 workers, 5 local epochs of batch 32, FedAvg, in dense and in sparse mode. For each
of ``--clients`` clients the simulator's client (``ClientRunner.run_job``: weight
loading, local training, the upload) and the plan runner (``PlanRunner.train``: the
same, from the plan's exported program) run in turn on the same global weights, so
machine noise falls on both; the per-step time is the total over the clients divided by
their steps. Prints JSON lines: ``plan`` (bytes, export and load seconds), ``variant``
(microseconds per step of each and their ratio, and whether every update was equal bit
for bit) and ``summary``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import emit, make_data


def _bench(config, workdir: Path, mode: str, clients: int):
    from fedrec.federated.client_runner import RoundJob, build_client_runner
    from fedrec.federated.context import RoundContext
    from fedrec.federated.update import submodel
    from fedrec.plans.data import ClientData
    from fedrec.plans.export import export_plan
    from fedrec.plans.runner import PlanRunner

    config = copy.deepcopy(config)
    config["fl"]["embedding_updates"] = mode
    plan = workdir / f"{mode}.plan"
    start = time.perf_counter()
    export_plan(config, plan)
    export_seconds = time.perf_counter() - start
    loads = []
    for _ in range(3):
        start = time.perf_counter()
        runner = PlanRunner(plan)
        loads.append(time.perf_counter() - start)
    emit(kind="plan", mode=mode, bytes=plan.stat().st_size, export_seconds=round(export_seconds, 3),
         load_seconds=round(min(loads), 3))

    (workdir / mode).mkdir(exist_ok=True)
    sim = build_client_runner(config, workdir / mode, new_partition=True)
    state = {k: v.detach().clone() for k, v in sim.model.state_dict().items()}
    train = sim.trainer.dataset.split("train")
    sim_seconds = plan_seconds = 0.0
    steps = 0
    identical = True
    torch.set_num_threads(1)
    for cid in range(clients):
        rows = sim.partition.indices_of(cid)
        data = ClientData(torch.from_numpy(train.dense[rows]), torch.from_numpy(train.sparse[rows].astype("int64")),
                          torch.from_numpy(train.label[rows]))
        weights = submodel(state, runner.rows_needed(data)) if mode == "sparse" else state
        start = time.perf_counter()
        result = sim.run_job(RoundJob(RoundContext(0, sim.seed, cohort=[cid]), [(0, [cid])], state))
        sim_seconds += time.perf_counter() - start
        start = time.perf_counter()
        mine = runner.train(weights, data, 0, cid)
        plan_seconds += time.perf_counter() - start
        steps += mine.num_steps
        expected = result.block_updates[0][1]
        for name, delta in mine.update.dense.items():
            other = expected.dense.get(name)
            if other is None:  # the simulator's dense fast path uploads tables as rows
                row = expected.rows[name]
                other = torch.zeros_like(delta)
                other[row.ids] = row.values
            identical &= torch.equal(delta, other)
        for name, row in mine.update.rows.items():
            identical &= torch.equal(row.values, expected.rows[name].values)
    out = {"mode": mode, "clients": clients, "steps": steps,
           "simulator_us_per_step": round(1e6 * sim_seconds / steps, 1),
           "runner_us_per_step": round(1e6 * plan_seconds / steps, 1),
           "runner_over_simulator": round(plan_seconds / sim_seconds, 3), "updates_identical": bool(identical)}
    emit(kind="variant", **out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--max-ind-range", type=int, default=10_000)
    parser.add_argument("--workdir")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        config = make_data(workdir, args.rows, max_ind_range=args.max_ind_range)
        config["fl"].update({"local_batch_size": 32, "num_workers": 1000})  # dlrm_fl.yml: 5 local epochs
        results = [_bench(config, workdir, mode, args.clients) for mode in ("dense", "sparse")]
    emit(kind="summary", ratios={r["mode"]: r["runner_over_simulator"] for r in results},
         identical=all(r["updates_identical"] for r in results), median_ratio=statistics.median(
             r["runner_over_simulator"] for r in results))


if __name__ == "__main__":
    main()

"""FedAvg's round time here against another checkout of fedrec (e.g. the commit before a
change), alternated in one run: what a change costs the round loop.

    git worktree add /tmp/fedrec-base <commit>
    .venv/bin/python benchmarks/fl_round_ab.py --baseline /tmp/fedrec-base [--rounds 6] [--repeats 3]

Each side runs in its own process with its own tree first on ``sys.path`` (its own
preprocessed copy of the same synthetic data): the demo DLRM, 1,000 workers, 100 per
round, 1 local epoch, no evaluation in the timed rounds. The sides alternate A, B, A, B,
... so that machine noise falls on both; prints each side's median seconds per round and
the ratio (this tree over the baseline).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, emit

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from pathlib import Path
from fedrec.data import synthesize
from fedrec.runner import run_preprocess
from fedrec.utilities.config import load_config
from fedrec.federated.simulation import Simulation
tree, work, rows, rounds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
work.mkdir(parents=True, exist_ok=True)
datafile = work.parent / "synthetic.txt"
if not datafile.exists():
    synthesize(rows, str(datafile), seed=0)
config = load_config(tree / "configs" / "dlrm_fl.yml", sets=[
    f"model.preproc.datafile={datafile}", f"model.preproc.output_file={work / 'processed'}",
    "fl.progress_bar=false", "fl.backend=local", "fl.num_workers=1000", "fl.client_num_per_round=100",
    "fl.local_epochs=1", "fl.local_lr=0.1", "fl.num_rounds=100000", "fl.eval_every_n_rounds=100000",
    "fl.fl_algo={name: fed_avg}"])
if not (work / "processed" / "metadata.json").exists():
    run_preprocess(config, progress=False)
sim = Simulation(config, work / "fl")
seconds = [sim.run_round()["round_seconds"] for _ in range(rounds)]
sim.close()
print(json.dumps({"tree": str(tree), "seconds": seconds[1:], "fedrec": sys.modules["fedrec"].__file__}))
"""


def run_side(tree: Path, work: Path, rows: int, rounds: int) -> list:
    out = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(work), str(rows), str(rounds)],
                         capture_output=True, text=True, cwd=tree, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["fedrec"].startswith(str(tree)), f"imported {result['fedrec']}, not {tree}'s fedrec"
    return result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="another checkout of fedrec")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir")
    args = parser.parse_args()
    baseline = Path(args.baseline).resolve()
    if not (baseline / "fedrec" / "federated" / "simulation.py").is_file():
        parser.error(f"--baseline {baseline} is not a checkout of fedrec (no fedrec/federated/simulation.py)")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        seconds = {"this": [], "baseline": []}
        for repeat in range(args.repeats):
            for side, tree in (("this", ROOT), ("baseline", baseline)):
                seconds[side] += run_side(tree, workdir / side, args.rows, args.rounds)
                emit(bench="round_ab", repeat=repeat, side=side, seconds=seconds[side][-(args.rounds - 1):])
        this, base = statistics.median(seconds["this"]), statistics.median(seconds["baseline"])
        emit(bench="round_ab_ratio", this_median_seconds=this, baseline_median_seconds=base,
             ratio_this_over_baseline=this / base, rounds_each=len(seconds["this"]))


if __name__ == "__main__":
    main()

"""``make demo``: the whole journey on synthetic data, with nothing to download.

1. write a synthetic Criteo-format file with a planted click model (known optimal AUC);
2. preprocess it into memory-mapped arrays;
3. train the demo DLRM the standard way and report val AUC next to the optimal AUC;
4. simulate federated training over 1,000 workers (FedAdagrad, the config's ``fl.fl_algo``)
   and report AUC and log loss per round next to the centralized run's;
5. write the report of both runs (``fedrec report``): an HTML page and PNGs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from fedrec.utilities.config import load_config

DEFAULT_CONFIG = "configs/dlrm_fl.yml"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedrec.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo", help="where data and results go")
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--num_workers", type=int, default=1000)
    parser.add_argument("--num_rounds", type=int, default=20)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args(argv)

    from fedrec.data import synthesize
    from fedrec.federated.run import run_simulation
    from fedrec.runner import run_preprocess, run_train

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    datafile = work / "synthetic.txt"
    sets = [f"model.preproc.datafile={datafile}", f"model.preproc.output_file={work / 'processed'}",
            f"fl.num_workers={args.num_workers}", f"fl.num_rounds={args.num_rounds}", *args.sets]
    config = load_config(args.config, sets=sets)

    print(f"== 1/4 synthetic data: {args.rows:,} rows -> {datafile}")
    meta = synthesize(args.rows, str(datafile), seed=0)
    optimal = meta["optimal_auc"]
    print(f"   CTR {meta['ctr']:.3f}, optimal AUC of the planted model {optimal:.4f}")

    print("== 2/4 preprocess")
    run_preprocess(config, config_path=args.config, progress=False)

    print("== 3/4 standard training")
    central = run_train(config, work / "train", config_path=args.config)
    central_auc = central.get("val_roc_auc", float("nan"))
    central_loss = central.get("val_log_loss", float("nan"))
    print(f"   centralized val AUC {central_auc:.4f}, log loss {central_loss:.4f}  (optimal AUC {optimal:.4f})")

    print(f"== 4/4 federated simulation: {config['fl']['fl_algo']['name']} over {args.num_workers:,} workers")
    history = run_simulation(config, work / "fl", config_path=args.config, print_rounds=False)
    for row in history:
        auc, loss = row.get("roc_auc", float("nan")), row.get("log_loss", float("nan"))
        print(f"   round {row['round']:3d}: FL AUC {auc:.4f}  log loss {loss:.4f}   centralized "
              f"{central_auc:.4f} / {central_loss:.4f}   ({row['round_seconds']:.2f}s)")

    summary = {"optimal_auc": optimal, "centralized_val_auc": central_auc, "centralized_val_log_loss": central_loss,
               "fl_final_auc": history[-1].get("roc_auc") if history else None,
               "fl_final_log_loss": history[-1].get("log_loss") if history else None}
    (work / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    from fedrec.report import write_report

    page = write_report([work / "train", work / "fl"], work / "report", title="fedrec demo: standard training and FL")
    print(f"\nresults: {work / 'train'} (standard training), {work / 'fl'} (FL simulation), "
          f"{work / 'demo_summary.json'}")
    print(f"TensorBoard: .venv/bin/tensorboard --logdir {work}")
    print(f"report: {page}  (PNGs in {page.parent / 'png'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

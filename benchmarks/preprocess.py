"""Preprocessing throughput and peak memory on synthetic Criteo files.

Generates files of 1M and 5M lines (generation is not timed), preprocesses each in a
fresh subprocess (hashing with occurring or fixed table sizes, and vocabulary mode), and
prints one JSON line per run with lines/s, the child's peak RSS and the total table rows,
then one line per mode with the RSS ratio of the
largest to the smallest file: close to 1 means memory does not grow with file length.

    .venv/bin/python benchmarks/preprocess.py [--rows 1000000 5000000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

MODES = {
    "hashing": {"max_ind_range": 10_000_000},  # tables sized by the hashed values that occur
    "hashing_fixed": {"max_ind_range": 10_000_000, "hash_table_size": "fixed"},
    "vocabulary": {"max_ind_range": -1},
}

_CHILD = """
import json, resource, sys, time


def peak_rss_kib():
    # VmHWM belongs to this process image; ru_maxrss would include the parent's RSS at fork.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


from fedrec.data.criteo import preprocess
datafile, output, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
baseline = peak_rss_kib()
start = time.perf_counter()
meta = preprocess(datafile, output, progress=False, **options)
elapsed = time.perf_counter() - start
print(json.dumps({"lines": meta["lines"], "seconds": elapsed, "table_rows": sum(meta["table_sizes"]),
                  "baseline_rss_mib": baseline / 1024, "peak_rss_mib": peak_rss_kib() / 1024}))
"""


def run_child(datafile: Path, output: Path, options: Dict[str, Any]) -> Dict[str, Any]:
    """Preprocess in a fresh interpreter, so its peak RSS is this run's alone."""
    result = subprocess.run([sys.executable, "-c", _CHILD, str(datafile), str(output), json.dumps(options)],
                            check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        from fedrec.data.synthetic import synthesize

        peaks: Dict[str, Dict[int, float]] = {mode: {} for mode in args.modes}
        for rows in args.rows:
            datafile = Path(tmp) / f"synthetic-{rows}.txt"
            start = time.perf_counter()
            synthesize(rows, datafile, seed=0)
            print(json.dumps({"generated": rows, "seconds": round(time.perf_counter() - start, 2),
                              "bytes": datafile.stat().st_size}), flush=True)
            for mode in args.modes:
                stats = run_child(datafile, Path(tmp) / f"processed-{rows}-{mode}", MODES[mode])
                peaks[mode][rows] = stats["peak_rss_mib"]
                print(json.dumps({
                    "mode": mode, "lines": stats["lines"], "seconds": round(stats["seconds"], 2),
                    "lines_per_s": round(stats["lines"] / stats["seconds"]),
                    "peak_rss_mib": round(stats["peak_rss_mib"], 1),
                    "import_rss_mib": round(stats["baseline_rss_mib"], 1),
                    "table_rows": stats["table_rows"],
                }), flush=True)
            datafile.unlink()
        for mode, by_rows in peaks.items():
            small, large = min(by_rows), max(by_rows)
            print(json.dumps({"mode": mode, "peak_rss_ratio": f"{large}/{small}",
                              "value": round(by_rows[large] / by_rows[small], 3)}), flush=True)


if __name__ == "__main__":
    main()

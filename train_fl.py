"""The seed's script for federated simulation (also under mpirun ... python -m mpi4py.futures): same flags as `fedrec simulate`."""

import sys

from fedrec.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("simulate", "configs/dlrm_fl.yml"))

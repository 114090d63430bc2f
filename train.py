"""The seed's script for standard training: same flags as `fedrec train`."""

import sys

from fedrec.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("train", "configs/dlrm.yml"))

"""The seed's script for Criteo preprocessing: same flags as `fedrec preprocess`."""

import sys

from fedrec.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("preprocess", "configs/dlrm.yml"))

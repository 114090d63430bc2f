"""What ``simulate --resume`` checks before it touches the logdir.

A resumed simulation continues the earlier rounds, so it must be the same simulation:
every checkpoint holds a fingerprint of the resolved config (the ``fl`` section with its
defaults filled in, ``model`` and ``train`` as given) and of the processed data (rows per
split, table sizes, the source file's checksum). ``--resume`` refuses a config whose
fingerprint differs, naming each differing key (old -> new), before any file in the
logdir changes. Only the keys in :data:`RESUME_MAY_CHANGE` may differ; the mechanism is
the one standard training uses (``fedrec.utilities.fingerprint``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from fedrec.utilities.checkpoint import CheckpointError, CheckpointManager, LoadedCheckpoint
from fedrec.utilities.config import ConfigError
from fedrec.utilities.fingerprint import fingerprint_diffs, flatten

__all__ = ["RESUME_MAY_CHANGE", "simulation_fingerprint", "check_fingerprint", "find_resume_point",
           "saved_partition_matches"]

# Keys that may change between a run and its --resume, and why each is safe: none of
# them changes what the earlier rounds computed or what the later rounds compute.
RESUME_MAY_CHANGE: Dict[str, str] = {
    "fl.num_rounds": "how many rounds to run in all (extend or shorten a run)",
    "fl.eval_every_n_rounds": "which rounds are evaluated (evaluation does not change training)",
    "fl.checkpoint_every_n_rounds": "how often checkpoints are written",
    "fl.keep_checkpoints": "how many checkpoints are kept",
    "fl.progress_bar": "display only",
    "fl.dense_fast_path": "the fast path gives the dense path's results bit for bit (tested)",
    "fl.backend": "local and MPI runs give the same results bit for bit (tested)",
    "fl.mpi_processes": "any number of MPI processes gives the same results bit for bit (tested)",
    "fl.vectorize_threads": "the vectorized engine's results do not depend on its thread count (tested)",
    "train.config.progress_bar": "display only (the simulator turns it off anyway)",
    "model.preproc.datafile": "where the raw data lives; the data are fingerprinted themselves",
    "model.preproc.output_file": "where the processed data live; the data are fingerprinted themselves",
}


def simulation_fingerprint(config: Mapping[str, Any], dataset: Any, postprocessors: Sequence[Any] = (),
                           devices: Optional[str] = None) -> Dict[str, Any]:
    """The flat fingerprint of a simulation: its resolved config less
    :data:`RESUME_MAY_CHANGE`, plus the identity of its processed data and what the
    postprocessors derived from the config (a calibrated noise multiplier) and the device
    profiles' digest (``devices``: trace files are read, not fingerprinted by name)."""
    from fedrec.federated.config import fl_config_from

    resolved = {name: section for name, section in config.items() if name != "fl"}
    resolved["fl"] = fl_config_from(dict(config)).model_dump()  # defaults filled in
    fingerprint = flatten(resolved, skip=RESUME_MAY_CHANGE)
    meta = getattr(dataset, "metadata", {}) or {}
    data = {"splits": meta.get("splits"), "table_sizes": meta.get("table_sizes"),
            "has_users": meta.get("has_users", False),
            "source_sha256": (meta.get("source") or {}).get("sha256")}
    fingerprint.update(flatten({"data": data}))
    derived: Dict[str, Any] = {f"postprocessors[{i}]": p.resume_fingerprint() for i, p in enumerate(postprocessors)}
    if devices is not None:
        derived["devices"] = devices
    fingerprint.update(flatten({"derived": {k: v for k, v in derived.items() if v}}))
    return fingerprint


def check_fingerprint(loaded: LoadedCheckpoint, current: Mapping[str, Any]) -> None:
    """Refuse to resume from ``loaded`` when its config or data differ from ``current``."""
    saved = loaded.state.get("fingerprint")
    if not saved:  # written before checkpoints carried one
        return
    diffs = fingerprint_diffs(saved, current)
    if not diffs:
        return
    shown = "; ".join(diffs[:12]) + (f"; and {len(diffs) - 12} more" if len(diffs) > 12 else "")
    raise ConfigError(
        f"cannot resume from {loaded.path}: this config differs from the one it was written with "
        f"({shown}); continuing would mix two different simulations in one logdir. Only "
        f"{', '.join(RESUME_MAY_CHANGE)} may change on --resume: resume with the original "
        f"config ({loaded.path.parent.parent / 'config.yml'}) or start a fresh run in another --logdir")


def find_resume_point(logdir: Path, fingerprint: Mapping[str, Any],
                      on_skip: Optional[Callable[[str], None]] = None) -> Optional[LoadedCheckpoint]:
    """The newest intact checkpoint of ``logdir``, checked against ``fingerprint``; None
    when there is no checkpoint. Reads only: nothing in the logdir changes."""
    try:
        loaded = CheckpointManager(Path(logdir) / "checkpoints").load_newest_intact(on_skip=on_skip)
    except CheckpointError as err:
        raise ConfigError(f"cannot resume: {err}") from None
    if loaded is not None:
        check_fingerprint(loaded, fingerprint)
    return loaded


def saved_partition_matches(path: Path, partition: Any) -> bool:
    """True when ``path`` holds exactly ``partition``; False when there is no file.

    A differing file means the data changed in a way the fingerprint did not see: the
    earlier rounds' clients are not this run's clients, so resuming is refused.
    """
    import numpy as np

    from fedrec.federated.partition import ClientPartition

    if not Path(path).is_file():
        return False
    try:
        saved = ClientPartition.load(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot resume: {path} is unreadable ({err}); start a fresh run") from None
    if not (np.array_equal(saved.offsets, partition.offsets) and np.array_equal(saved.indices, partition.indices)):
        raise ConfigError(f"cannot resume: the client split in {path} differs from the one this config and "
                          "data give, so the earlier rounds trained other clients; resume with the original "
                          "data and config or start a fresh run in another --logdir")
    return True

"""The ``fl`` config section, validated: unknown keys and wrong types are errors."""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional

import pydantic


class FLConfig(pydantic.BaseModel):
    """Federated simulation settings (``fl:`` in YAML; see configs/dlrm_fl.yml)."""

    # serialize_by_alias: ``async`` (a Python keyword, so the field is ``async_``) keeps its
    # YAML name in dumps and resume fingerprints
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True)

    fl_algo: Dict[str, Any] = {"name": "fed_avg"}
    backend: Literal["local", "mpi", "auto"] = "auto"
    num_workers: int = pydantic.Field(1000, ge=1)  # simulated trainers
    num_rounds: int = pydantic.Field(20, ge=1)
    client_num_per_round: int = pydantic.Field(100, ge=1)
    local_epochs: Optional[int] = pydantic.Field(None, ge=1)
    local_steps: Optional[int] = pydantic.Field(None, ge=1)
    local_batch_size: int = pydantic.Field(32, ge=1)
    local_lr: float = pydantic.Field(0.05, gt=0)
    local_optimizer: Optional[Dict[str, Any]] = None  # default: sgd at local_lr
    partitioner: Dict[str, Any] = {"name": "dirichlet", "alpha": 0.5}
    sampler: Dict[str, Any] = {"name": "uniform"}  # uniform | poisson | weighted
    postprocessors: List[Dict[str, Any]] = []  # e.g. [{name: l2_clip, bound: 1.0}]
    attack: Optional[Dict[str, Any]] = None  # e.g. {name: sign_flip, fraction: 0.1}
    topology: Dict[str, Any] = {"name": "star"}
    eval_every_n_rounds: int = pydantic.Field(1, ge=1)
    num_eval_batches: Optional[int] = pydantic.Field(None, ge=1)
    embedding_updates: Literal["dense", "sparse"] = "dense"
    embedding_aggregation: Literal["dense_equivalent", "per_row"] = "dense_equivalent"
    # dense mode computed with sparse internals where an untouched row provably cannot
    # change (same results bit for bit, bytes counted as dense); off: the full-table path
    dense_fast_path: Literal["auto", "off"] = "auto"
    # train a block of clients as one batched computation (fedrec/federated/client_engine.py);
    # auto: vectorized where the model and algorithm allow it, else sequential (the run
    # log says which and why)
    client_engine: Literal["sequential", "vectorized", "auto"] = "sequential"
    vectorize_memory_mb: int = pydantic.Field(1024, ge=1)  # memory one vectorized block may take
    # threads the vectorized engine's lanes run on (its results do not depend on it); None:
    # every core this process may use when it runs alone, fl.client_threads in one of several MPI processes
    vectorize_threads: Optional[int] = pydantic.Field(None, ge=1)
    seed: int = 0
    reduce_blocks: int = pydantic.Field(12, ge=1)  # fixed reduction blocks: same sums for any #processes
    mpi_processes: Optional[int] = pydantic.Field(None, ge=1)  # MPI processes to use (default: all)
    # torch threads for client training, the same in every backend (matmul sums may
    # depend on the thread count, so this keeps local and MPI results bit-identical)
    client_threads: int = pydantic.Field(1, ge=1)
    imports: List[str] = []  # modules (or .py files) imported on every process, e.g. user fl_algos
    keep_checkpoints: int = pydantic.Field(2, ge=1)
    checkpoint_every_n_rounds: int = pydantic.Field(1, ge=1)  # the last round is always saved
    value_bytes: int = pydantic.Field(4, ge=1)  # bytes per number on the wire (accounting)
    progress_bar: bool = True
    # device profiles and the virtual clock (docs/devices.md); None: no device time
    devices: Optional[Dict[str, Any]] = None  # checked by fedrec.federated.devices.DevicesConfig
    round_policy: Optional[Dict[str, Any]] = None  # deadline, over-commitment, ...; needs devices
    target_auc: Optional[float] = pydantic.Field(None, gt=0, le=1)  # summary: rounds and device time to reach it
    # asynchronous FL (FedBuff): {concurrency, buffer_size, staleness, server_lr}; needs
    # devices; checked by fedrec.federated.fedbuff.AsyncConfig (docs/devices.md)
    async_: Optional[Dict[str, Any]] = pydantic.Field(None, alias="async")

    @pydantic.model_validator(mode="after")
    def _check(self) -> "FLConfig":
        if self.local_epochs is not None and self.local_steps is not None:
            raise ValueError(
                f"set either local_epochs or local_steps, not both "
                f"(got local_epochs={self.local_epochs}, local_steps={self.local_steps})"
            )
        if self.client_num_per_round > self.num_workers:
            raise ValueError(
                f"client_num_per_round ({self.client_num_per_round}) exceeds num_workers ({self.num_workers})"
            )
        return self

    @property
    def optimizer_config(self) -> Dict[str, Any]:
        return dict(self.local_optimizer) if self.local_optimizer else {"name": "sgd", "lr": self.local_lr}


def import_modules(names: List[str]) -> None:
    """Import ``fl.imports`` (module names, or paths to ``.py`` files) so that what they
    register (``fl_algo`` and friends) exists in this process; every MPI worker does the same."""
    import importlib
    import importlib.util
    import os
    import sys
    from pathlib import Path

    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)  # user modules beside the run, also under `fedrec simulate`
    for name in names:
        if name.endswith(".py"):
            path = Path(name).resolve()
            module_name = f"fedrec_user_{path.stem}"
            if module_name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(module_name, path)
            if spec is None or spec.loader is None or not path.exists():
                raise FileNotFoundError(f"fl.imports: no Python file {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[module_name]
                raise
        else:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as err:
                if err.name and name.startswith(err.name):
                    from fedrec.utilities.registry import RegistryError

                    raise RegistryError(
                        f"fl.imports: cannot import {name!r} ({err}); the working directory {cwd} "
                        f"is on sys.path: run from the folder that holds it or set PYTHONPATH") from None
                raise


def fl_config_from(config: Dict[str, Any]) -> FLConfig:
    from fedrec.utilities.registry import validate_model

    return validate_model(FLConfig, config.get("fl") or {}, "fl")

"""The ``fl`` config section, validated: unknown keys and wrong types are errors."""

from __future__ import annotations

from typing import Any, Dict, Literal, Optional

import pydantic


class FLConfig(pydantic.BaseModel):
    """Federated simulation settings (``fl:`` in YAML; see configs/dlrm_fl.yml)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

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
    topology: Dict[str, Any] = {"name": "star"}
    eval_every_n_rounds: int = pydantic.Field(1, ge=1)
    num_eval_batches: Optional[int] = pydantic.Field(None, ge=1)
    embedding_updates: Literal["dense", "sparse"] = "dense"
    embedding_aggregation: Literal["dense_equivalent", "per_row"] = "dense_equivalent"
    seed: int = 0
    reduce_blocks: int = pydantic.Field(12, ge=1)  # fixed reduction blocks: same sums for any #processes
    mpi_processes: Optional[int] = pydantic.Field(None, ge=1)  # worker processes to use (default: all)
    client_threads: Optional[int] = pydantic.Field(None, ge=1)  # torch threads per process
    keep_checkpoints: int = pydantic.Field(2, ge=1)
    checkpoint_every_n_rounds: int = pydantic.Field(1, ge=1)  # the last round is always saved
    value_bytes: int = pydantic.Field(4, ge=1)  # bytes per number on the wire (accounting)
    progress_bar: bool = True

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
    def epochs(self) -> int:
        return self.local_epochs if self.local_epochs is not None else (1 if self.local_steps is None else 10**9)

    @property
    def optimizer_config(self) -> Dict[str, Any]:
        return dict(self.local_optimizer) if self.local_optimizer else {"name": "sgd", "lr": self.local_lr}


def fl_config_from(config: Dict[str, Any]) -> FLConfig:
    from fedrec.utilities.registry import validate_model

    return validate_model(FLConfig, config.get("fl") or {}, "fl")

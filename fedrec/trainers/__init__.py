"""Trainers: ``BaseTrainer`` and the registered ``dlrm`` trainer."""

from fedrec.trainers.base_trainer import BaseTrainer, LocalTrainResult, TrainProgress  # noqa: F401
from fedrec.trainers.dlrm_trainer import DLRMTrainConfig, DLRMTrainer  # noqa: F401
from fedrec.trainers.rec_trainer import RecTrainConfig, RecTrainer  # noqa: F401

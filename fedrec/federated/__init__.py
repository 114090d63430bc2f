"""Federated simulation: partitioners, update values, backends, the round loop, FL algorithms."""

from fedrec.federated import (  # noqa: F401  (registrations)
    attacks,
    fed_avg,
    fednova,
    fedprox,
    gossip,
    hierarchical,
    partition,
    postprocessors,
    privacy,
    qffl,
    robust,
    samplers,
    scaffold,
    secure_aggregation,
    sparse_privacy,
    topology,
)
from fedrec.federated.config import FLConfig  # noqa: F401
from fedrec.federated.fed_avg import FedAvgWorker  # noqa: F401
from fedrec.federated.update import RowUpdate, WeightedUpdate  # noqa: F401

"""Federated simulation: partitioners, update values, backends, the round loop, FedAvg."""

from fedrec.federated import fed_avg, partition  # noqa: F401  (registrations)
from fedrec.federated import robust  # noqa: F401  (median, trimmed_mean, krum)
from fedrec.federated.config import FLConfig  # noqa: F401
from fedrec.federated.fed_avg import FedAvgWorker  # noqa: F401
from fedrec.federated.update import RowUpdate, WeightedUpdate  # noqa: F401

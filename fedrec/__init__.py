"""fedrec: a federated-learning simulator for recommendation models."""

__version__ = "0.1.0"

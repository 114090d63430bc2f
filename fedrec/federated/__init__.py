"""fedrec.federated."""

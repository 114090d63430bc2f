"""fedrec.optimization."""

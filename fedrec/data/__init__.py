"""fedrec.data."""

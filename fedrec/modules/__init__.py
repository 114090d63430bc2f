"""fedrec.modules."""

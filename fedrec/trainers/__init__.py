"""fedrec.trainers."""

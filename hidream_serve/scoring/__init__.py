"""Candidate scorers (prompt-image alignment, ...), each loaded from a local directory."""

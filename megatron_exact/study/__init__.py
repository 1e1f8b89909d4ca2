"""Paired-run studies: arms x seeds of the CPT protocol, confidence intervals, one report."""

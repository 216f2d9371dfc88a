"""Scoring runs: the shapes report, the SFT tasks report, and the sampling defaults they measure."""

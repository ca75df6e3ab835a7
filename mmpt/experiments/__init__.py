"""Experiments built on the training and evaluation recipes: series of runs, comparisons, probes."""

"""Experiment drivers: they import the stages as libraries (never the reverse)."""

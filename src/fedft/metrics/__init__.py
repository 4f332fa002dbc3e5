"""Metrics: measuring cost, the run folder, plots and the report."""

"""Flywheel: a closed MLOps loop for tabular models on Prefect, MLflow and Evidently."""

__version__ = "0.1.0"

"""Prefect flows composing `tasks`: they own the cluster, the MLflow run,
progress, configuration and the CLI. A flow does no math."""

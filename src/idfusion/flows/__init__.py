"""Flows built on the identity pipelines: multi-step recipes that call a pipeline, such as fixed-template portraits."""

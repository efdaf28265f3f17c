"""Glue between a loss and the training loop, one module per method: data preparation and the step function."""

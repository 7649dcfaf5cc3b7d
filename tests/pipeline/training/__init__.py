"""Tests of the training, gate and promotion jobs."""

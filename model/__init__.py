"""Recommender algorithms in torch: pure functions and modules, no file or network I/O."""

"""Offline model zoo: real pretrained models assembled from package-shipped weights (no hub)."""

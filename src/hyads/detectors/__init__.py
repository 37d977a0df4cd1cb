"""Anomaly detectors that turn features into anomaly maps."""

"""Heads on cached features (the linear probe and its relatives): estimators, C selection,
calibration, metrics, validation splits. No torch at import time."""

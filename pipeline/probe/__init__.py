"""Heads on cached features (the linear probe and its relatives): the kinds registry,
estimators, feature rows, C selection, calibration, metrics, validation splits. No torch at
import time."""

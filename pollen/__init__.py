"""Pollen: federated fine-tuning of int8-quantized pretrained models with compressed updates."""

import os

# Flower stays offline and quiet wherever Pollen runs: no telemetry, no update check,
# and no dependency installs by the SuperLink (which would reach for the network).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

"""Pollen: federated fine-tuning of int8-quantized pretrained models with compressed updates."""

import logging
import os

# Flower stays offline and quiet wherever Pollen runs: no telemetry, no update check,
# and no dependency installs by the SuperLink (which would reach for the network).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

# torchao announces each GPU kernel library it cannot load, and torch's pytree warns about
# torchao's enums, on every import (peft imports torchao too); on a CPU both are expected.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

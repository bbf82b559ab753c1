"""Pollen: federated fine-tuning of int8-quantized pretrained models with compressed updates."""

import logging
import os

from pollen.flower_processes import OFFLINE

# Flower stays offline wherever Pollen runs, in this process as in those it starts.
for _name, _value in OFFLINE.items():
    os.environ.setdefault(_name, _value)

# torchao announces each GPU kernel library it cannot load, and torch's pytree warns about
# torchao's enums, on every import (peft imports torchao too); on a CPU both are expected.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

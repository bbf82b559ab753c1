"""How much of a finished run's accuracy survives when its change is cut to a share of entries.

    python benchmarks/budget_selection.py RUN [--shares 0.2 0.1 0.05 0.02] [--threads 1]

``downlink.budget`` keeps the global model within the largest share of entries changed
from the initial arrays. This takes a finished run folder (``pollen simulate --output
RUN``), keeps only that share of its model's change, ranked by each rule below, and
evaluates the result on the run's held-out split. It prints one JSON object: the full
model's accuracy and each rule's accuracy per share.

    magnitude     |change| (what the budget uses)
    tensor_rms    |change| over the RMS change of its tensor
    lora_effect   |change| times the norm of its LoRA partner's matching row or column
                  (the first-order change of the product B·A when the entry is dropped)
    without_A     |change|, with every change of LoRA's A left out
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from pollen.codec import flatten, largest, layout_of, unflatten
from pollen.data import load_dataset, num_classes
from pollen.metrics import evaluate
from pollen.models import initial_arrays, load_trainable, trainable_arrays
from pollen.server.export import run_model

RULES = ("magnitude", "tensor_rms", "lora_effect", "without_A")


def partner(name: str) -> str:
    return name.replace("lora_A", "lora_B") if "lora_A" in name else name.replace("lora_B", "lora_A")


def scores(rule: str, final: dict[str, np.ndarray], change: dict[str, np.ndarray],
           scaling: float) -> dict[str, np.ndarray]:
    out = {}
    for name, delta in change.items():
        size = np.abs(delta)
        if rule == "tensor_rms":
            size = size / (np.sqrt(np.mean(delta ** 2)) + 1e-12)
        elif rule == "lora_effect" and "lora_B" in name:  # B (out, r): B_ij meets row j of A
            rows = np.linalg.norm(final[partner(name)].reshape(size.shape[1], -1), axis=1)
            size = (size.reshape(size.shape[0], -1) * scaling * rows[None, :]).reshape(size.shape)
        elif rule == "lora_effect" and "lora_A" in name:  # A (r, in): A_jk meets column j of B
            B = final[partner(name)]
            columns = np.linalg.norm(B.reshape(B.shape[0], -1), axis=0)
            size = (size.reshape(size.shape[0], -1) * scaling * columns[:, None]).reshape(size.shape)
        elif rule == "without_A" and "lora_A" in name:
            size = np.zeros_like(size)
        out[name] = size
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.2, 0.1, 0.05, 0.02])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config, model = run_model(args.run)
    final = trainable_arrays(model)
    start = initial_arrays(config.model, num_classes(config.data), config.seed)
    _, test = load_dataset(config)
    change = {name: final[name] - start[name] for name in final}
    layout = layout_of(final)
    result = {"run": str(args.run), "entries": int(sum(v.size for v in final.values())),
              "full_accuracy": evaluate(model, test)["accuracy"], "accuracy_by_rule": {}}
    for rule in RULES:
        ranked = flatten(scores(rule, final, change, config.model.lora.alpha / config.model.lora.r))
        kept_by_share = {}
        for share in args.shares:
            keep = np.zeros(ranked.size, bool)
            keep[largest(ranked, round(share * ranked.size))] = True
            kept = unflatten(keep, layout)
            load_trainable(model, {name: np.where(kept[name], final[name], start[name]) for name in final})
            kept_by_share[str(share)] = evaluate(model, test)["accuracy"]
        result["accuracy_by_rule"][rule] = kept_by_share
        print(rule, json.dumps(kept_by_share), file=sys.stderr, flush=True)
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()

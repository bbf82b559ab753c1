"""Pruned export: per-layer magnitude pruning, a compressed file that is smaller, and an honest fine-tune split."""

from __future__ import annotations

import lzma

import numpy as np
import pytest
import torch
from test_export import fine_tuned_run

from pollen.cli import main
from pollen.data import load_dataset
from pollen.server.export import (PRUNABLE, ExportError, Pruning, export_run, load_model_bytes, merged_model,
                                  run_model, run_onnx, seeded_halves, weight_sparsity)


ROUNDING = 0.005  # each layer prunes round(S x its size) weights: the whole may fall a little short of S


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return fine_tuned_run(tmp_path_factory.mktemp("prune") / "run")


def test_each_layer_loses_its_smallest_weights_and_they_stay_int8_zeros(run):
    _, model = run_model(run)
    before = dict(merged_model(model, int8=False).named_modules())
    pruned = merged_model(model, int8=False, pruning=Pruning(0.5))
    layers = [(name, m) for name, m in pruned.named_modules() if isinstance(m, PRUNABLE)]
    assert len(layers) == 4  # tiny-cnn: two convolutions, two linear maps
    for name, layer in layers:
        weight = layer.weight.detach().flatten()
        original = before[name].weight.detach().abs().flatten()
        zeros = weight == 0
        assert zeros.float().mean() >= 0.5 - 1 / weight.numel()  # per layer, not overall
        assert original[~zeros].min() >= original[zeros].max()  # the smallest ones went
        assert torch.equal(weight[~zeros], before[name].weight.detach().flatten()[~zeros])  # the rest are kept
        assert "weight_orig" not in dict(layer.named_parameters())  # prune's masks are made permanent
    int8 = merged_model(model, int8=True, pruning=Pruning(0.5))
    assert weight_sparsity(int8) >= 0.5 - ROUNDING
    unpruned = merged_model(model, int8=True)
    assert weight_sparsity(unpruned) < 0.1


@pytest.mark.parametrize("format", ["onnx", "torch"])
def test_a_pruned_export_is_smaller_on_disk_and_reaches_its_sparsity(run, tmp_path, format):
    plain = export_run(run, format, tmp_path / f"plain.{format}")
    pruned = export_run(run, format, tmp_path / f"pruned.{format}.xz", pruning=Pruning(0.7))
    compressed = export_run(run, format, tmp_path / f"zero.{format}.xz", pruning=Pruning(0.0))
    assert pruned.bytes == pruned.path.stat().st_size < compressed.bytes < plain.bytes
    assert pruned.sparsity >= 0.7 - ROUNDING and pruned.max_difference <= 1e-4
    # Compressed on disk; decompressed, the model is as large as a dense one.
    assert pruned.path.read_bytes().startswith(b"\xfd7zXZ\x00")
    assert pruned.loaded_bytes == len(lzma.decompress(pruned.path.read_bytes())) >= 0.9 * plain.bytes


def test_at_sparsity_zero_the_compressed_export_computes_what_the_plain_one_does(run, tmp_path):
    plain = export_run(run, "onnx", tmp_path / "plain.onnx")
    zero = export_run(run, "onnx", tmp_path / "zero.onnx.xz", pruning=Pruning(0.0))
    config, _ = run_model(run)
    _, test = load_dataset(config)
    feeds = {"images": test.images[:16]}
    np.testing.assert_allclose(run_onnx(load_model_bytes(zero.path), feeds),
                               run_onnx(load_model_bytes(plain.path), feeds), atol=1e-6)
    assert zero.accuracy == plain.accuracy and zero.evaluated == plain.evaluated == len(test)


def test_the_fine_tune_learns_on_one_seeded_half_and_accuracy_is_measured_on_the_other(run, tmp_path):
    config, model = run_model(run)
    _, test = load_dataset(config)
    tune, evaluation = seeded_halves(test, seed=0)
    assert len(tune) + len(evaluation) == len(test)
    tuned_images = {tuple(image.flatten().tolist()) for image in tune.images}
    assert not any(tuple(image.flatten().tolist()) in tuned_images for image in evaluation.images)
    result = export_run(run, "onnx", tmp_path / "tuned.onnx.xz", pruning=Pruning(0.5, finetune_rounds=2))
    assert result.evaluated == len(evaluation) and result.sparsity >= 0.5 - ROUNDING
    untuned = merged_model(model, int8=True, pruning=Pruning(0.5))
    tuned = merged_model(model, int8=True, pruning=Pruning(0.5, finetune_rounds=2), finetune=tune)
    with torch.no_grad():
        assert not torch.equal(tuned(test.images[:8]), untuned(test.images[:8]))  # the fine-tune changed it
    assert weight_sparsity(tuned) >= 0.5 - ROUNDING  # and the pruned weights stayed zero


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, float("nan")])
def test_a_sparsity_outside_0_to_1_is_refused(sparsity):
    with pytest.raises(ExportError, match=r"^--prune .*: the sparsity must be in \[0, 1\)"):
        Pruning(sparsity)


def test_the_cli_writes_a_pruned_export_and_says_bad_input_in_one_line(run, tmp_path, capsys):
    out = tmp_path / "cli.onnx.xz"
    assert main(["export", str(run), "--prune", "0.5", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "pruned to sparsity 0.5" in printed and "accuracy" in printed
    for args, message in ((["--prune", "1"], "the sparsity must be in [0, 1)"),
                          (["--finetune-rounds", "2"], "give --prune S as well"),
                          (["--prune", "0.3", "--finetune-rounds", "-1"], "must be 0 or more"),
                          (["--prune", "0.3", "--format", "peft"], "use --format onnx or torch")):
        with pytest.raises(SystemExit) as exit:
            main(["export", str(run), *args])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and message in err and err.count("\n") == 1

"""Bad flag values exit 2 (Typer choices) before anything is loaded; `--top-k-heads` is checked against the
model's config before any weight is read; `--top-k-heads 0` builds no LoRA at all."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from typer.testing import CliRunner

from lorsu_edge.cli import choices
from lorsu_edge.cli.main import app
from lorsu_edge.config import METHODS, MethodConfig
from lorsu_edge.families import find_encoder
from lorsu_edge.inject import adapter_modules, freeze, inject, select_targets
from lorsu_edge.layers import HeadLoRALinear
from lorsu_edge.score import candidate_paths
from lorsu_edge.tiny import save_tiny, tiny_model, write_toy_images

runner = CliRunner()


def test_choice_types_match_the_library() -> None:
    """The CLI's Literal types are written out (no torch import for --help): they must not drift."""
    from lorsu_edge import export, load, losses, plan

    assert get_args(choices.Method) == METHODS
    assert get_args(choices.Loss) == losses.LOSSES == plan.LOSSES
    assert get_args(choices.Quantize) == load.QUANTIZE and set(plan.QUANTIZE_CHOICES) == set(load.QUANTIZE)
    assert get_args(choices.ExportPrecision) == export.PRECISIONS
    assert get_args(choices.TrainPrecision) == plan.DTYPE_CHOICES


@pytest.mark.parametrize("argv", [
    ["export", "--precision", "fp8"], ["export", "--fold-normalize", "int4"],
    ["adapt", "--data", "x", "--method", "dora"], ["adapt", "--data", "x", "--loss", "mse"],
    ["adapt", "--data", "x", "--quantize", "3bit"], ["adapt", "--data", "x", "--precision", "fp8"],
    ["adapt", "--data", "x", "--device", "gpu"], ["adapt", "--data", "x", "--device", "cuda:x"],
    ["eval", "--data", "x", "--quantize", "int4"], ["plan", "--dtype", "fp8"], ["plan", "--method", "x"],
    ["plan", "--loss", "x"], ["plan", "--quantize", "x"], ["demo", "--method", "x"], ["models", "build", "nope"],
])
def test_bad_choice_exits_2_naming_the_flag(argv: list[str]) -> None:
    """Bug: these exited 3 (bad input) after reading the workdir or loading the model, or 1."""
    res = runner.invoke(app, argv)
    assert res.exit_code == 2, res.output
    assert "Invalid value" in res.output


def test_good_device_values_pass() -> None:
    for ok in ("auto", "cpu", "cuda", "cuda:1"):
        assert choices.check_device(ok) == ok


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny("clip", tmp_path_factory.mktemp("clip"))


@pytest.mark.parametrize("verb", ["adapt", "plan"])
def test_top_k_heads_above_the_head_count_is_refused_before_loading(verb: str, tmp_path, clip_dir, monkeypatch):
    """Bug: --top-k-heads 5 on a 4-head tower failed inside head selection after the model loaded (exit 1)."""
    from lorsu_edge import adapt, load

    def no_loading(*a, **k):
        raise AssertionError("weights were loaded before the flag was checked")

    monkeypatch.setattr(adapt, "load_for_loss", no_loading)
    monkeypatch.setattr(load, "load_model", no_loading)
    args = ["--model", str(clip_dir), "--top-k-heads", "5"]
    if verb == "adapt":
        args += ["--data", str(write_toy_images(tmp_path / "d")), "--workdir", str(tmp_path / "wd")]
    res = runner.invoke(app, [verb, *args])
    assert res.exit_code == 3, res.output
    assert "--top-k-heads 5 is more than the 4 attention heads" in res.output and "hint:" in res.output


def test_top_k_heads_zero_builds_no_lora() -> None:
    """Bug: k = 0 still wrapped q/k/v in HeadLoRALinear on zero rows, with rank-r factors trained for nothing."""
    model = tiny_model("clip")
    spec = find_encoder(model)
    gen = torch.Generator().manual_seed(0)
    grads = {p: torch.randn(model.get_submodule(p).weight.shape, generator=gen) for p in candidate_paths(spec)}
    cfg = MethodConfig(method="lorsu", sparsity=0.1, top_k_heads=0, rank=4, alpha=4)
    targets = select_targets(spec, cfg, grads)
    assert targets and {t.kind for t in targets} == {"sparse"}
    inject(model, targets, cfg)
    counts = freeze(model, spec, cfg)
    assert not any(isinstance(m, HeadLoRALinear) for m in adapter_modules(model).values())
    assert counts["lora_params"] == 0 and counts["fc1_entries"] > 0
    assert not any(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)

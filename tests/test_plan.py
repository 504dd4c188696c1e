"""The planner: config-only predictions, refusal before any weight is read, settings that move the right way."""

from __future__ import annotations

import builtins
import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers as tf
import typer
from typer.testing import CliRunner

from lorsu_edge import plan as P
from lorsu_edge.budget import parse_size
from lorsu_edge.config import MethodConfig
from lorsu_edge.errors import BadInputError, ExitCode, OverBudgetError
from lorsu_edge.profiles import Profile, get_profile
from lorsu_edge.tiny import tiny_model

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30
MiB = 2**20


def _bench():
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "benchmarks" / "bench_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _profile(**kw) -> Profile:
    """A roomy test device with bitsandbytes and a small runtime, so model terms dominate."""
    base = dict(name="test", title="test device", device="cuda", total_memory=64 * GiB, unified=True,
                reserve=GiB, runtime_overhead=16 * MiB, compute_dtypes=("bf16", "fp16", "fp32"), bnb_4bit=True,
                note="test")
    return Profile(**{**base, **kw})


def _save_config(model_or_config, folder: Path) -> Path:
    cfg = getattr(model_or_config, "config", model_or_config)
    cfg.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {k: _save_config(tiny_model(k), root / k) for k in ("llava", "clip", "siglip", "dual_dinov2", "dinov2")}


@pytest.fixture(scope="module")
def small_llava(tmp_path_factory) -> Path:
    """Big enough that activations, weights and quantization all matter, small enough to simulate fast."""
    vision = tf.CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                                 image_size=64, patch_size=8)
    text = tf.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=4000, max_position_embeddings=512)
    cfg = tf.LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=3999,
                         vision_feature_layer=-2)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    return _save_config(cfg, tmp_path_factory.mktemp("small") / "llava")


@pytest.fixture(scope="module")
def llava7b(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llava7b")
    _bench().write_llava_config(folder)
    return folder


# --- config only: the LLaVA-1.5-7B plan from its public config.json -------------------------------------


def _clip_tower_params(h: int, inter: int, layers: int, patch: int, image: int) -> int:
    tokens = (image // patch) ** 2 + 1
    embed = 3 * patch * patch * h + h + tokens * h
    block = 4 * (h * h + h) + h * inter + inter + inter * h + h + 4 * h
    return embed + 2 * h + layers * block + 2 * h


def _llama_params(h: int, inter: int, layers: int, vocab: int) -> tuple[int, int]:
    """(decoder linear weights, everything else) of a Llama LM with an untied head."""
    linears = layers * (4 * h * h + 3 * h * inter)
    return linears, 2 * vocab * h + layers * 2 * h + h


def test_llava_7b_plan_from_config_alone(llava7b: Path) -> None:
    assert [p.name for p in llava7b.iterdir()] == ["config.json"]  # no weights anywhere
    plan = P.make_plan(llava7b, loss="ppl", profile=get_profile("jetson-orin-nano-8gb"))
    arch = P.describe(llava7b, "ppl")
    assert arch.encoder == _clip_tower_params(1024, 4096, 24, 14, 336)  # counted despite the truncated simulation
    linears, other = _llama_params(4096, 11008, 32, 32064)
    assert (arch.llm_quantizable, arch.llm_other) == (linears, other)
    assert arch.used_blocks == 23 and len(arch.candidate_numels) == 23  # vision_feature_layer -2
    weights = {c.name: c.bytes for c in plan.phase("train").components}
    assert weights["LLM weights"] == 2 * (linears + other)  # bf16, the profile has no working bitsandbytes
    assert weights["encoder weights"] == 4 * arch.encoder
    assert not plan.fits and plan.smallest_fitting_budget is None  # 13.5 GB of LLM on a 5.4 GiB budget
    assert plan.cheapest_change.startswith("--loss clip")
    with pytest.raises(OverBudgetError) as err:
        P.check_fits(plan)
    assert err.value.exit_code == ExitCode.OVER_BUDGET and "--loss clip" in err.value.hint

    clip = P.make_plan(llava7b, loss="clip", profile=get_profile("jetson-orin-nano-8gb"))
    assert clip.fits and clip.quantize == "none"
    assert all(c.name != "LLM weights" for p in clip.phases for c in p.components)  # the LLM is never loaded


def test_llava_7b_fits_in_4bit_where_bitsandbytes_works(llava7b: Path) -> None:
    nano = replace(get_profile("jetson-orin-nano-8gb"), bnb_4bit=True, reserve=parse_size("1GiB"))
    plan = P.make_plan(llava7b, loss="ppl", profile=nano)
    assert plan.quantize == "4bit" and plan.checkpointing
    linears, other = _llama_params(4096, 11008, 32, 32064)
    llm = next(c.bytes for c in plan.phase("train").components if c.name == "LLM weights")
    assert llm == int(linears * P.QUANT_BYTES["4bit"] + other * 2)


# --- refusing before any weight is read ----------------------------------------------------------------


def _forbid_weight_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        opened.append(str(file))
        if str(file).endswith((".safetensors", ".bin", ".pt", ".gguf")):
            raise AssertionError(f"the planner opened a weight file: {file}")
        return real_open(file, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("the planner read weights")

    import safetensors
    import safetensors.torch

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    return opened


@pytest.mark.parametrize("with_weights", [False, True])
def test_too_small_budget_is_refused_before_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    with_weights: bool) -> None:
    folder = tmp_path / "clip"
    model = tiny_model("clip")
    if with_weights:
        model.save_pretrained(folder)
        assert list(folder.glob("*.safetensors"))
    else:
        model.config.save_pretrained(folder)
    opened = _forbid_weight_reads(monkeypatch)
    plan = P.make_plan(folder, loss="clip", budget_bytes=4 * MiB, profile=_profile())
    assert not plan.fits and plan.smallest_fitting_budget > 4 * MiB
    with pytest.raises(OverBudgetError) as err:
        P.check_fits(plan)
    assert "--budget" in err.value.hint
    assert any(p.endswith("config.json") for p in opened)


def test_smallest_fitting_budget_fits(tiny_dirs: dict[str, Path]) -> None:
    tight = P.make_plan(tiny_dirs["clip"], loss="clip", budget_bytes=MiB, profile=_profile())
    assert not tight.fits
    just = P.make_plan(tiny_dirs["clip"], loss="clip", budget_bytes=tight.smallest_fitting_budget, profile=_profile())
    assert just.fits and just.predicted_peak_bytes <= tight.smallest_fitting_budget


# --- settings move in the right direction as the budget shrinks -----------------------------------------


def _shrink(folder: Path, loss: str, profile: Profile, batch_size: int = 8) -> list[P.Plan]:
    """Plans for ever smaller budgets: each time just below the previous plan's peak."""
    plans = [P.make_plan(folder, loss=loss, batch_size=batch_size, profile=profile)]
    while plans[-1].fits:
        plans.append(P.make_plan(folder, loss=loss, batch_size=batch_size, profile=profile,
                                 budget_bytes=plans[-1].predicted_peak_bytes - 1))
    return plans


def _rung(p: P.Plan, loss: str) -> tuple[int, int]:
    quants = ["none", "8bit", "4bit"] if p.role == "vlm" and loss == "ppl" else ["none"]
    return P.ladder(p.batch_size, quants, loss).index((p.quantize, p.checkpointing, p.micro_batch)), \
        p.importance_block_groups


def test_ppl_shrinks_micro_batch_then_checkpoints_then_quantizes(small_llava: Path) -> None:
    plans = _shrink(small_llava, "ppl", _profile())
    fitting = [p for p in plans if p.fits]
    rungs = [_rung(p, "ppl") for p in fitting]
    assert rungs == sorted(rungs) and len(set(rungs)) == len(rungs)  # strictly later rungs
    assert all(p.micro_batch * p.grad_accum == 8 for p in fitting)  # the effective batch never changes
    first_ckpt = next(i for i, p in enumerate(fitting) if p.checkpointing)
    first_quant = next(i for i, p in enumerate(fitting) if p.quantize != "none")
    assert any(p.micro_batch < 8 and not p.checkpointing for p in fitting[:first_ckpt])
    assert first_ckpt < first_quant
    assert [p.quantize for p in fitting[first_quant:]] == sorted((p.quantize for p in fitting[first_quant:]),
                                                                 key=["none", "8bit", "4bit"].index)
    assert plans[-1].smallest_fitting_budget == min(p.predicted_peak_bytes for p in fitting)
    peaks = [p.predicted_peak_bytes for p in plans]
    assert peaks == sorted(peaks, reverse=True)


def test_clip_checkpoints_before_splitting_the_contrastive_batch(tiny_dirs: dict[str, Path]) -> None:
    plans = [p for p in _shrink(tiny_dirs["clip"], "clip", _profile(runtime_overhead=MiB)) if p.fits]
    first_ckpt = next(i for i, p in enumerate(plans) if p.checkpointing)
    assert all(p.micro_batch == 8 for p in plans[:first_ckpt + 1])


def test_without_bitsandbytes_nothing_is_quantized(small_llava: Path) -> None:
    plans = _shrink(small_llava, "ppl", _profile(bnb_4bit=False))
    assert all(p.quantize == "none" for p in plans)


# --- the simulation itself -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, loss", [("llava", "ppl"), ("clip", "clip")])
def test_activations_are_affine_in_micro_batch(tiny_dirs: dict[str, Path], kind: str, loss: str) -> None:
    arch = P.describe(tiny_dirs[kind], loss)
    for ckpt in (False, True):
        direct = P._simulate(arch, "train", MethodConfig(), "bf16", 4, ckpt)
        assert P.activation_bytes(arch, "train", MethodConfig(), "bf16", 4, ckpt) == pytest.approx(direct, rel=0.05)


def test_truncated_stacks_extrapolate_to_full_depth(small_llava: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arch = P.describe(small_llava, "ppl")
    assert arch.full_layers == {"tower": 6, "llm": 4}
    short = {ckpt: P._simulate(arch, "train", MethodConfig(), "bf16", 2, ckpt) for ckpt in (False, True)}
    monkeypatch.setattr(P, "SIM_BLOCKS", 100)
    monkeypatch.setattr(P, "SIM_LLM_LAYERS", 100)
    full = P.describe(small_llava, "ppl")
    assert full.key != arch.key and full.encoder == arch.encoder and full.llm_quantizable == arch.llm_quantizable
    for ckpt in (False, True):
        exact = P._simulate(full, "train", MethodConfig(), "bf16", 2, ckpt)
        assert short[ckpt] == pytest.approx(exact, rel=0.05)
        assert short[ckpt] >= 0.98 * exact  # never much below what the full model needs


def test_fake_simulation_equals_real_allocations(tiny_dirs: dict[str, Path]) -> None:
    """The same step on real tensors allocates what the fake-tensor simulation counted (exactly on 4.57;
    5.x builds an explicit causal mask when it cannot inspect fake values: a little more, never less)."""
    from torch._subclasses import fake_tensor

    arch = P.describe(tiny_dirs["llava"], "ppl")
    fake = P._run_simulation(arch, "train", MethodConfig(), "fp32", 2, False)

    class NoFake:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fake_tensor, "FakeTensorMode", NoFake)
        real = P._run_simulation(arch, "train", MethodConfig(), "fp32", 2, False)
    assert real <= fake <= 1.1 * real


def test_planned_trainable_count_matches_real_injection(tiny_dirs: dict[str, Path]) -> None:
    from lorsu_edge.families import find_encoder
    from lorsu_edge.inject import adapter_modules, freeze, inject, select_targets
    from lorsu_edge.score import candidate_paths

    for kind, loss in (("llava", "ppl"), ("clip", "clip")):
        for cfg in (MethodConfig(), MethodConfig(method="spu"), MethodConfig(method="lora", rank=4)):
            model = tiny_model(kind)
            spec = find_encoder(model)
            grads = {p: torch.randn_like(model.get_submodule(p).weight) for p in candidate_paths(spec)}
            inject(model, select_targets(spec, cfg, grads), cfg)
            real = freeze(model, spec, cfg)["trainable_params"]
            plan = P.make_plan(tiny_dirs[kind], loss=loss, method_cfg=cfg, profile=_profile())
            assert plan.trainable_params == real
            wrappers = adapter_modules(model).values()
            size = P.adapter_size(P.describe(tiny_dirs[kind], loss), cfg)
            assert size.touched == sum(m._touched().numel() for m in wrappers)
            assert size.index_bytes == sum(b.numel() * b.element_size() for m in wrappers
                                           for n, b in m.named_buffers() if not n.startswith("base."))


def test_apply_checkpointing_keeps_gradients_in_train_and_eval_mode() -> None:
    from lorsu_edge.families import find_encoder

    model = tiny_model("llava")
    spec = find_encoder(model)
    for p in model.parameters():
        p.requires_grad_(False)
    weight = model.get_submodule(spec.blocks[0].fc1).weight.requires_grad_(True)
    ids = torch.randint(0, 250, (2, 24))
    ids[:, 1:17] = model.config.image_token_index
    pixels = torch.randn(2, 3, 32, 32)

    def grad() -> torch.Tensor:
        weight.grad = None
        model(input_ids=ids, pixel_values=pixels, labels=ids).loss.backward()
        return weight.grad.clone()

    model.train()
    reference = grad()
    assert P.apply_checkpointing(model, spec) == len(spec.blocks) + model.config.text_config.num_hidden_layers
    assert torch.equal(grad(), reference)
    model.eval()  # importance scores in eval mode: still checkpointed, same gradient
    assert torch.equal(grad(), reference)
    P.remove_checkpointing(model)
    assert model.model.language_model.config.use_cache is True
    assert not any("forward" in vars(m) for m in model.modules())


# --- inputs, profiles and roles ----------------------------------------------------------------------------


def test_bad_inputs_are_bad_input_errors(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    cases = [
        dict(model=tiny_dirs["clip"], loss="ppl"),  # a dual encoder has no LLM
        dict(model=tiny_dirs["dinov2"], loss="clip"),  # a bare encoder has no text tower
        dict(model=tiny_dirs["clip"], loss="mse"),
        dict(model=tiny_dirs["clip"], quantize="3bit"),
        dict(model=tiny_dirs["clip"], batch_size=0),
        dict(model=tiny_dirs["clip"], dtype="bf16", profile=get_profile("jetson-agx-xavier-32gb")),  # Volta
        dict(model=tmp_path / "nothing-here"),
    ]
    for case in cases:
        model = case.pop("model")
        with pytest.raises(BadInputError) as err:
            P.make_plan(model, **{"loss": "clip", **case})
        assert err.value.hint, case


def test_budget_is_capped_by_the_profile(tiny_dirs: dict[str, Path]) -> None:
    nano = get_profile("jetson-orin-nano-8gb")
    plan = P.make_plan(tiny_dirs["clip"], loss="clip", budget_bytes=parse_size("8GB"), profile=nano)
    assert plan.budget_bytes == nano.available and plan.requested_budget_bytes == parse_size("8GB")
    assert any("capped" in n for n in plan.notes)
    assert P.make_plan(tiny_dirs["clip"], loss="clip", profile=nano).budget_bytes == nano.available


def test_volta_defaults_to_fp16(tiny_dirs: dict[str, Path]) -> None:
    assert P.make_plan(tiny_dirs["clip"], loss="clip", profile="jetson-agx-xavier-32gb").dtype == "fp16"


def test_discrete_gpu_does_not_count_host_memory(tiny_dirs: dict[str, Path]) -> None:
    desktop = P.make_plan(tiny_dirs["clip"], loss="clip", profile="desktop-24gb")
    jetson = P.make_plan(tiny_dirs["clip"], loss="clip", profile=replace(get_profile("desktop-24gb"), unified=True))
    load_d, load_j = desktop.phase("load"), jetson.phase("load")
    staging = next(c.bytes for c in load_d.components if c.name == "checkpoint staging")
    assert staging > 0 and load_j.peak - load_d.peak >= staging
    assert not desktop.phase("export").part_of_adapt and desktop.peak_phase != "export"


def test_full_finetuning_pays_for_dense_optimizer_state(tiny_dirs: dict[str, Path]) -> None:
    lorsu = P.make_plan(tiny_dirs["clip"], loss="clip", profile=_profile())
    full = P.make_plan(tiny_dirs["clip"], loss="clip", method_cfg=MethodConfig(method="full"), profile=_profile())
    encoder = P.describe(tiny_dirs["clip"], "clip").encoder
    opt = {p.trainable_params: next(c.bytes for c in p.phase("train").components if c.name == "optimizer state")
           for p in (lorsu, full)}
    assert full.trainable_params == encoder > lorsu.trainable_params
    assert opt[encoder] == 8 * encoder  # two fp32 moments per entry
    assert "importance" not in [p.name for p in full.phases]  # nothing to score for full fine-tuning


def test_every_family_plans(tiny_dirs: dict[str, Path]) -> None:
    for kind, loss in (("llava", "ppl"), ("llava", "clip"), ("clip", "clip"), ("siglip", "clip"),
                       ("dual_dinov2", "clip")):
        plan = P.make_plan(tiny_dirs[kind], loss=loss, profile=_profile())
        assert plan.fits and plan.trainable_params > 0
        json.dumps(plan.to_dict(), default=str)
        assert {p.name for p in plan.phases} == {"load", "importance", "train", "merge", "export"}


# --- CLI -----------------------------------------------------------------------------------------------


def _app() -> typer.Typer:
    from lorsu_edge.cli import plan, profiles

    app = typer.Typer()
    app.command("plan")(plan.command)
    app.command("profiles")(profiles.command)
    return app


def test_cli_plan_fits_and_prints_the_breakdown(tiny_dirs: dict[str, Path]) -> None:
    result = CliRunner().invoke(_app(), ["plan", "--model", str(tiny_dirs["clip"]), "--profile", "cpu",
                                         "--budget", "2GiB"])
    assert result.exit_code == 0, result.output
    for word in ("load", "importance", "train", "merge", "optimizer state", "settings: micro-batch", "fits"):
        assert word in result.output


def test_cli_plan_over_budget_exits_4_with_hint(tiny_dirs: dict[str, Path]) -> None:
    result = CliRunner().invoke(_app(), ["plan", "--model", str(tiny_dirs["llava"]), "--profile", "cpu",
                                         "--budget", "2MiB", "--json"])
    assert result.exit_code == int(ExitCode.OVER_BUDGET)
    assert "error: needs" in result.output and "hint: the smallest budget that fits is --budget" in result.output
    doc = json.loads(result.output.splitlines()[0])
    assert doc["fits"] is False and doc["loss"] == "ppl"  # a VLM defaults to the perplexity loss


def test_cli_rejects_bad_budget(tiny_dirs: dict[str, Path]) -> None:
    result = CliRunner().invoke(_app(), ["plan", "--model", str(tiny_dirs["clip"]), "--budget", "lots"])
    assert result.exit_code == int(ExitCode.BAD_INPUT)
    assert "error:" in result.output and "hint:" in result.output and "Traceback" not in result.output


def test_cli_profiles_lists_every_profile() -> None:
    from lorsu_edge.profiles import list_profiles

    result = CliRunner().invoke(_app(), ["profiles"])
    assert result.exit_code == 0
    assert all(p.name in result.output for p in list_profiles())
    doc = json.loads(CliRunner().invoke(_app(), ["profiles", "--json"]).output)
    assert {d["name"] for d in doc} == {p.name for p in list_profiles()}


@pytest.mark.slow
def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--smoke", "--json", str(out),
                          "--results-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["llava_plans"] and all(r["predicted_peak_bytes"] > 0 for r in doc["llava_plans"])
    assert doc["runs"] and all(r["measured_peak_bytes"] > 0 for r in doc["runs"])


@pytest.mark.parametrize("n, groups", [(1, 1), (23, 1), (23, 5), (23, 23), (10, 3), (24, 7)])
def test_block_groups_cover_every_block_once(n: int, groups: int) -> None:
    parts = P.block_groups(n, groups)
    assert [i for g in parts for i in g] == list(range(n))
    assert len(parts) <= groups and all(g == list(range(g[0], g[-1] + 1)) for g in parts)


def test_importance_groups_bound_the_accumulators(llava7b: Path) -> None:
    """On a budget that holds the weights but not every fp32 accumulator at once, importance is grouped."""
    arch = P.describe(llava7b, "clip")
    everything = 4 * sum(arch.candidate_numels)
    roomy = P.make_plan(llava7b, loss="clip", batch_size=1, profile=_profile())
    assert roomy.importance_block_groups == 1
    acc = next(c.bytes for c in roomy.phase("importance").components if c.name == "importance accumulators")
    assert acc == everything
    tight = P.make_plan(llava7b, loss="clip", batch_size=1, profile=_profile(),
                        budget_bytes=roomy.phase("importance").peak - everything // 2)
    assert tight.fits and tight.importance_block_groups > 1
    acc = next(c.bytes for c in tight.phase("importance").components if c.name == "importance accumulators")
    assert acc < everything // 2 + everything // len(arch.candidate_numels)


def test_cli_plan_quantizes_as_adapt_does(tiny_dirs: dict[str, Path]) -> None:
    """`--quantize auto` means 4-bit where bitsandbytes works, for `plan` (per profile) as for `adapt`."""
    def planned(*extra: str) -> str:
        result = CliRunner().invoke(_app(), ["plan", "--model", str(tiny_dirs["llava"]), "--json", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.output.splitlines()[0])["quantize"]

    assert planned("--profile", "cpu") == "4bit"  # bnb_4bit = true
    assert planned("--profile", "jetson-orin-nano-8gb") == "none"  # PyPI bitsandbytes fails there
    assert planned("--profile", "cpu", "--quantize", "8bit") == "8bit"
    assert P.resolve_quantize("auto", "vlm", "clip", True) == "auto"  # no LLM is loaded: the planner's call
    assert P.resolve_quantize("4bit", "vlm", "ppl", False) == "none"  # adapt falls back at load time

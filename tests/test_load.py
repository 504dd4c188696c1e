"""Loading: quantized LLaVA keeps the tower and projector unquantized; gradients through 4-bit are right."""

import copy

import pytest
import torch
from torch import nn

from lorsu_edge.consumer import projector
from lorsu_edge.errors import BadInputError
from lorsu_edge.load import bitsandbytes_status, disable_cpu_repacking, load_model
from lorsu_edge.tiny import IMAGE_SIZE, save_tiny

bnb_problem = bitsandbytes_status()
needs_bnb = pytest.mark.skipif(bnb_problem is not None, reason=f"bitsandbytes unusable: {bnb_problem}")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny("llava", tmp_path_factory.mktemp("llava"))


def _dequantized_copy(model: nn.Module) -> nn.Module:
    """The same model with every Linear4bit replaced by an fp32 Linear holding its dequantized weight."""
    import bitsandbytes as bnb

    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data.copy_(w)
            if m.bias is not None:
                lin.bias.data.copy_(m.bias.data.float())
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, lin)
    return ref


def _encoder_grad(loaded_model, spec, batch):
    fc1 = loaded_model.get_submodule(spec.blocks[0].fc1).weight
    for p in loaded_model.parameters():
        p.requires_grad_(False)
    fc1.requires_grad_(True)
    loaded_model.zero_grad()
    loaded_model(**batch).loss.backward()
    g = fc1.grad.detach().clone()
    fc1.requires_grad_(False)
    return g


def _batch(vocab: int, image_token: int):
    n_img = (IMAGE_SIZE // 8) ** 2
    g = torch.Generator().manual_seed(0)
    text = torch.randint(image_token + 1, vocab, (2, 6), generator=g)
    ids = torch.cat([text[:, :2], torch.full((2, n_img), image_token), text[:, 2:]], dim=1)
    labels = ids.clone()
    labels[:, : 2 + n_img] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)}


@needs_bnb
def test_4bit_keeps_tower_and_projector_unquantized(llava_dir):
    import bitsandbytes as bnb

    loaded = load_model(str(llava_dir), quantize="4bit")
    assert loaded.quantize == "4bit"
    quantized = [n for n, m in loaded.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all("language_model" in n for n in quantized)
    assert all(p.dtype == torch.float32 for p in loaded.spec.tower.parameters())
    assert all(p.dtype == torch.float32 for p in projector(loaded.model).parameters())


@needs_bnb
def test_gradient_through_4bit_llm_after_eval_pass(llava_dir):
    """The AVX512-BF16 trap: an eval forward repacks 4-bit weights for a kernel without autograd.

    Tolerance: the 4-bit path computes in bf16, so we ask for cosine >= 0.99 and relative L2 error <= 5%
    against the same (dequantized) weights in fp32; the broken path measured ~100% error.
    """
    loaded = load_model(str(llava_dir), quantize="4bit")
    model, spec = loaded.model, loaded.spec
    batch = _batch(model.config.text_config.vocab_size, model.config.image_token_index)
    reference = _dequantized_copy(model)
    with torch.no_grad():  # the eval pass that triggers repacking on affected CPUs
        model(**{k: v for k, v in batch.items() if k != "labels"})
    got = _encoder_grad(model, spec, batch)
    want = _encoder_grad(reference, spec, batch)
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    rel = (got - want).norm() / want.norm()
    assert cos >= 0.99 and rel <= 0.05, f"cos {cos:.4f} rel {rel:.4f}"
    assert disable_cpu_repacking(model) > 0  # the fix is in place on every Linear4bit


def test_missing_folder_and_offline_hub_errors(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(BadInputError, match="hub") as e:
        load_model("no-such-org/no-such-model-xyz")
    assert "--model" in e.value.hint
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="config.json"):
        load_model(str(tmp_path / "empty"))


def test_encoder_tensors_missing_from_checkpoint_are_refused(tmp_path):
    """A checkpoint whose tower tensors are absent would silently load random weights: refuse."""
    from safetensors.torch import load_file, save_file

    d = save_tiny("clip", tmp_path / "clip")
    tensors = load_file(str(d / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "vision_model.encoder.layers.1." not in k},
              str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BadInputError, match="were not in the checkpoint"):
        load_model(str(d))

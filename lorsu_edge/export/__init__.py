"""Export: the merged encoder, as its consumer reads it, to ONNX, proven equal to PyTorch before it is kept.

What is exported is exactly `consumer.image_features`: for a VLM the hidden layer its projector consumes
(select strategy applied; `with_projector` adds the projector for LLM-ready embeddings), for a dual encoder
the image embedding, for a bare encoder its pooled output. The files read in the order of the work:

- `inputs`: the preprocessing recipe, `preprocessor_config.json`, real images -> proof/calibration batches
- `trace`: the module to export, traced once in fp32 by the dynamo exporter (legacy fallback, external data)
- `precision`: fp16 (LayerNorm kept fp32), int8 (dynamic, CPU), int8-qdq (static Q/DQ, TensorRT and CPU)
- `prove`: `onnx.checker`, then onnxruntime vs PyTorch at batch 1 and 3 (`TOLERANCES`)
- `publish`: metadata, sidecar, crash-safe rename into place, orphan cleanup
- `pipeline`: `export_onnx`, the steps above in order
- `request`: the verb's recipe (workdir -> session -> load only the tower and projector -> `export_onnx`)

Inputs and outputs stay float32 at every precision (casts inside the graph), so one preprocessing recipe
serves every file; `fold_normalize` makes the input raw uint8 (or 0..1 float) pixels instead. A failed proof
raises `ExportMismatchError` and leaves no file at `out`.
"""

from lorsu_edge.export.inputs import INPUT_NAME, PARITY_BATCHES, image_processor_of, input_spec, preprocess_spec
from lorsu_edge.export.pipeline import DEFAULT_OPSET, ExportResult, export_onnx
from lorsu_edge.export.precision import PRECISIONS
from lorsu_edge.export.prove import TOLERANCES, Parity, Tolerance, onnx_session
from lorsu_edge.export.publish import PREPROCESSOR_FILE, SIDECAR_FORMAT, read_sidecar, sidecar_path
from lorsu_edge.export.request import ExportRequest, default_out, export_request
from lorsu_edge.export.trace import ConsumerModule, output_name

__all__ = [
    "DEFAULT_OPSET", "INPUT_NAME", "PARITY_BATCHES", "PRECISIONS", "PREPROCESSOR_FILE", "SIDECAR_FORMAT",
    "TOLERANCES", "ConsumerModule", "ExportRequest", "ExportResult", "Parity", "Tolerance", "default_out",
    "export_onnx", "export_request", "image_processor_of", "input_spec", "onnx_session", "output_name",
    "preprocess_spec", "read_sidecar", "sidecar_path",
]

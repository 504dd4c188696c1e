"""Load a VLM or dual encoder (local folder or hub id), its processor, and resolve its image encoder.

The language model of a VLM may be quantized with bitsandbytes; the vision tower and the projector never
are, and stay fp32 so that their trained deltas are not rounded away. Loading checks that every encoder
tensor came from the checkpoint: a transformers-5.x checkpoint read by 4.57 silently re-initialises the
tower, and exporting or adapting random weights must never happen unnoticed.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorsu_edge.errors import BadInputError, UnsupportedModelError
from lorsu_edge.families import FAMILIES, EncoderSpec, find_encoder, find_projection
from lorsu_edge.merge import encoder_state_dict, tensors_hash

log = logging.getLogger(__name__)

QUANTIZE = ("auto", "4bit", "8bit", "none")
DUAL_TYPES = ("clip", "siglip", "vision-text-dual-encoder", "blip")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Both spellings: transformers 5.x no longer matches "vision_tower" as a substring of the full name.
NEVER_QUANTIZE = ["vision_tower", "model.vision_tower", "multi_modal_projector",
                  "model.multi_modal_projector", "lm_head"]


@dataclass
class Loaded:
    """A loaded model with its processor and resolved encoder."""

    model: nn.Module
    processor: Any
    spec: EncoderSpec
    source: str
    path: Path
    quantize: str = "none"
    notes: list[str] = field(default_factory=list)
    encoder_names: dict[str, str] | None = None  # model name -> name in the session files, when they differ

    @property
    def role(self) -> str:
        return self.spec.role


def resolve_source(source: str) -> Path:
    """A local model folder, or a hub id downloaded to the local cache (clear error when offline)."""
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise BadInputError(f"{path} has no config.json", hint="pass a folder written by save_pretrained")
        return path
    if not HUB_ID.match(source):
        raise BadInputError(f"model folder not found: {source}", hint="pass a local model folder or a hub id like org/name")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
    except Exception as e:  # offline, unknown repo, gated, ...
        raise BadInputError(
            f"cannot fetch {source!r} from the Hugging Face hub ({type(e).__name__})",
            hint="offline? download it elsewhere, copy the folder here and pass --model /path/to/folder",
        ) from None


def read_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise BadInputError(f"cannot read the model config in {path}: {str(e).splitlines()[0]}",
                            hint="is this a transformers model folder?") from None


def bitsandbytes_status() -> str | None:
    """None if 4-bit kernels work here; otherwise why not (Jetson wheels import, then fail on first use)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes as bnb
        layer = bnb.nn.Linear4bit(8, 8, bias=False, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(8, 8), requires_grad=False, quant_type="nf4")
        layer = layer.to("cuda" if torch.cuda.is_available() else "cpu")
        layer.support_avx512bf16_for_cpu = False  # see disable_cpu_repacking
        layer(torch.randn(2, 8, device=layer.weight.device))
        return None
    except Exception as e:  # ImportError, CUDA setup errors, missing kernels
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def disable_cpu_repacking(model: nn.Module) -> int:
    """Work around the AVX512-BF16 trap: an eval forward repacks 4-bit weights for a kernel without
    autograd, after which gradients through them are silently wrong. Returns how many layers were fixed."""
    n = 0
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _quantization(quantize: str, notes: list[str]):
    if quantize == "none":
        return None, "none"
    problem = bitsandbytes_status()
    if problem:
        if quantize != "auto":
            notes.append(f"bitsandbytes is unusable here ({problem}); loading the language model unquantized")
            log.warning(notes[-1])
        return None, "none"
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=NEVER_QUANTIZE), "8bit"
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              llm_int8_skip_modules=NEVER_QUANTIZE), "4bit"


def _model_class(config):
    import transformers as tf

    if config.model_type == "llava":
        return tf.LlavaForConditionalGeneration
    if config.model_type == "vision-text-dual-encoder":
        return tf.VisionTextDualEncoderModel
    return tf.AutoModel


def _check_complete(info: dict, spec: EncoderSpec, source: str) -> None:
    prefix = spec.param_prefix
    missing = [k for k in info.get("missing_keys", []) if k.startswith(prefix) or not prefix]
    if missing:
        raise BadInputError(
            f"{len(missing)} image-encoder tensors of {source} were not in the checkpoint (e.g. {missing[0]}); "
            "they would be random",
            hint="the checkpoint may come from another transformers version; re-save it with this one",
        )


def config_role(config) -> str:
    """"vlm", "dual" or "encoder", from the config alone (checks run before any weight is read)."""
    if config.model_type == "llava":
        return "vlm"
    if config.model_type in DUAL_TYPES:
        return "dual"
    if any(config.model_type in f.model_types for f in FAMILIES.values()):
        return "encoder"
    raise UnsupportedModelError(f"unsupported model type {config.model_type!r}",
                                hint="lorsu-edge adapts LLaVA-style VLMs, dual encoders (CLIP, SigLIP, "
                                "VisionTextDualEncoder) and CLIP/SigLIP/DINOv2/ViT/BLIP image encoders")


def load_model(source: str, quantize: str = "auto", device: str = "cpu") -> Loaded:
    """Load `source` for adaptation: encoder + projector fp32, LLM quantized (`quantize`) or bf16."""
    if quantize not in QUANTIZE:
        raise BadInputError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    path = resolve_source(source)
    config = read_config(path)
    config_role(config)  # refuses unsupported types before any weight is read
    notes: list[str] = []
    kwargs: dict[str, Any] = {"local_files_only": True, "output_loading_info": True}
    quant_used = "none"
    if config.model_type == "llava":
        qcfg, quant_used = _quantization(quantize, notes)
        lm_dtype = torch.float32 if device == "cpu" and qcfg is None and _small(config) else torch.bfloat16
        kwargs["dtype"] = {"text_config": lm_dtype, "vision_config": torch.float32, "": torch.float32}
        if qcfg is not None:
            kwargs.update(quantization_config=qcfg, device_map=device)
    else:
        kwargs["dtype"] = torch.float32
    try:
        model, info = _model_class(config).from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise BadInputError(f"cannot load the weights in {path}: {str(e).splitlines()[0]}",
                            hint="check that the folder holds the model's safetensors files") from None
    if quant_used == "4bit":
        disable_cpu_repacking(model)
    model.to(device).eval()
    spec = find_encoder(model)
    _check_complete(info, spec, source)
    return Loaded(model, load_processor(path), spec, source, path, quant_used, notes)


def _small(config) -> bool:
    """Tiny test LLMs stay fp32 on CPU so tests compare exactly; real ones use bf16."""
    text = getattr(config, "text_config", None)
    return text is not None and getattr(text, "hidden_size", 0) <= 256


def load_processor(path: Path):
    """The model's own processor (PIL-based: torchvision is not needed), or its image processor alone."""
    from transformers import AutoImageProcessor, AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True, use_fast=False)
    except (OSError, ValueError, TypeError, KeyError):
        try:
            return AutoImageProcessor.from_pretrained(path, local_files_only=True, use_fast=False)
        except (OSError, ValueError, TypeError, KeyError):
            raise BadInputError(f"no processor in {path}", hint="save the model's processor next to it "
                                "(processor.save_pretrained)") from None


def apply_encoder(loaded: Loaded, encoder_file: Path) -> None:
    """Load a session's merged encoder tensors (names as in the base state dict) into the model. A file that
    holds the visual projection (a session of --projection-rank, or one chained onto it) makes the projection
    part of `loaded.spec`'s encoder, so hashes cover what the file holds."""
    from safetensors.torch import load_file

    tensors = load_file(str(encoder_file))
    if loaded.encoder_names:
        back = {v: k for k, v in loaded.encoder_names.items()}
        tensors = {back.get(k, k): v for k, v in tensors.items()}
    projection = _projection_in(loaded, list(tensors), encoder_file)
    result = loaded.model.load_state_dict(tensors, strict=False)
    if projection:
        loaded.spec.projection = projection
    expected = {k for k in loaded.model.state_dict() if k.startswith(loaded.spec.param_prefix)}
    missing = expected - set(tensors)
    if result.unexpected_keys or missing:
        bad = (result.unexpected_keys or sorted(missing))[0]
        raise BadInputError(f"{encoder_file} does not match this model's encoder (e.g. {bad})",
                            hint="the session belongs to another base model")


def _projection_in(loaded: Loaded, names: list[str], encoder_file: Path) -> str | None:
    """The visual projection's path when the file holds tensors outside the tower: they must be its, nothing else."""
    outside = sorted(k for k in names if not k.startswith(loaded.spec.param_prefix))
    if not outside:
        return None
    try:
        path = find_projection(loaded.model, loaded.spec)
    except UnsupportedModelError:
        path = None
    if path is None or any(not k.startswith(f"{path}.") for k in outside):
        raise BadInputError(f"{encoder_file} does not match this model's encoder (e.g. {outside[0]})",
                            hint="the session belongs to another base model")
    return path


def _strip_tower_root(key: str) -> str:
    """Tower keys without the `vision_model.` root that CLIPVisionModel has and CLIPModel's tower lacks."""
    return key.removeprefix("vision_model.")


def vlm_tower_tensors(vlm_path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The vision tower's tensors from a LLaVA checkpoint, read from its safetensors files (no LLM loaded).

    Returns ({tower key without root: tensor}, the in-memory prefix of the tower in the VLM).
    """
    from safetensors import safe_open

    files = sorted(vlm_path.glob("*.safetensors"))
    if not files:
        raise BadInputError(f"no safetensors weights in {vlm_path}", hint="re-save the VLM with save_pretrained")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                for prefix in ("model.vision_tower.", "vision_tower."):  # 4.57 saves the legacy layout
                    if key.startswith(prefix):
                        out[_strip_tower_root(key.removeprefix(prefix))] = handle.get_tensor(key)
    return out, "model.vision_tower."


def load_vlm_tower_in_dual(vlm_source: str, text_model: str, device: str = "cpu") -> Loaded:
    """For `--loss clip` on a VLM: the dual encoder `text_model` with the VLM's tower weights in its image
    tower. The VLM's language model is never loaded (the cheap path). The returned spec never selects
    blocks the VLM does not read, and `encoder_names` maps tensors back to the VLM's own names."""
    vlm_path = resolve_source(vlm_source)
    vlm_config = read_config(vlm_path)
    if vlm_config.model_type != "llava":
        raise BadInputError(f"--text-model is for VLMs; {vlm_source} is a {vlm_config.model_type}",
                            hint="drop --text-model: a dual encoder has its own text tower")
    dual = load_model(text_model, device=device)
    if dual.role != "dual":
        raise BadInputError(f"--text-model {text_model} is not a dual encoder ({dual.spec.family.name} {dual.role})",
                            hint="pass the CLIP/SigLIP model the VLM's tower came from")
    tensors, prefix = vlm_tower_tensors(vlm_path)
    tower_keys = {_strip_tower_root(k): k for k in dual.spec.tower.state_dict()}
    problem = _tower_mismatch(tensors, dual.spec.tower.state_dict(), tower_keys)
    if problem:
        raise BadInputError(f"the towers of {vlm_source} and --text-model {text_model} differ: {problem}",
                            hint="--text-model must be the dual encoder whose image tower the VLM uses")
    with torch.no_grad():
        dual.spec.tower.load_state_dict({tower_keys[k]: v for k, v in tensors.items()})
    from lorsu_edge.families import used_blocks_for

    dual.spec.used_blocks = used_blocks_for(len(dual.spec.blocks), getattr(vlm_config, "vision_feature_layer", None))
    vlm_keys = vlm_tower_keys(vlm_config)
    dual.encoder_names = {dual.spec.param_prefix + full: prefix + vlm_keys[short] for short, full in tower_keys.items()}
    dual.source, dual.path = vlm_source, vlm_path
    dual.notes.append(f"clip loss through {text_model}; the VLM's language model is not loaded")
    return dual


def vlm_tower_keys(vlm_config) -> dict[str, str]:
    """{short key: key in the VLM's in-memory tower}, from the tower class built on the meta device
    (no memory, no weights): CLIPVisionModel keeps a `vision_model.` root in 4.57, not in 5.x."""
    from transformers import AutoModel

    with torch.device("meta"):
        tower = AutoModel.from_config(vlm_config.vision_config)
    return {_strip_tower_root(k): k for k in tower.state_dict()}


def _tower_mismatch(vlm: dict[str, torch.Tensor], dual: dict[str, torch.Tensor], keys: dict[str, str]) -> str | None:
    missing = sorted(set(keys) - set(vlm))
    extra = sorted(set(vlm) - set(keys))
    if missing or extra:
        return f"{len(missing)} tensors missing, {len(extra)} unexpected (e.g. {(missing or extra)[0]})"
    for short, full in keys.items():
        if tuple(vlm[short].shape) != tuple(dual[full].shape):
            return f"{short} is {tuple(vlm[short].shape)} in the VLM, {tuple(dual[full].shape)} in the dual encoder"
    return None


@dataclass
class SessionRef:
    """A workdir's base model and one of its sessions (None: the base model itself)."""

    workdir: Any  # lorsu_edge.session.Workdir | None
    base_model: str
    session: str | None
    report: dict[str, Any]


def resolve_session(workdir: Path, session: str | None = None, base: bool = False,
                    model: str | None = None) -> SessionRef:
    """Find the workdir, base model and session (`--session`, `--base`, else the current model);
    BadInputError with a hint when impossible (no workdir, another model, a rejected session)."""
    from lorsu_edge.integrity import require_intact
    from lorsu_edge.session import REPORT_FILE, WORKDIR_FILE, Workdir, absolute_source

    if base and session is not None:
        raise BadInputError("--base and --session exclude each other", hint="pass one of them")
    has_wd = (Path(workdir) / WORKDIR_FILE).exists()
    wd = Workdir.open(workdir) if has_wd or not (base and model) else None
    remembered = wd.remembered("base_model") if wd else None
    model = absolute_source(model)  # as adapt remembered it
    if model and remembered and model != remembered:
        raise BadInputError(f"workdir {workdir} adapts {remembered}, not {model}",
                            hint="drop --model, or pass the workdir of that model")
    base_model = model or remembered
    if not base_model:
        raise BadInputError(f"workdir {workdir} has no base model yet", hint="pass --model, or run adapt first")
    sid = None if (base or wd is None) else (wd.session(session).id if session is not None
                                                  else wd.current())
    report: dict[str, Any] = {}
    if sid is not None:
        info = wd.session(sid)
        if not info.accepted:
            raise BadInputError(f"session {sid} was rejected ({info.reason or 'no reason given'})",
                                hint="export an accepted session (see `lorsu-edge history`) or --base")
        require_intact(wd, sid)  # exit 3 + a rollback hint: never publish or score a damaged encoder
        report = json.loads((info.path / REPORT_FILE).read_text())
    return SessionRef(wd, base_model, sid, report)


def apply_session(loaded: Loaded, res: SessionRef) -> None:
    """Put the session's merged encoder into the loaded base model and prove it is exactly that encoder."""
    from lorsu_edge.integrity import is_pruned
    from lorsu_edge.retention import rebuild_into
    from lorsu_edge.session import ENCODER_FILE

    if res.session is None:
        _check_base(loaded, res)
        return
    if is_pruned(res.workdir.session_dir(res.session)):  # `prune` removed it: replay the adapters
        rebuild_into(loaded, res.workdir, res.session)
    else:
        apply_encoder(loaded, res.workdir.session_dir(res.session) / ENCODER_FILE)
    expected = res.report.get("encoder_sha256")
    actual = tensors_hash(encoder_state_dict(loaded.model, loaded.spec))
    if expected and expected != actual:
        raise BadInputError(f"session {res.session}'s encoder does not reproduce its recorded hash",
                            hint="the session files or the base model changed since it was trained")


def _check_base(loaded: Loaded, res: SessionRef) -> None:
    """The base model must be the one the workdir's first session started from (when there is one)."""
    if res.workdir is None:
        return
    started = [r for r in res.workdir.history() if r.get("parent") is None and r.get("base_encoder_sha256")]
    if started and started[0]["base_encoder_sha256"] != tensors_hash(
            encoder_state_dict(loaded.model, loaded.spec)):
        raise BadInputError(f"the base model {res.base_model} changed since session {started[0]['id']} was "
                            "trained on it", hint="restore the original base model folder")




def load_session_model(res: SessionRef, quantize: str = "auto", device: str = "cpu") -> Loaded:
    """The base model with the session's merged encoder in it, verified against the session's hash."""
    loaded = load_model(res.base_model, quantize, device=device)
    apply_session(loaded, res)
    return loaded

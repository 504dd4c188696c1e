"""Shared pieces of the benchmark scripts: model configs written out by hand, shape-only targets,
trainable/optimizer-state accounting, the research code's dense masked-gradient reference, child
processes with their own peak RSS, and result writing.

Nothing here is part of the package: the dense reference exists only to be measured against.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

# ---------------------------------------------------------------------------------------------
# Configs (written from the published config.json files; no download)
# ---------------------------------------------------------------------------------------------

# CLIP ViT-L/14-336 image tower (openai/clip-vit-large-patch14-336 = LLaVA-1.5's encoder).
CLIP_L336_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
# CLIP ViT-L/14's text tower (123.7M parameters).
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu")
# CLIP ViT-B/16 (openai/clip-vit-base-patch16).
CLIP_B16_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=16, projection_dim=512, hidden_act="quick_gelu")
CLIP_B16_TEXT = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                     max_position_embeddings=77, vocab_size=49408, projection_dim=512, hidden_act="quick_gelu")
# Llama-2-7B as in llava-hf/llava-1.5-7b-hf (Vicuna-7B v1.5; vocab padded to 32064).
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 hidden_act="silu", tie_word_embeddings=False)
LLAVA_15_7B = dict(image_token_index=32000, pad_token_id=32001, projector_hidden_act="gelu",
                   vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False,
                   architectures=["LlavaForConditionalGeneration"])

# Tiny stand-ins with the same structure, for --smoke (seconds).
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   image_size=32, patch_size=8, projection_dim=16)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, vocab_size=300, projection_dim=16)
TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=300, max_position_embeddings=256, tie_word_embeddings=False)


def clip_config(vision: dict, text: dict):
    """A CLIPConfig (dual encoder) from vision and text sub-config dicts."""
    from transformers import CLIPConfig

    return CLIPConfig(vision_config=dict(vision), text_config=dict(text),
                      projection_dim=vision.get("projection_dim", 512))


def find_repo_config(name: str) -> Path | None:
    """A `<name>/config.json` written by someone else in the repo (e.g. the planner), if any."""
    for path in sorted(REPO.glob(f"**/{name}/config.json")):
        if ".venv" not in path.parts and "results" not in path.parts:
            return path
    return None


def llava_config(smoke: bool = False) -> tuple[Any, str]:
    """(LlavaConfig, where it came from): LLaVA-1.5-7B (a repo copy if one exists), or a tiny LLaVA."""
    from transformers import AutoConfig, LlavaConfig

    if smoke:
        return LlavaConfig(vision_config={**TINY_VISION, "model_type": "clip_vision_model"},
                           text_config={**TINY_LLAMA, "model_type": "llama"},
                           **{**LLAVA_15_7B, "image_token_index": 299, "pad_token_id": 0}), "tiny (smoke)"
    found = find_repo_config("llava-1.5-7b")
    if found is not None:
        return AutoConfig.from_pretrained(str(found.parent)), str(found.relative_to(REPO))
    cfg = LlavaConfig(vision_config={**CLIP_L336_VISION, "model_type": "clip_vision_model"},
                      text_config={**LLAMA2_7B, "model_type": "llama"}, **LLAVA_15_7B)
    return cfg, "benchmarks/_common.py (llava-hf/llava-1.5-7b-hf, written by hand)"


# ---------------------------------------------------------------------------------------------
# Targets and accounting
# ---------------------------------------------------------------------------------------------


def trainable_params(model: nn.Module) -> int:
    """Elements of every parameter that requires grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adam_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of Adam's two moments (exp_avg + exp_avg_sq) actually held by `opt`."""
    total = 0
    for state in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                total += state[key].numel() * state[key].element_size()
    return total


def grad_bytes(model: nn.Module) -> int:
    """Bytes of the .grad tensors currently held."""
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


def buffer_bytes(model: nn.Module, names: tuple[str, ...]) -> int:
    """Bytes of the buffers whose last name component is in `names` (index sets, masks)."""
    return sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in names)


# ---------------------------------------------------------------------------------------------
# The research code's dense masked-gradient approach (reference only)
# ---------------------------------------------------------------------------------------------


class DenseMaskedLoRALinear(nn.Module):
    """LoRA with full-size factors whose product is multiplied by a full-size 0/1 mask (selected heads' rows).

    This is what the project does *not* do: B is out x r (every row), and every forward builds the
    whole out x in product B A and multiplies it by an out x in fp32 mask.
    """

    def __init__(self, base: nn.Linear, rows: torch.Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        dev = base.weight.device
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        row_mask = torch.zeros(base.out_features, 1, device=dev)
        row_mask[rows.to(dev)] = 1.0
        self.register_buffer("mask", row_mask.expand(base.out_features, base.in_features).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (self.lora_B @ self.lora_A) * self.mask * self.scaling
        return self.base(x) + F.linear(x, delta)


def inject_dense_reference(model: nn.Module, targets: list, rank: int, alpha: float) -> None:
    """Apply the research code's recipe for the same selection that `targets` (LoRSU's) describes.

    fc1: the whole weight trains, a hook multiplies its gradient by a full-size fp32 0/1 mask (Adam still
    keeps dense moments for it). q/k/v: `DenseMaskedLoRALinear`. fc1 and q/k/v biases train, as there.
    Everything else is frozen.
    """
    from lorsu_edge.inject import replace_module

    for p in model.parameters():
        p.requires_grad_(False)
    for t in targets:
        base = model.get_submodule(t.path)
        if base.bias is not None:
            base.bias.requires_grad_(True)
        if t.kind == "sparse":
            mask = torch.zeros(base.weight.numel(), device=base.weight.device)
            mask[t.index.to(mask.device)] = 1.0
            mask = mask.view_as(base.weight)
            base.register_buffer("grad_mask", mask)
            base.weight.requires_grad_(True)
            base.weight.register_hook(lambda g, m=mask: g * m)
        else:
            replace_module(model, t.path, DenseMaskedLoRALinear(base, t.index, rank, alpha))


# ---------------------------------------------------------------------------------------------
# Child processes (one per method, so each peak RSS is that method's alone)
# ---------------------------------------------------------------------------------------------


def run_child(script: Path, payload: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run `script --child JSON` in a fresh interpreter; return its JSON result plus `child_peak_rss_bytes`
    (ru_maxrss of that process from `os.wait4`). Raises RuntimeError with the child's stderr on failure.

    Writing 5 to /proc/self/clear_refs resets ru_maxrss as well as VmHWM (measured): a child that resets
    must report its earlier peak itself (`setup_peak_rss_bytes`); see `peak_rss`."""
    from lorsu_edge.memory import child_peak_rss_bytes

    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "result.json", Path(tmp) / "stderr.txt"
        cmd = [sys.executable, str(script), "--child", json.dumps({**payload, "out": str(out)})]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        with open(err, "w") as err_f:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_f, env=env)
            start = time.monotonic()
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() - start > timeout:
                    proc.kill()
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait on a reaped pid
        if proc.returncode != 0 or not out.is_file():
            tail = err.read_text()[-3000:]
            raise RuntimeError(f"child {payload} failed (exit {proc.returncode}):\n{tail}")
        result = json.loads(out.read_text())
    result["child_peak_rss_bytes"] = child_peak_rss_bytes(usage)
    return result


def peak_rss(result: dict[str, Any]) -> int:
    """The child's whole-life peak: wait4's ru_maxrss, or a peak the child read before resetting it."""
    return max(result.get(k, 0) for k in ("child_peak_rss_bytes", "setup_peak_rss_bytes",
                                          "train_peak_rss_bytes", "step_peak_rss_bytes"))


def child_payload(argv: list[str] | None) -> dict[str, Any] | None:
    """The JSON after `--child` when this interpreter is a benchmark child, else None."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--child":
        return json.loads(argv[1])
    return None


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def base_parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    ap.add_argument("--smoke", action="store_true", help="tiny models, seconds: checks the script runs")
    ap.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON goes")
    return ap


def kernel_parser(doc: str, shapes: list[str], repeats: int) -> argparse.ArgumentParser:
    """base_parser plus the per-kernel scripts' shape list, repeat count and thread count."""
    ap = base_parser(doc)
    ap.add_argument("--shapes", nargs="+", choices=shapes, default=shapes)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU time is summed over them)")
    return ap


def report(doc: dict[str, Any], text: str, name: str, args: argparse.Namespace) -> int:
    """Print a script's table, write its JSON (see write_results) and say where; the scripts' exit code."""
    print(text)
    print(f"wrote {write_results(doc, name, args.smoke, args.results_dir)}")
    return 0


def env_info() -> dict[str, Any]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M")}


def write_results(doc: dict[str, Any], name: str, smoke: bool, results_dir: Path) -> Path:
    """Write `doc` to `<results_dir>/<name>[_smoke].json` (smoke never overwrites a real run)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / f"{name}{'_smoke' if smoke else ''}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return out


def fmt_count(n: float) -> str:
    """1234567 -> '1.23M' (k, M, G, T)."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"

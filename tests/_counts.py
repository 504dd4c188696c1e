"""Trainable entries per method, written out from the configs (an independent count for the benchmark tests)."""

from __future__ import annotations

import math


def expected_trainable(method: dict, vision: dict, used_blocks: int | None = None) -> int:
    """Entries `method` (a MethodConfig.to_dict()) trains on a tower with separate q/k/v (`vision`: a config dict).

    Per block: lorsu/spu keep floor(sparsity * fc1 entries); lorsu/lora put rank-r factors on q, k and v
    (A: r x hidden, B: chosen rows x r, rows = heads * head_dim); lorsu also trains the fc1 and q/k/v biases.
    """
    hidden, inter, heads = vision["hidden_size"], vision["intermediate_size"], vision["num_attention_heads"]
    name, rank = method["method"], method["rank"]
    fc1 = math.floor(method["sparsity"] * inter * hidden) if name in ("lorsu", "spu") else 0
    lora_heads = {"lorsu": method["top_k_heads"], "lora": heads}.get(name, 0)
    lora = 3 * (rank * hidden + lora_heads * (hidden // heads) * rank) if lora_heads else 0
    biases = inter + 3 * hidden if name == "lorsu" else 0
    return (used_blocks or vision["num_hidden_layers"]) * (fc1 + lora + biases)

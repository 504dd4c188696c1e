#!/usr/bin/env bash
# Second CI leg: the family, core, adapt and export tests on transformers 5.x, whose vision towers are laid
# out differently (flattened CLIPVisionModel, ViT `layers`, DINOv2 `q_proj`, output objects from
# get_image_features). The real-weights extras (sentence-transformers) pin transformers < 4.58, so they stay out.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-tf5
. .venv-tf5/bin/activate
python -m pip install -q --upgrade pip
grep -vE '^(transformers|tokenizers|huggingface_hub|sentence-transformers)==' constraints.txt \
  > .venv-tf5/constraints.txt
cat constraints-tf5.txt >> .venv-tf5/constraints.txt
pip install -q -c .venv-tf5/constraints.txt -e ".[quant]" pytest
python -m pytest -q -m "not realweights" tests/test_select.py tests/test_core.py tests/test_load.py \
  tests/test_adapt_cli.py tests/test_export.py tests/test_export_deploy.py tests/test_budget.py tests/test_profiles.py \
  tests/test_profiles_jetson.py tests/test_plan.py tests/test_losses.py tests/test_families.py tests/test_layers.py \
  tests/test_layers_sparse.py tests/test_train.py

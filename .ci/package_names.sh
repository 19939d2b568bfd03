#!/usr/bin/env bash
# Our kernels' package beside Hugging Face's `kernels` (which transformers >= 5.23 installs): each
# must import as itself, from outside the repo and from its root, in the venv the tests ran in.
#   .ci/package_names.sh [VENV]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=$(cd "${1:-.venv}" && pwd)/bin/python
OUTSIDE=$(mktemp -d)
trap 'rm -rf "$OUTSIDE"' EXIT
cd "$OUTSIDE"

echo "== from $OUTSIDE: kernels is Hugging Face's, gpt2kernels is ours"
"$PY" - "$ROOT" <<'EOF'
import sys
from pathlib import Path

import gpt2kernels
import kernels

root = Path(sys.argv[1])
assert hasattr(kernels, "get_kernel"), f"`kernels` is not Hugging Face's: {kernels.__file__}"
assert "site-packages" in Path(kernels.__file__).parts, kernels.__file__
assert Path(gpt2kernels.__file__).resolve().parent == root / "gpt2kernels", gpt2kernels.__file__
print(f"kernels     {kernels.__file__}")
print(f"gpt2kernels {gpt2kernels.__file__}")
EOF

echo "== from $OUTSIDE: gpt2engine --model random:gpt2 --max-new-tokens 3"
"$(dirname "$PY")/gpt2engine" --model random:gpt2 --max-new-tokens 3

echo "== from the root: pip install --no-deps --no-build-isolation -e ."
cd "$ROOT"
"$PY" -m pip install -q --no-deps --no-build-isolation -e .

echo "== from the root: transformers' GPT2LMHeadModel.from_pretrained (hub kernels on, their default)"
env -u USE_HUB_KERNELS "$PY" - <<'EOF'
import tempfile

import torch
import transformers

config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64)
model = transformers.GPT2LMHeadModel(config).eval()
with tempfile.TemporaryDirectory() as path:
    model.save_pretrained(path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
ids = torch.randint(0, config.vocab_size, (1, 7))
with torch.no_grad():
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
print(f"transformers {transformers.__version__}: from_pretrained loaded the saved model, logits equal")
EOF
echo "package names: ok"

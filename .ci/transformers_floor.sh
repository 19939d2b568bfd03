#!/usr/bin/env bash
# The oldest transformers the test extra allows (setup.py: transformers>=4.40) reads the tokenizer
# files benchmarks.peer_ctranslate2.save_gpt2_tokenizer writes, as the newest does in the main venv.
# A side venv holds only that transformers and sees the main venv's packages (torch, pytest) through
# a .pth file, read after its own site-packages: its transformers wins. ~20 MB of wheels, ~30 s.
#   .ci/transformers_floor.sh [MAIN_VENV]
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN=$(cd "${1:-.venv}" && pwd)
FLOOR=$(sed -n 's/.*"transformers>=\([0-9.]*\)".*/\1/p' setup.py | head -n 1)
SIDE=${TRANSFORMERS_FLOOR_VENV:-/tmp/transformers-floor-venv}
if [ ! -x "$SIDE/bin/python" ] || ! "$SIDE/bin/python" -c "import transformers as t; assert t.__version__.startswith('$FLOOR')" 2>/dev/null; then
  rm -rf "$SIDE"
  python3 -m venv "$SIDE"
  "$SIDE/bin/pip" install -q --disable-pip-version-check "transformers==$FLOOR.*"
fi
purelib() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
purelib "$MAIN/bin/python" > "$(purelib "$SIDE/bin/python")/gpt2engine-main-venv.pth"
"$SIDE/bin/python" -c "import transformers as t; print('transformers', t.__version__)"
"$SIDE/bin/python" -m pytest -q -n 0 -p no:cacheprovider tests/test_benchmarks_smoke.py::test_the_peers_gpt2_tokenizer_is_ours

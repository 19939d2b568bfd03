#!/usr/bin/env bash
# The AOT compile check (python -m gpt2kernels.aot) under Triton 3.6, the version the GPU machine runs,
# beside the 3.9 that CI's venv holds and .ci/run checks the same way. A side venv holds
# only triton 3.6 and sees the main venv's packages (torch) through a .pth file, which Python reads
# after the side venv's own site-packages: its triton wins. Costs a 188 MB wheel download and, on 2
# cores, about as long as the 3.9 check (see the closing line of the report).
#   .ci/aot_triton36.sh [MAIN_VENV] [REPORT_FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN=$(cd "${1:-.venv}" && pwd)
REPORT=${2:-/dev/null}
SIDE=${TRITON36_VENV:-/tmp/triton36-venv}
if [ ! -x "$SIDE/bin/python" ] || ! "$SIDE/bin/python" -c 'import triton' 2>/dev/null; then
  python3 -m venv "$SIDE"
  "$SIDE/bin/pip" install -q --disable-pip-version-check --no-deps triton==3.6.0
fi
purelib() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
purelib "$MAIN/bin/python" > "$(purelib "$SIDE/bin/python")/gpt2engine-main-venv.pth"
"$SIDE/bin/python" -c 'import triton, torch; assert triton.__version__.startswith("3.6"), triton.__version__'
env -u TRITON_INTERPRET "$SIDE/bin/python" -m gpt2kernels.aot | tee "$REPORT" | tail -n 25

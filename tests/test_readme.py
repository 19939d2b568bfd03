"""The README's Python examples run as written, on whatever device is here (CPU in CI), with a
small random checkpoint in place of the hub's gpt2 (no network)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_python_examples_run_in_order(tiny_checkpoint):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 2
    code = "\n".join(blocks)
    assert code.count('engine.load_model("gpt2"') == 1
    code = code.replace('engine.load_model("gpt2"', f"engine.load_model({str(tiny_checkpoint)!r}")
    code = code.replace("max_new_tokens=50", "max_new_tokens=5")
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    out, reqs = namespace["out"], namespace["reqs"]
    assert [len(t) for t in out.tokens] == [5, 5] or any(r == "stop" for r in out.finish_reasons)
    assert all(r.finished and r.tokens for r in reqs)

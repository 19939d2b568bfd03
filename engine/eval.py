"""``python -m engine.eval``: the perplexity of a model on a text, by sliding windows (``engine.scoring``).

A user mistake ends in one ``error:`` line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from .cli import (EXIT_USER_ERROR, HelpFormatter, int_at_least, CommandParser, UsageError, add_placement_options,
                  read_text, run_cli)

EXAMPLES = """examples:
  python -m engine.eval --model gpt2 --text-file wiki.test.raw
  cat book.txt | python -m engine.eval --model gpt2-xl --stride 1024 --batch-size 8 --json"""


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m engine.eval", formatter_class=HelpFormatter,
                description="Perplexity of GPT-2 on a text: windows of --window tokens every --stride tokens, each "
                            "token scored once with the context its window gives (HF's perplexity guide's method; "
                            "the first token is not scored). Prints tokens scored, mean loss (nats), perplexity and "
                            "tokens/s.", epilog=EXAMPLES)
    p.add_argument("--model", default="gpt2", help="as for engine.generate (default: gpt2)")
    p.add_argument("--text-file", help="the text (UTF-8); default: standard input")
    p.add_argument("--window", type=int_at_least("--window", 2), default=None,
                   help="tokens a window (default: the model's positions, 1024)")
    p.add_argument("--stride", type=int_at_least("--stride", 1), default=None,
                   help="tokens between window starts, at most --window (default: half the window, 512)")
    p.add_argument("--max-tokens", type=int_at_least("--max-tokens", 2), default=None,
                   help="score only the text's first N tokens")
    p.add_argument("--batch-size", type=int_at_least("--batch-size", 1), default=1,
                   help="windows a forward (default: 1)")
    add_placement_options(p, "default: float32 on CPU (as HF evaluates), float16 on a GPU",
                          "default: triton on a CUDA device (the fused lm_head + cross-entropy kernel), eager on CPU")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object, the last line of stdout")
    return p


def _read_text(path: str | None) -> str:
    text = read_text(path, "--text-file")
    if text is None:
        raise UsageError("give --text-file, or pipe the text to standard input")
    return text


def run(args) -> int:
    import torch

    from .errors import EngineError
    from .model.loader import default_device, load_model
    from .scoring import check_window, perplexity, windows
    from .tokenizer import encode

    text = _read_text(args.text_file)
    if not text.strip():
        raise UsageError("the text is empty")
    try:
        device = torch.device(args.device) if args.device else default_device()
    except RuntimeError:
        raise UsageError(f"invalid device {args.device!r}: use cpu, cuda or cuda:N") from None
    try:
        model = load_model(args.model, device=device, dtype=args.dtype or ("float32" if device.type == "cpu" else None),
                           backend=args.backend, quantize=args.quantize)
        window, stride = check_window(model, args.window, args.stride)
        ids = encode(text)[:args.max_tokens]
        bar = _progress_bar(sum(w.end - w.first for w in windows(len(ids), window, stride)))
        result = perplexity(model, ids, window, stride, args.batch_size, progress=bar.update if bar else None)
        if bar:
            bar.close()
    except (EngineError, torch.cuda.OutOfMemoryError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return EXIT_USER_ERROR
    summary = {"tokens": result.tokens, "loss": result.loss, "perplexity": result.perplexity,
               "seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
               "model": args.model, "window": window, "stride": stride,
               "dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device), "backend": model.backend,
               "quantize": model.quantize}
    weights = f"{model.quantize} weights, {summary['dtype']}" if model.quantize else summary["dtype"]
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"tokens scored: {result.tokens}\nloss: {result.loss:.4f} nats/token\n"
              f"perplexity: {result.perplexity:.4f}\nspeed: {result.tokens_per_second:.1f} tokens/s "
              f"({weights} {summary['device']} {summary['backend']}, window {summary['window']}, "
              f"stride {summary['stride']})")
    return 0


def _progress_bar(total: int):
    """A tqdm bar on stderr counting ``total`` scored tokens (itself off when stderr is no terminal);
    None without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="tok", desc="scoring", file=sys.stderr, disable=None, leave=False)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return run_cli(build_parser, run, argv, prog)


if __name__ == "__main__":
    sys.exit(main())

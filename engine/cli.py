"""``python -m engine.generate``: stream GPT-2 text to stdout, stats to stderr.

A user mistake ends in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable

from .backends import BACKENDS
from .loader import DTYPES

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage too; one line is what we promise
        raise _UsageError(message)


class _UsageError(Exception):
    pass


def _parsed(text, kind, what):
    """``kind(text)``, or the message argparse prints for a value that is not a number at all."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None


def _float_in(name, interval, inside):
    """A float parser for option ``name`` accepting what ``inside(v)`` accepts; errors name the
    ``interval`` ("[0, 1]", "(0, inf)", ...). NaN is never inside: every comparison with it is false."""
    def parse(text):
        v = _parsed(text, float, f"{name} must be a number in {interval}")
        if not (math.isfinite(v) and inside(v)):
            raise argparse.ArgumentTypeError(f"{name} must be in {interval}, got {text}")
        return v
    return parse


def _int_at_least(name, low):
    def parse(text):
        v = _parsed(text, int, f"{name} must be an integer >= {low}")
        if v < low:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= {low}, got {text}")
        return v
    return parse


def add_placement_options(p: argparse.ArgumentParser, dtype_help: str,
                          backend_help: str = "default: triton on a CUDA device, eager on CPU") -> None:
    """--device, --dtype and --backend, as every command takes them (each command says its defaults)."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help=dtype_help)
    p.add_argument("--backend", choices=sorted(BACKENDS), default=None, help=backend_help)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m engine.generate", description="Generate text with GPT-2.")
    p.add_argument("--model", default="gpt2",
                   help="hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, openai-community/...), "
                        "a local HF directory, or random:<size> for random weights (default: gpt2)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (default: read standard input when it is not a terminal)")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=_int_at_least("--max-new-tokens", 1), default=100)
    p.add_argument("--temperature", type=_float_in("--temperature", "[0, inf)", lambda v: v >= 0), default=1.0,
                   help="0 means greedy (default: 1.0)")
    p.add_argument("--top-k", type=_int_at_least("--top-k", 0), default=0, help="0 disables (default: 0)")
    p.add_argument("--top-p", type=_float_in("--top-p", "(0, 1]", lambda v: 0 < v <= 1), default=1.0, help="nucleus mass in (0, 1]; 1 disables (default: 1.0)")
    p.add_argument("--min-p", type=_float_in("--min-p", "[0, 1]", lambda v: 0 <= v <= 1), default=0.0,
                   help="drop tokens below this fraction of the top token's probability; 0 disables (default: 0)")
    p.add_argument("--repetition-penalty", type=_float_in("--repetition-penalty", "(0, inf)", lambda v: v > 0), default=1.0,
                   help="HF's: > 1 discourages tokens of the prompt and output; 1 disables (default: 1)")
    p.add_argument("--presence-penalty", type=_float_in("--presence-penalty", "[-2, 2]", lambda v: -2 <= v <= 2), default=0.0,
                   help="OpenAI's, in [-2, 2]: subtracted once from every token already generated (default: 0)")
    p.add_argument("--frequency-penalty", type=_float_in("--frequency-penalty", "[-2, 2]", lambda v: -2 <= v <= 2), default=0.0,
                   help="OpenAI's, in [-2, 2]: subtracted per occurrence of a generated token (default: 0)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the text where TEXT appears (left out); repeat for several")
    p.add_argument("--max-time", type=_float_in("--max-time", "(0, inf)", lambda v: v > 0), default=None,
                   help="stop generating after this many seconds")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--num-samples", type=_int_at_least("--num-samples", 1), default=1,
                   help="samples of the same prompt, generated as one batch")
    add_placement_options(p, "default: float16 (the fastest on CPU here too, with greedy tokens matching fp32)")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", default=None,
                   help="on CUDA, run every decode step op by op instead of replaying it as a CUDA graph")
    p.add_argument("--allow-special", action="store_true", help="treat <|endoftext|> in the prompt as the special token")
    p.add_argument("--no-stop-at-eos", dest="stop_at_eos", action="store_false",
                   help="keep generating after <|endoftext|>")
    return p


def _read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise _UsageError(f"cannot read --prompt-file {args.prompt_file}: {e}") from None
    if not sys.stdin.isatty():
        return sys.stdin.read()
    return ""


def run(args) -> int:
    import torch

    from .errors import EngineError
    from .generation import generate
    from .loader import load_model

    prompt = _read_prompt(args)
    try:
        model = load_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
        if args.num_samples == 1:
            def on_text(row, piece):
                sys.stdout.write(piece)
                sys.stdout.flush()
        else:
            on_text = None
        out = generate(model, [prompt] * args.num_samples, args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_at_eos=args.stop_at_eos,
                       on_text=on_text, allow_special=args.allow_special, cuda_graph=args.cuda_graph,
                       min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                       presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                       stop=args.stop, max_time=args.max_time)
    except (EngineError, torch.cuda.OutOfMemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.num_samples == 1:
        sys.stdout.write("\n")
    else:
        for i, text in enumerate(out.texts):
            sys.stdout.write(f"=== sample {i + 1} ===\n{text}\n")
    sys.stdout.flush()
    new = sum(len(t) for t in out.tokens)
    graph = model.device.type == "cuda" and args.cuda_graph is not False
    capture = f", graph capture {out.capture_seconds:.2f} s" if out.capture_seconds else ""
    print(f"[{model.config.n_layer}L/{model.config.n_embd}d {model.dtype} {model.device} "
          f"{model.backend}{'+graph' if graph else ''}] load {model.load_seconds:.2f} s{capture} | "
          f"prompt {len(out.prompt_tokens[0])} tok, prefill "
          f"{out.prefill_seconds * 1e3:.1f} ms | {new} new tok, decode {out.decode_tokens_per_second:.1f} tok/s",
          file=sys.stderr)
    return 0


def run_cli(build: Callable[[], argparse.ArgumentParser], run: Callable[[argparse.Namespace], int],
            argv: list[str] | None) -> int:
    """Parse ``argv`` with ``build()``'s parser and ``run`` the command: a usage mistake is one
    ``error:`` line and exit status 2, Ctrl-C exit status 130, a closed stdout (``| head``) 0."""
    try:
        return run(build().parse_args(argv))
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser, run, argv)

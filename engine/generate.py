"""``python -m engine.generate`` (also ``gpt2engine``, its default command): stream GPT-2 text to
stdout, stats to stderr.

A user mistake ends in one ``error:`` line on stderr and exit status 2, never a traceback. The first
Ctrl-C ends the generation at the next token, keeping the text and printing the stats; a second one
leaves at once. ``engine.generate`` stays the function although this module has its name (see
``engine/__init__.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import signal
import sys
import threading
import time

from .cli import (EXIT_INTERRUPTED, EXIT_USER_ERROR, CommandParser, HelpFormatter, add_placement_options,
                  add_sampling_options, float_in, int_at_least, int_in, read_text, run_cli, sampling_options,
                  utf8_argument)
from .core.request import SEED_LIMIT

EXAMPLES = """examples:
  python -m engine.generate --model gpt2 --prompt "The meaning of life is" --max-new-tokens 50 --seed 0
  echo "Once upon a time" | gpt2engine --model gpt2-xl --temperature 0.8 --top-p 0.95 --num-samples 3
  gpt2engine --model ./my-finetune --prompt-file prompt.txt --temperature 0 --no-echo --json

other commands: gpt2engine eval (perplexity of a text), gpt2engine serve (an OpenAI-compatible server);
python -m engine works like gpt2engine"""
_seed = int_in("--seed", 0, SEED_LIMIT - 1, "in [0, 2^64)")  # check_seed's rule, in argparse's words


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m engine.generate", formatter_class=HelpFormatter, epilog=EXAMPLES,
                description="Generate text with GPT-2: the prompt (echoed), then the completion streamed as it is\n"
                            "sampled, on stdout; one stats line on stderr.")
    p.add_argument("--model", default="gpt2",
                   help="hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, openai-community/...), "
                        "a local HF directory, or random:<size> for random weights")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (default: standard input when it is not a terminal)")
    src.add_argument("--prompt-file", help="read the prompt from this file (UTF-8)")
    p.add_argument("--max-new-tokens", type=int_at_least("--max-new-tokens", 1), default=100,
                   help="tokens to generate at most per sample")
    add_sampling_options(p)
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the text where TEXT appears (left out); repeat for several")
    p.add_argument("--max-time", type=float_in("--max-time", "(0, inf)", lambda v: v > 0), default=None,
                   help="stop generating after this many seconds")
    p.add_argument("--seed", type=_seed, default=None,
                   help="seed for reproducible sampling (default: drawn at random and shown in the stats line)")
    p.add_argument("--num-samples", type=int_at_least("--num-samples", 1), default=1,
                   help="samples of the prompt, one after another, each streamed under its header; sample i is "
                        "seeded with seed + i, so it equals a single run with that seed")
    p.add_argument("--echo", action=argparse.BooleanOptionalAction, default=True,
                   help="print the prompt before its completion")
    p.add_argument("--json", action="store_true",
                   help="print no text as it streams, but one JSON object (texts, tokens, seeds, timings) as the "
                        "last line of stdout, for scripts")
    p.add_argument("--threads", type=int_at_least("--threads", 1), default=None,
                   help="CPU threads for PyTorch (default: one per physical core that other processes leave free, "
                        "re-read each second while decoding)")
    add_placement_options(p, "default: float16 on a GPU; on CPU the dtype measured fastest on this machine "
                             "(timed once, then cached; the stats line says so), float32 with --quantize")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", default=None,
                   help="on CUDA, run every decode step op by op instead of replaying it as a CUDA graph")
    p.add_argument("--allow-special", action="store_true",
                   help="treat <|endoftext|> in the prompt as the special token")
    p.add_argument("--no-stop-at-eos", dest="stop_at_eos", action="store_false",
                   help="keep generating after <|endoftext|>")
    return p


def _read_prompt(args) -> str:
    """--prompt as given; a file or standard input without its final newline (the one ``echo`` and
    editors add, which would otherwise start the completion on a new line). Text that is not UTF-8
    is refused, wherever it comes from. An empty prompt is said in one line on stderr: the
    completion then starts from <|endoftext|>, as GPT-2's unconditional samples do."""
    if args.prompt is not None:
        text = utf8_argument(args.prompt, "--prompt")
    else:
        text = read_text(args.prompt_file, "--prompt-file") or ""
        text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        source = "--prompt-file " + args.prompt_file if args.prompt_file else \
            "--prompt" if args.prompt is not None else "standard input"
        print(f"note: the prompt ({source}) is empty: generating from <|endoftext|>", file=sys.stderr)
    return text


@contextlib.contextmanager
def _ctrl_c_sets(event: threading.Event):
    """While inside, the first Ctrl-C sets ``event`` instead of raising; a second one raises
    KeyboardInterrupt. (Outside the main thread signals cannot be handled: Ctrl-C stays as it is.)"""
    def handler(signum, frame):
        if event.is_set():
            raise KeyboardInterrupt
        event.set()

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(args) -> int:
    import torch

    from gpt2kernels.sampling import as_int64

    from .core.cpu_threads import pin_threads
    from .errors import EngineError
    from .generation import generate
    from .model.loader import load_model

    start = time.perf_counter()
    if args.threads:
        pin_threads(args.threads)
    prompt = _read_prompt(args)
    seed = args.seed if args.seed is not None else secrets.randbits(63)
    try:
        model = load_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                           quantize=args.quantize)
    except (EngineError, torch.cuda.OutOfMemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    stream = not args.json
    cancel = threading.Event()
    outputs = []
    wrote = False
    with _ctrl_c_sets(cancel):
        try:
            for i in range(args.num_samples):
                if cancel.is_set():
                    break
                # The header and the echo wait for the first text, so that a refused prompt prints nothing.
                held = ""
                if stream and args.num_samples > 1:
                    gap = "\n" if i else ""
                    held += f"{gap}=== sample {i + 1}/{args.num_samples}, seed {(seed + i) % SEED_LIMIT} ===\n"
                if stream and args.echo:
                    held += prompt

                def on_text(row, piece):
                    nonlocal held, wrote
                    _write(held + piece)
                    held, wrote = "", True

                out = generate(model, prompt, args.max_new_tokens, seed=as_int64(seed + i),
                               stop_at_eos=args.stop_at_eos, on_text=on_text if stream else None,
                               allow_special=args.allow_special, cuda_graph=args.cuda_graph, stop=args.stop,
                               max_time=args.max_time, cancel=cancel, **sampling_options(args))
                outputs.append(out)
                if stream:
                    on_text(0, "\n")
        except (EngineError, torch.cuda.OutOfMemoryError) as e:
            if wrote:
                _write("\n")  # end the partial text: the error line goes to stderr alone
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
    summary = _summary(args, model, prompt, seed, outputs, time.perf_counter() - start, cancel.is_set())
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        print(_stats_line(summary), file=sys.stderr)
    return EXIT_INTERRUPTED if cancel.is_set() else 0


def _summary(args, model, prompt: str, seed: int, outputs: list, total_seconds: float, interrupted: bool) -> dict:
    """What a run did, as ``--json`` prints it; the stats line is made from it too."""
    import torch

    decode_seconds = sum(o.decode_seconds for o in outputs)
    decode_steps = sum(o.decode_steps for o in outputs)
    return {
        "model": args.model, "prompt": prompt, "prompt_tokens": len(outputs[0].prompt_tokens[0]) if outputs else None,
        "seed": seed, "interrupted": interrupted,
        "samples": [{"text": o.texts[0], "tokens": o.tokens[0], "finish_reason": o.finish_reasons[0],
                     "seed": (seed + i) % SEED_LIMIT}
                    for i, o in enumerate(outputs)],
        "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."), "backend": model.backend,
        "dtype_reason": model.dtype_reason, "quantize": model.quantize,
        "cuda_graph": model.device.type == "cuda" and args.cuda_graph is not False,
        "threads": torch.get_num_threads() if model.device.type == "cpu" else None,
        "layers": model.config.n_layer, "width": model.config.n_embd,
        "load_seconds": model.load_seconds, "capture_seconds": sum(o.capture_seconds for o in outputs),
        "prefill_seconds": sum(o.prefill_seconds for o in outputs), "decode_seconds": decode_seconds,
        "new_tokens": sum(len(o.tokens[0]) for o in outputs),
        "decode_tokens_per_second": decode_steps / decode_seconds if decode_seconds > 0 else None,
        "total_seconds": total_seconds,
    }


def _stats_line(s: dict) -> str:
    explained = s["dtype_reason"] != "requested" and s["device"] == "cpu"
    dtype = s["dtype"] + (f" ({s['dtype_reason']})" if explained else "")
    weights = f"{s['quantize']} weights, {dtype}" if s["quantize"] else dtype
    where = f"{s['layers']}L/{s['width']}d {weights} {s['device']} {s['backend']}"
    where += "+graph" if s["cuda_graph"] else ""
    where += f", {s['threads']} thread{'s' if s['threads'] > 1 else ''}" if s["threads"] else ""
    capture = f", graph capture {s['capture_seconds']:.2f} s" if s["capture_seconds"] else ""
    samples = len(s["samples"])
    prefill = (f"prompt {s['prompt_tokens']} tok, prefill {s['prefill_seconds'] / samples * 1e3:.1f} ms"
               + (" each" if samples > 1 else "")) if samples else "no sample finished"
    speed = s["decode_tokens_per_second"]
    decode = f"decode {speed:.1f} tok/s" if speed else "no decode step"
    return (f"[{where}] seed {s['seed']} | load {s['load_seconds']:.2f} s{capture} | {prefill} | "
            f"{s['new_tokens']} new tok, {decode} | total {s['total_seconds']:.2f} s"
            + (" | interrupted" if s["interrupted"] else ""))


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return run_cli(build_parser, run, argv, prog)


if __name__ == "__main__":
    sys.exit(main())

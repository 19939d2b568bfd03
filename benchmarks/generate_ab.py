"""``generate()`` decode speed at batch 1 and 8, fp32 and bf16 (random gpt2, CPU, 32-token prompts,
128 greedy tokens, the median of 3 runs per case): run it from two checkouts in turn to compare a
change's before and after on the same machine in one session, as
``benchmarks/results/cpu/generate_ab.md`` records for the scheduler becoming generate()'s driver.

    (cd /tmp/before && python -m benchmarks.generate_ab) ; python -m benchmarks.generate_ab
"""

import statistics

import engine


def main() -> None:
    res = {}
    for dtype in ("float32", "bfloat16"):
        model = engine.load_model("random:gpt2", device="cpu", dtype=dtype)
        for batch in (1, 8):
            prompts = [[(7 * r + i) % 50000 for i in range(32)] for r in range(batch)]
            engine.generate(model, prompts, 8, temperature=0, stop_at_eos=False)  # warm-up
            runs = [engine.generate(model, prompts, 128, temperature=0, stop_at_eos=False).decode_tokens_per_second
                    for _ in range(3)]
            res[f"{dtype} b{batch}"] = round(statistics.median(runs), 1)
    print(res)


if __name__ == "__main__":
    main()

"""Benchmark harness: sft_scale against TRL's SFTTrainer, a plain transformers Trainer and the
model's bare training step, on the same model, data, hyperparameters and optimizer steps.

    .venv/bin/python -m bench.run --reps 3 --out docs/BENCHMARKS.md
    .venv/bin/python -m bench.run --quick --out /tmp/bench.md      # smoke test, well under a minute

See bench/README.md for what each method is and how the numbers are taken.
"""

"""Quantizer and GAN ablation at a fixed budget, run with the repo's own commands.

    python -m benchmarks.ablation [--config configs/fashion_mnist_small.yaml] [--out runs/ablation]
                                  [--only ID ...] [--eval-images 2000] [--jobs N] [key=value ...]

Each variant trains ``train_vqgan.py`` with a few overrides of the config (same architecture,
batch, steps and data), evaluates with ``generate.py reconstruct`` on the first ``--eval-images``
test images, and lands as one row of a Markdown table (``OUT/ablation.md``) and of
``OUT/ablation.json``. ``--jobs N`` trains N variants at once, each with cores/N threads (on a
small CPU two one-thread runs get more done than one two-thread run); the train-time column is
then the time of a run sharing the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLAIN_VQ = ["model.codebook_dim=null", "model.l2_norm=false", "model.ema=false", "model.dead_code_steps=0"]
RAW_GAN = ["loss.adaptive_weight_max=1e4", "loss.disc_warmup_steps=0"]

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "reference": ("plain VQ, reference lr and GAN (constant 2e-4, no weight EMA, unclamped GAN)",
                  PLAIN_VQ + RAW_GAN + ["train.lr=2e-4", "train.lr_schedule=constant", "train.warmup_steps=0",
                                        "train.ema_decay=0"]),
    "plain": ("plain VQ with our lr schedule, weight EMA and GAN schedule", PLAIN_VQ),
    "l2": ("+ l2-normalised lookup", ["model.codebook_dim=null", "model.ema=false", "model.dead_code_steps=0"]),
    "lowdim": ("+ low-dimensional (8) lookup", ["model.ema=false", "model.dead_code_steps=0"]),
    "ema": ("+ EMA codebook updates (instead of dead-code restart)", ["model.ema=true", "model.dead_code_steps=0"]),
    "ours": ("+ dead-code restart (the config's defaults)", []),
    "no_gan": ("defaults, GAN off", ["loss.disc_weight=0"]),
    "raw_gan": ("defaults, GAN without clamp or warm-up", RAW_GAN),
}


def run_variant(variant: str, args: argparse.Namespace, threads: int) -> dict:
    """Train and evaluate one variant; return its metrics.json plus the training wall time."""
    _, overrides = VARIANTS[variant]
    run_dir = Path(args.out) / variant
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "train_vqgan.py"), "--config", args.config, "--run-dir", str(run_dir),
                    "--force", *overrides, *args.overrides, "train.sample_every=0"], check=True, env=env)
    train_s = time.perf_counter() - start
    subprocess.run([sys.executable, str(REPO / "generate.py"), "reconstruct", "--checkpoint",
                    str(run_dir / "checkpoints" / "last.pt"), "--input", "test", "--num", str(args.eval_images),
                    "--out", str(run_dir / "eval")], check=True, env=env)
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    return {**metrics, "train_seconds": train_s, "threads": threads, "overrides": overrides}


def format_table(results: dict[str, dict]) -> str:
    rows = ["| variant | usage | perplexity | PSNR (dB) | SSIM | train time (s) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for variant in VARIANTS:
        if variant in results:
            r = results[variant]
            rows.append(f"| {VARIANTS[variant][0]} | {r['codebook_usage']:.1%} | {r['perplexity']:.0f} | "
                        f"{r['psnr']:.2f} | {r['ssim']:.3f} | {r['train_seconds']:.0f} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/fashion_mnist_small.yaml")
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="variants to run (default: all)")
    parser.add_argument("--eval-images", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=1, help="variants trained at the same time")
    parser.add_argument("overrides", nargs="*", help="extra overrides applied to every variant")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "ablation.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    todo = [v for v in VARIANTS if not args.only or v in args.only]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {variant: pool.submit(run_variant, variant, args, threads) for variant in todo}
        for variant, future in futures.items():
            results[variant] = future.result()
            results_path.write_text(json.dumps(results, indent=2))
    table = format_table(results)
    (out / "ablation.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

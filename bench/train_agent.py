"""Rebuilds `builtin:tiny-k2-agent` from a seed: the corpus, fp32 training, the INT4 QAT phase, the shipped INT4
checkpoint (plus the bf16 and post-training-quantized variants for the eval's comparison rows), printing the loss
curve as it goes. The shipped folder's `training.json` records the command, seed, corpus hash and the curve.

    nice -n 15 python -P bench/train_agent.py [--seed 0] [--steps 110] [--qat-steps 25] [--batch 8]
        [--out k2serve/k2format/models/tiny-k2-agent] [--work ~/.cache/k2serve/agent-train]

Needs transformers (the test extra). Uses one CPU thread: on a shared 2-core machine more threads only thrash.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from k2serve.worker.agent_model.corpus import FAMILIES, build_corpus, corpus_hash
from k2serve.worker.agent_model.train import (
    TrainPlan, agent_config, disable_qat, hf_model, save_bf16, save_int4, train,
)
from k2serve.k2format.tokenizer import K2Tokenizer, write_tiny_tokenizer

EPISODES = {"calculator": 60, "weather": 60, "two_step": 40, "chain": 150, "no_tool": 30, "retry": 40,
            "parallel": 40}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=110)
    ap.add_argument("--qat-steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies the episodes per family")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "k2serve/k2format/models/tiny-k2-agent")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/k2serve/agent-train")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    started = time.monotonic()

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(Path(tmp))
        tokenizer = K2Tokenizer.from_dir(tmp)
    episodes = {f: max(1, round(n * args.scale)) for f, n in EPISODES.items()}
    samples = build_corpus(tokenizer, args.seed, episodes)
    digest = corpus_hash(samples)
    tokens = sum(len(s.ids) for s in samples)
    print(f"corpus: {len(samples)} samples, {tokens} tokens, sha256 {digest[:16]} "
          f"({time.monotonic() - started:.0f}s)", flush=True)

    config = agent_config()
    model = hf_model(config, args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    bf16_dir, ptq_dir, qat_dir = args.work / "bf16", args.work / "ptq-int4", args.work / "qat-int4"

    def on_step(step: int, loss: float, qat: bool) -> None:
        print(f"step {step:4d} loss {loss:.4f}{' qat' if qat else ''} "
              f"({(time.monotonic() - started) / 60:.1f} min)", flush=True)

    def before_qat() -> None:
        # The bf16 row and the post-training-quantized row of the eval start from these weights.
        for d in (bf16_dir, ptq_dir):
            shutil.rmtree(d, ignore_errors=True)
        save_bf16(model, bf16_dir, config)
        write_tiny_tokenizer(bf16_dir)
        save_int4(bf16_dir, ptq_dir)
        write_tiny_tokenizer(ptq_dir)

    plan = TrainPlan(steps=args.steps, qat_steps=args.qat_steps, batch_size=args.batch, lr=args.lr, seed=args.seed)
    curve = train(model, samples, plan, on_step, before_qat)
    disable_qat(model)
    with tempfile.TemporaryDirectory() as tmp:
        save_bf16(model, Path(tmp) / "latent", config)
        save_int4(Path(tmp) / "latent", qat_dir)
    write_tiny_tokenizer(qat_dir)
    record = {
        "command": "python -P bench/train_agent.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed, "corpus_sha256": digest, "corpus_samples": len(samples), "episodes": episodes,
        "families": list(FAMILIES), "plan": plan.__dict__, "minutes": round((time.monotonic() - started) / 60, 1),
        "loss_curve": [[s, round(v, 4)] for s, v in curve],
    }
    (qat_dir / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(args.out, ignore_errors=True)
    shutil.copytree(qat_dir, args.out)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB) in {record['minutes']} min; bf16 and PTQ variants in {args.work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

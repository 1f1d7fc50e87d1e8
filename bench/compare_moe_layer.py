"""Side-by-side MoE layer benchmark: semoe against the PyTorch baseline, same config, same threads.

Runs `semoe bench moe-layer --json` and `bench/moe_layer_torch.py --json` alternately for several
rounds (so that machine noise hits both alike), then prints the medians and the ratios.

    cargo build --release
    .venv-ref/bin/python bench/compare_moe_layer.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--semoe", default=os.path.join(ROOT, "target", "release", "semoe"))
    a = ap.parse_args()

    common = ["--threads", str(a.threads), "--iters", str(a.iters), "--warmup", "1", "--json"]
    ours, theirs = [], []
    for r in range(a.rounds):
        o = last_json(subprocess.run([a.semoe, "bench", "moe-layer", *common], check=True,
                                     capture_output=True, text=True).stdout)
        t = last_json(subprocess.run([sys.executable, os.path.join(ROOT, "bench", "moe_layer_torch.py"), *common],
                                     check=True, capture_output=True, text=True).stdout)
        ours.append(o)
        theirs.append(t)
        print(f"round {r + 1}: semoe fwd {o['forward_tokens_per_s']:8.0f} fwd+bwd {o['train_tokens_per_s']:7.0f} tok/s"
              f" | torch fwd {t['fwd_tokens_per_s']:8.0f} fwd+bwd {t['fwd_bwd_tokens_per_s']:7.0f} tok/s"
              f" | expert matmuls alone {o['expert_matmul_gflops']:.0f} GFLOP/s, FMA peak {o['peak_gflops']:.0f}",
              flush=True)

    med = statistics.median
    sf, sb = med(o["forward_tokens_per_s"] for o in ours), med(o["train_tokens_per_s"] for o in ours)
    tf, tb = med(t["fwd_tokens_per_s"] for t in theirs), med(t["fwd_bwd_tokens_per_s"] for t in theirs)
    peak = med(o["peak_gflops"] for o in ours)
    mm = med(o["expert_matmul_gflops"] for o in ours)
    print(f"\nmedians over {a.rounds} rounds ({a.iters} iterations each), {a.threads} threads:")
    print(f"  forward          semoe {sf:8.0f} tok/s   torch {tf:8.0f} tok/s   ratio {sf / tf:.2f}x")
    print(f"  forward+backward semoe {sb:8.0f} tok/s   torch {tb:8.0f} tok/s   ratio {sb / tb:.2f}x")
    print(f"  semoe fwd+bwd effective {med(o['train_gflops'] for o in ours):.1f} GFLOP/s;"
          f" torch {med(t['fwd_bwd_expert_gflops'] for t in theirs):.1f} GFLOP/s")
    print(f"  expert matmuls alone {mm:.1f} GFLOP/s = {100 * mm / peak:.0f}% of the measured FMA peak {peak:.1f} GFLOP/s")


if __name__ == "__main__":
    main()

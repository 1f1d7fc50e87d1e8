"""Generate the learning-rate schedule golden vectors in tests/golden/schedule/*.json.

Run from the repository root (plain Python, no torch):

    python3 tools/reference/gen_schedule_golden.py [--check-only] [--out DIR]

Each file pins `lr_schedule.lr_at` for one configuration over steps 0 .. total_steps + 2 (the
last ones clamped to min_lr). The output is deterministic: rerunning reproduces it byte for byte.
"""

from __future__ import annotations

import argparse
import json
import os

from lr_schedule import lr_at

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "golden", "schedule")

CASES = [
    {"name": "cosine_full", "description": "cosine over every step after warmup (the default)",
     "config": {"lr": 3e-3, "min_lr": 3e-4, "warmup": 20, "total_steps": 100,
                "schedule": "cosine", "cooldown": 1.0}},
    {"name": "cosine_wsd", "description": "warmup-stable-decay: cosine over the last 30%",
     "config": {"lr": 1e-2, "min_lr": 1e-3, "warmup": 10, "total_steps": 110,
                "schedule": "cosine", "cooldown": 0.3}},
    {"name": "linear_full", "description": "a straight line over every step after warmup",
     "config": {"lr": 3e-3, "min_lr": 0.0, "warmup": 5, "total_steps": 45,
                "schedule": "linear", "cooldown": 1.0}},
    {"name": "linear_wsd", "description": "warmup-stable-decay: held, then a line to 0 over the last half",
     "config": {"lr": 1.0, "min_lr": 0.0, "warmup": 10, "total_steps": 100,
                "schedule": "linear", "cooldown": 0.5}},
    {"name": "linear_short_cooldown", "description": "a cooldown shorter than one step decays over one step",
     "config": {"lr": 2e-3, "min_lr": 2e-4, "warmup": 3, "total_steps": 23,
                "schedule": "linear", "cooldown": 0.01}},
    {"name": "no_warmup", "description": "warmup 0: the decay starts at step 0",
     "config": {"lr": 1e-3, "min_lr": 1e-4, "warmup": 0, "total_steps": 16,
                "schedule": "linear", "cooldown": 0.75}},
]


def dump(rec: dict) -> str:
    lines = [json.dumps(k) + ":" + json.dumps(v, separators=(",", ":"), allow_nan=False)
             for k, v in rec.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--check-only", action="store_true")
    args = ap.parse_args()
    outputs = []
    for case in CASES:
        c = case["config"]
        args_ = (c["lr"], c["min_lr"], c["warmup"], c["total_steps"], c["schedule"], c["cooldown"])
        sched = [[s, lr_at(s, *args_)] for s in range(c["total_steps"] + 3)]
        # Self-checks: warmup ends at the peak, the run ends at min_lr and stays there.
        assert c["warmup"] == 0 or sched[c["warmup"] - 1][1] == c["lr"], case["name"]
        assert all(lr == c["min_lr"] for _, lr in sched[c["total_steps"]:]), case["name"]
        assert all(a[1] >= b[1] for a, b in zip(sched[c["warmup"]:], sched[c["warmup"] + 1:])), case["name"]
        rec = {"name": case["name"], "description": case["description"], "config": c,
               "lr_schedule": sched}
        outputs.append((case["name"], dump(rec)))
        print(f"{case['name']:22s} {len(sched)} steps")
    if args.check_only:
        return
    os.makedirs(args.out, exist_ok=True)
    for name, text in outputs:
        with open(os.path.join(args.out, name + ".json"), "w") as fh:
            fh.write(text)
    print(f"wrote {len(outputs)} files")


if __name__ == "__main__":
    main()

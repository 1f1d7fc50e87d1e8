"""Generate the AdamW optimizer golden vectors in tests/golden/adamw/*.json.

Run from the repository root:

    .venv-ref/bin/python tools/reference/gen_adamw_golden.py [--check-only] [--out DIR]

What is pinned (torch.optim.AdamW in float32 on CPU, the single-tensor path):

  * learning-rate schedule, step = 0, 1, 2, ...:
      lr(step) = max_lr * (step + 1) / warmup                      if step < warmup
      lr(step) = min_lr + 0.5 * (max_lr - min_lr) * (1 + cos(pi * p)),
                 p = clamp((step - warmup) / (total_steps - warmup), 0, 1)   otherwise
    (the default; a case's config may set `schedule` "linear" and a `cooldown` < 1 for
    warmup-stable-decay: see lr_schedule.py, shared with gen_schedule_golden.py)
  * two param groups: weight decay only for params with ndim >= 2, 0 for the rest;
  * before each step, torch.nn.utils.clip_grad_norm_(all params, clip):
      norm = sqrt(sum of squares of every gradient element)   (recorded pre-clip)
      coef = min(clip / (norm + 1e-6), 1);  every gradient *= coef
  * the AdamW step (step t = 1, 2, ... inside the optimizer):
      p *= 1 - lr * wd
      m  = m + (1 - beta1) * (g - m)          (torch: exp_avg.lerp_(g, 1 - beta1))
      v  = v * beta2 + (1 - beta2) * g * g
      p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

The script also runs the same arithmetic by hand in float64 and in float32 and
checks it against torch (float32 torch must agree with float64 to ~1e-6
relative, and the hand float32 version to a few ulps).
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

import lr_schedule

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "golden", "adamw")

SHAPES = {"w": (4, 6), "b": (6,), "w3": (2, 3, 4)}
N_STEPS = 5


def lr_at(step: int, max_lr: float, min_lr: float, warmup: int, total_steps: int,
          schedule: str = "cosine", cooldown: float = 1.0) -> float:
    """The schedule of `lr_schedule.py` (cosine or linear, optionally warmup-stable-decay)."""
    return lr_schedule.lr_at(step, max_lr, min_lr, warmup, total_steps, schedule, cooldown)


def case_lr(c: dict, step: int) -> float:
    """The learning rate of `step` under config `c` (`schedule` and `cooldown` are optional keys,
    absent in the existing cases: cosine over every step after warmup)."""
    return lr_at(step, c["lr"], c["min_lr"], c["warmup"], c["total_steps"],
                 c.get("schedule", "cosine"), c.get("cooldown", 1.0))


CASES = [
    {"name": "clip_wd",
     "description": "weight decay 0.1 on the matrices, clip 1.0: clipping triggers on steps 1, 3 and 4 (not 0 and 2)",
     "seed": 30000,
     "grad_scales": [0.1, 0.5, 0.05, 1.0, 0.15],
     "expect_clip": True,
     "config": {"lr": 1e-2, "min_lr": 1e-3, "warmup": 2, "total_steps": 5, "beta1": 0.9,
                "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "clip": 1.0}},
    {"name": "no_wd",
     "description": "weight decay 0, clip 100 (never triggers), torch default betas",
     "seed": 31000,
     "grad_scales": [0.1, 0.5, 0.05, 1.0, 0.15],
     "expect_clip": False,
     "config": {"lr": 3e-3, "min_lr": 3e-4, "warmup": 2, "total_steps": 5, "beta1": 0.9,
                "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "clip": 100.0}},
]


def draw(case):
    g = torch.Generator().manual_seed(case["seed"])
    params = {n: torch.randn(*s, generator=g, dtype=torch.float32) * 0.5 for n, s in SHAPES.items()}
    grads = []
    for sc in case["grad_scales"]:
        grads.append({n: torch.randn(*s, generator=g, dtype=torch.float32) * sc
                      for n, s in SHAPES.items()})
    return params, grads


def run_torch(case, params, grads):
    c = case["config"]
    leaves = {n: t.clone().requires_grad_(True) for n, t in params.items()}
    decay = [p for p in leaves.values() if p.dim() >= 2]
    no_decay = [p for p in leaves.values() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=c["lr"], betas=(c["beta1"], c["beta2"]), eps=c["eps"],
                            foreach=False)
    lrs, norms, coefs, after = [], [], [], []
    for step, gs in enumerate(grads):
        for n, p in leaves.items():
            p.grad = gs[n].clone()
        lr = case_lr(c, step)
        for grp in opt.param_groups:
            grp["lr"] = lr
        norm = torch.nn.utils.clip_grad_norm_(list(leaves.values()), c["clip"])
        norms.append(float(norm))
        # the factor torch applied (computed in float32 like torch does)
        coefs.append(float(torch.clamp(c["clip"] / (norm + 1e-6), max=1.0)))
        lrs.append(lr)
        opt.step()
        after.append({n: p.detach().clone() for n, p in leaves.items()})
    m = {n: opt.state[p]["exp_avg"].clone() for n, p in leaves.items()}
    v = {n: opt.state[p]["exp_avg_sq"].clone() for n, p in leaves.items()}
    return lrs, norms, coefs, after, m, v


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 a*b + c with one rounding (a*b is exact in float64)."""
    return (a.double() * b.double() + c.double()).float()


def run_manual(case, params, grads, dtype):
    """The documented arithmetic, by hand, in ``dtype``. In float32 it follows
    torch's CPU kernels operation by operation (scalars rounded to float32,
    lerp_ and addcmul_ as fused multiply-adds), so it reproduces torch."""
    c = case["config"]
    f32 = dtype == torch.float32

    def sc(x):  # a python scalar as torch's kernels see it
        return torch.tensor(x, dtype=dtype)

    p = {n: t.to(dtype).clone() for n, t in params.items()}
    m = {n: torch.zeros_like(t) for n, t in p.items()}
    v = {n: torch.zeros_like(t) for n, t in p.items()}
    after = []
    for step, gs in enumerate(grads):
        g = {n: t.to(dtype) for n, t in gs.items()}
        # torch: the 2-norm of the per-tensor 2-norms
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g.values()]))
        coef = torch.clamp(c["clip"] / (norm + 1e-6), max=1.0)  # 0-dim tensor of dtype
        g = {n: t * coef for n, t in g.items()}
        lr = case_lr(c, step)
        t_ = step + 1
        bc1 = 1 - c["beta1"] ** t_
        bc2 = 1 - c["beta2"] ** t_
        for n in p:
            wd = c["weight_decay"] if p[n].dim() >= 2 else 0.0
            if wd != 0.0:
                p[n] = p[n] * sc(1 - lr * wd)
            if f32:
                m[n] = fma32(sc(1 - c["beta1"]), g[n] - m[n], m[n])
                v[n] = fma32(sc(1 - c["beta2"]) * g[n], g[n], v[n] * sc(c["beta2"]))
            else:
                m[n] = m[n] + (1 - c["beta1"]) * (g[n] - m[n])
                v[n] = v[n] * c["beta2"] + (1 - c["beta2"]) * g[n] * g[n]
            denom = v[n].sqrt() / sc(bc2 ** 0.5) + sc(c["eps"])
            p[n] = p[n] + (sc(-(lr / bc1)) * m[n]) / denom
        after.append({n: t.clone() for n, t in p.items()})
    return after, m, v


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(((a - b).abs() / (b.abs() + 1e-6)).max())


def tl(t: torch.Tensor):
    return t.to(torch.float64).tolist()


def dump(rec: dict) -> str:
    def js(v):
        return json.dumps(v, separators=(",", ":"), allow_nan=False)

    lines = []
    for k, v in rec.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            inner = ",\n".join(js(x) for x in v)
            lines.append(json.dumps(k) + ":[\n" + inner + "\n]")
        else:
            lines.append(json.dumps(k) + ":" + js(v))
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--check-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)

    outputs = []
    for case in CASES:
        c = case["config"]
        params, grads = draw(case)
        lrs, norms, coefs, after, m, v = run_torch(case, params, grads)
        clipped = [i for i, co in enumerate(coefs) if co < 1.0]
        if case["expect_clip"]:
            assert clipped and len(clipped) < N_STEPS, (case["name"], coefs)
        else:
            assert not clipped, (case["name"], coefs)

        a64, m64, v64 = run_manual(case, params, grads, torch.float64)
        a32, m32, v32 = run_manual(case, params, grads, torch.float32)
        rel64 = max(max_rel(after[s][n], a64[s][n]) for s in range(N_STEPS) for n in SHAPES)
        rel32 = max(max_rel(after[s][n], a32[s][n]) for s in range(N_STEPS) for n in SHAPES)
        mv64 = max(max(max_rel(m[n], m64[n]), max_rel(v[n], v64[n])) for n in SHAPES)
        assert rel64 < 1e-5 and mv64 < 1e-5, (case["name"], rel64, mv64)
        exact32 = all(torch.equal(after[s][n], a32[s][n]) for s in range(N_STEPS) for n in SHAPES)
        exact32 = exact32 and all(torch.equal(m[n], m32[n]) and torch.equal(v[n], v32[n])
                                  for n in SHAPES)
        assert exact32, (case["name"], rel32)


        # the schedule beyond the recorded steps, to pin warmup / cosine / clamp
        sched = [[s, case_lr(c, s)]
                 for s in range(c["total_steps"] + 3)]
        rec = {
            "name": case["name"],
            "description": case["description"],
            "seed": case["seed"],
            "config": c,
            "decay": {n: len(s) >= 2 for n, s in SHAPES.items()},
            "params": {n: tl(t) for n, t in params.items()},
            "grads": [{n: tl(t) for n, t in gs.items()} for gs in grads],
            "lr": lrs,
            "grad_norm": norms,
            "clip_coef": coefs,
            "params_after": [{n: tl(t) for n, t in a.items()} for a in after],
            "m": {n: tl(t) for n, t in m.items()},
            "v": {n: tl(t) for n, t in v.items()},
            "params_after_f64": [{n: tl(t) for n, t in a.items()} for a in a64],
            "lr_schedule": sched,
        }
        print(f"{case['name']:8s} lr={[f'{x:.3e}' for x in lrs]} grad_norm={[round(x, 4) for x in norms]} "
              f"clipped_steps={clipped} torch-f32 vs f64 max rel {rel64:.1e} (m/v {mv64:.1e}), "
              f"hand f32 bit-identical to torch")
        outputs.append((case["name"], dump(rec)))

    if args.check_only:
        return
    os.makedirs(args.out, exist_ok=True)
    for name, text in outputs:
        with open(os.path.join(args.out, name + ".json"), "w") as fh:
            fh.write(text)
    print(f"wrote {len(outputs)} files")


if __name__ == "__main__":
    main()

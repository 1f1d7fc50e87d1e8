"""Generate the GPT-MoE model golden vectors in tests/golden/gpt/*.json.

Run from the repository root:

    .venv-ref/bin/python tools/reference/gen_gpt_golden.py [--check-only] [--out DIR]

Before writing anything it self-checks the reference (gpt_reference.py):
  * torch.autograd.gradcheck of logits and loss with respect to every
    parameter, on two even tinier float64 models (all-MoE with drops and
    z-loss; dense + top-1 MoE with tanh GELU);
  * for every case: the forward against an independent formulation built from
    torch's own F.layer_norm, F.scaled_dot_product_attention (is_causal) and
    F.cross_entropy, with the per-group MoE split done by a reshape;
  * for every case: routing invariants, and the same model run in float32
    must route identically (the tolerance headroom is printed).

Inputs (token ids and parameters) are drawn in float32 from a seeded
torch.Generator, then everything is computed in float64. If any two competing
gate values of any MoE layer and group are closer than TIE_GAP, the case is
re-drawn with the next seed; the seed used is recorded in the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_moe_golden import min_competing_gap  # noqa: E402
from gpt_reference import GptConfig, gpt_forward, param_shapes, run_reference  # noqa: E402
from moe_reference import moe_forward  # noqa: E402

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "golden", "gpt")
TIE_GAP = 1e-4
MAX_REDRAWS = 200
MAX_BYTES = 1_500_000

TINY = dict(vocab=256, block_size=8, d_model=16, n_head=2, d_ff=32, experts=4, k=2,
            min_capacity=4, aux_coef=0.01, groups=2)


def C(name, seed, desc, B=4, expect_drops=None, **kw):
    cfg = dict(TINY)
    cfg.update(kw)
    return {"name": name, "seed": seed, "description": desc, "B": B,
            "expect_drops": expect_drops, "cfg": GptConfig(**cfg)}


CASES = [
    C("tiny_moe_every_layer", 20000,
      "2 layers, both MoE (moe_every 1), top-2, capacity_factor 1.0 with drops, 2 routing groups",
      expect_drops=True, n_layer=2, moe_every=1, capacity_factor=1.0),
    C("tiny_alternating", 21000,
      "2 layers, moe_every 2: layer 0 dense (dense_d_ff 64), layer 1 MoE top-2, 2 routing groups",
      n_layer=2, moe_every=2, dense_d_ff=64, capacity_factor=1.0),
    C("tiny_top1_zloss", 22000,
      "1 MoE layer, top-1 (Switch), z_coef 0.01, capacity_factor 1.0, 2 routing groups",
      n_layer=1, moe_every=1, k=1, z_coef=0.01, capacity_factor=1.0),
]


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------

def draw_inputs(cfg: GptConfig, B: int, seed: int):
    """Token ids and float32 parameters.

    idx/targets: a random byte sequence of T+1 per row, idx = seq[:, :T],
    targets = seq[:, 1:]. Parameters, in param_shapes order:
    matrices and embeddings ~ N(0, 0.02); gate wg ~ N(0, 0.5) (so routing has
    clear margins); LayerNorm weights ~ 1 + 0.1 N(0,1), LayerNorm biases
    ~ 0.1 N(0,1); linear biases ~ 0.02 N(0,1)."""
    g = torch.Generator().manual_seed(seed)
    T = cfg.block_size
    seq = torch.randint(0, cfg.vocab, (B, T + 1), generator=g)
    idx, targets = seq[:, :T].contiguous(), seq[:, 1:].contiguous()
    params = {}
    for name, shape in param_shapes(cfg).items():
        r = torch.randn(*shape, generator=g, dtype=torch.float32)
        if name.endswith("moe.wg"):
            t = r * 0.5
        elif ".ln" in name or name.startswith("ln_f"):
            t = 1.0 + 0.1 * r if name.endswith("weight") else 0.1 * r
        else:  # matrices, embeddings and linear biases
            t = 0.02 * r
        params[name] = t.to(torch.float32)
    return idx, targets, params


def routing_gap(cfg: GptConfig, moe_outs) -> float:
    gaps = [float("inf")]
    for outs in moe_outs:
        for out in outs:
            S = out["gates"].shape[0]
            gaps.append(min_competing_gap(out["gates"].detach(), cfg.moe_config(S), out["routing"]))
    return min(gaps)


# --------------------------------------------------------------------------
# Independent checks
# --------------------------------------------------------------------------

def builtin_forward(p: dict, idx, targets, cfg: GptConfig):
    """Same model through torch's own building blocks (LayerNorm, SDPA,
    cross_entropy); the MoE group split is a reshape to [G, S, D]."""
    B, T = idx.shape
    D, H = cfg.d_model, cfg.n_head
    dh = D // H
    x = F.embedding(idx, p["wte"]) + p["wpe"][:T].unsqueeze(0)
    aux_total = x.new_zeros(())
    for l in range(cfg.n_layer):
        pre = f"h.{l}."
        a = F.layer_norm(x, (D,), p[pre + "ln1.weight"], p[pre + "ln1.bias"], cfg.ln_eps)
        qkv = torch.addmm(p[pre + "attn.bqkv"], a.reshape(B * T, D), p[pre + "attn.wqkv"])
        q, k, v = qkv.view(B, T, 3, H, dh).permute(2, 0, 3, 1, 4)  # [B, H, T, dh] each
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o = o.transpose(1, 2).reshape(B * T, D)
        x = x + torch.addmm(p[pre + "attn.bo"], o, p[pre + "attn.wo"]).view(B, T, D)
        b = F.layer_norm(x, (D,), p[pre + "ln2.weight"], p[pre + "ln2.bias"], cfg.ln_eps)
        if cfg.is_moe(l):
            G = cfg.groups
            S = B * T // G
            bg = b.reshape(G, S, D)
            ys = []
            for gi in range(G):
                out = moe_forward(bg[gi], p[pre + "moe.wg"], p[pre + "moe.w1"], p[pre + "moe.b1"],
                                  p[pre + "moe.w2"], p[pre + "moe.b2"], cfg.moe_config(S))
                ys.append(out["y"])
                aux_total = aux_total + (cfg.aux_coef * out["l_aux"]
                                         + cfg.z_coef * out["z_loss"]) / G
            y = torch.stack(ys).reshape(B, T, D)
        else:
            approx = "tanh" if cfg.gelu == "tanh" else "none"
            hdn = F.gelu(b @ p[pre + "mlp.w1"] + p[pre + "mlp.b1"], approximate=approx)
            y = hdn @ p[pre + "mlp.w2"] + p[pre + "mlp.b2"]
        x = x + y
    hf = F.layer_norm(x, (D,), p["ln_f.weight"], p["ln_f.bias"], cfg.ln_eps)
    logits = hf @ p["lm_head"]
    ce = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1))
    return logits, ce, ce + aux_total


def close(a, b, tol=1e-10):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return bool(torch.all((a - b).abs() <= tol * (1.0 + b.abs())))


def check_builtin(name, cfg, idx, targets, params, ref) -> None:
    leaves = {n: t.to(torch.float64).clone().requires_grad_(True) for n, t in params.items()}
    logits, ce, loss = builtin_forward(leaves, idx, targets, cfg)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    assert close(logits, ref["logits"]), name
    assert close(ce, ref["ce_loss"]) and close(loss, ref["loss"]), name
    for n, gr in zip(leaves, grads):
        assert close(gr, ref["grads"][n], 1e-9), (name, n)


def check_routing(name, cfg, ref, expect_drops) -> int:
    total_dropped = 0
    for outs in ref["moe"]:
        for out in outs:
            r = out["routing"]
            idx, keep, loc, Cap = r["idx"], r["keep"], r["loc"], r["capacity"]
            k, S = idx.shape
            for j in range(k):
                for i in range(j):
                    assert not torch.any(idx[i] == idx[j]), name
            for e in range(cfg.experts):
                kl = sorted(int(loc[j, s]) for j in range(k) for s in range(S)
                            if int(idx[j, s]) == e and bool(keep[j, s]))
                assert kl == list(range(len(kl))), (name, e, kl)
                if Cap is not None:
                    assert len(kl) <= Cap, name
            total_dropped += int((~keep).sum())
    if expect_drops is True:
        assert total_dropped > 0, name
    if expect_drops is False:
        assert total_dropped == 0, name
    return total_dropped


def headroom_f32(name, cfg, idx, targets, params, ref) -> dict:
    """Run the reference in float32 on the same inputs; routing must match.
    Returns the worst |err| / tolerance per kind, with the tolerance rule of
    tests/golden/README.md (1e-5 relative to |want| + rms(want) for tensors,
    1e-5 * max(|want|, 1e-3) for scalars)."""
    leaves = {n: t.clone().requires_grad_(True) for n, t in params.items()}
    out = gpt_forward(leaves, idx, targets, cfg)
    grads = torch.autograd.grad(out["loss"], list(leaves.values()))
    for outs32, outs64 in zip(out["moe"], ref["moe"]):
        for o32, o64 in zip(outs32, outs64):
            for key in ("idx", "keep", "loc"):
                assert torch.equal(o32["routing"][key], o64["routing"][key]), (name, key)

    def tens(got, want):
        got, want = got.detach().double(), want.double()
        rms = want.pow(2).mean().sqrt()
        return float(((got - want).abs() / (1e-5 * (want.abs() + rms))).max())

    def scal(got, want):
        return abs(float(torch.as_tensor(got).detach()) - want) / (1e-5 * max(abs(want), 1e-3))

    worst_grad = max((tens(g, ref["grads"][n]), n) for n, g in zip(leaves, grads))
    return {
        "logits": tens(out["logits"], ref["logits"]),
        "loss": scal(out["loss"], ref["loss"]),
        "ce_loss": scal(out["ce_loss"], ref["ce_loss"]),
        "aux": max([scal(a, b) for a, b in zip(out["aux"], ref["aux"])] or [0.0]),
        "grads": worst_grad[0],
        "worst_grad": worst_grad[1],
    }


def gradcheck_reference() -> None:
    tiny = [
        ("all-moe k2 drops z", GptConfig(vocab=11, block_size=4, d_model=4, n_layer=2, n_head=2,
                                         d_ff=6, experts=3, k=2, capacity_factor=0.75,
                                         min_capacity=0, moe_every=1, aux_coef=0.5, z_coef=0.3,
                                         groups=2)),
        ("dense+moe k1 tanh", GptConfig(vocab=11, block_size=4, d_model=4, n_layer=2, n_head=2,
                                        d_ff=6, experts=3, k=1, capacity_factor=1.0,
                                        min_capacity=0, moe_every=2, dense_d_ff=5, aux_coef=0.5,
                                        z_coef=0.3, gelu="tanh", groups=2)),
    ]
    B = 4
    for ci, (label, cfg) in enumerate(tiny):
        for seed in range(70 + 100 * ci, 70 + 100 * ci + MAX_REDRAWS):
            idx, targets, params = draw_inputs(cfg, B, seed)
            # larger weights than the goldens so every path has a visible gradient
            params = {n: (t * 10.0 if t.dim() >= 2 and not n.endswith("wg") else t).double()
                      for n, t in params.items()}
            with torch.no_grad():
                out = gpt_forward(params, idx, targets, cfg)
            if routing_gap(cfg, out["moe"]) >= 1e-3:
                break
        else:
            raise RuntimeError("gradcheck: no tie-free draw")
        names = list(params)
        leaves = tuple(params[n].clone().requires_grad_(True) for n in names)

        def f(*args, cfg=cfg, idx=idx, targets=targets, names=names):
            o = gpt_forward(dict(zip(names, args)), idx, targets, cfg)
            return o["logits"], o["loss"]

        ok = torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)
        dropped = sum(int((~o["routing"]["keep"]).sum()) for outs in out["moe"] for o in outs)
        n_el = sum(t.numel() for t in leaves)
        print(f"gradcheck ok: {label}: {n_el} parameters, dropped={dropped} seed={seed}: {ok}")


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

def tl(t: torch.Tensor):
    if t.dtype.is_floating_point:
        return t.to(torch.float64).tolist()
    return t.tolist()


def build_record(case, seed, idx, targets, params, ref) -> dict:
    cfg: GptConfig = case["cfg"]
    routing, parts = [], []
    for outs in ref["moe"]:
        rl, pl = [], []
        for out in outs:
            r = out["routing"]
            ridx, keep = r["idx"], r["keep"]
            rl.append({
                "expert_counts": [int(((ridx == e) & keep).sum()) for e in range(cfg.experts)],
                "dropped": int((~keep).sum()),
                "capacity": r["capacity"],
                "idx": tl(ridx),
                "keep": tl(keep),
            })
            pl.append({"l_aux": float(out["l_aux"].detach()),
                       "z_loss": float(out["z_loss"].detach())})
        routing.append(rl)
        parts.append(pl)
    return {
        "name": case["name"],
        "description": case["description"],
        "seed": seed,
        "config": cfg.to_dict(),
        "moe_layers": cfg.moe_layers(),
        "idx": tl(idx),
        "targets": tl(targets),
        "params": {n: tl(t) for n, t in params.items()},
        "logits": tl(ref["logits"]),
        "loss": ref["loss"],
        "ce_loss": ref["ce_loss"],
        "aux": ref["aux"],
        "aux_parts": parts,
        "routing": routing,
        "grads": {n: tl(t) for n, t in ref["grads"].items()},
    }


def dump(rec: dict) -> str:
    """One top-level key per line (dicts of tensors: one entry per line),
    compact values; floats use repr, so they round-trip exactly."""
    def js(v):
        return json.dumps(v, separators=(",", ":"), allow_nan=False)

    lines = []
    for k, v in rec.items():
        if k in ("params", "grads"):
            inner = ",\n".join(json.dumps(n) + ":" + js(t) for n, t in v.items())
            lines.append(json.dumps(k) + ":{\n" + inner + "\n}")
        else:
            lines.append(json.dumps(k) + ":" + js(v))
    return "{\n" + ",\n".join(lines) + "\n}\n"


def generate_case(case):
    cfg: GptConfig = case["cfg"]
    cfg.validate()
    for seed in range(case["seed"], case["seed"] + MAX_REDRAWS):
        idx, targets, params = draw_inputs(cfg, case["B"], seed)
        ref = run_reference(params, idx, targets, cfg)
        gap = routing_gap(cfg, ref["moe"])
        if gap >= TIE_GAP:
            return seed, idx, targets, params, ref, gap
    raise RuntimeError(f"{case['name']}: no tie-free draw in {MAX_REDRAWS} seeds")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="output folder")
    ap.add_argument("--check-only", action="store_true", help="run the self-checks, write nothing")
    ap.add_argument("--skip-gradcheck", action="store_true", help="skip the (slow-ish) gradcheck")
    args = ap.parse_args()
    torch.set_num_threads(1)

    if not args.skip_gradcheck:
        gradcheck_reference()

    outputs = []
    for case in CASES:
        cfg: GptConfig = case["cfg"]
        seed, idx, targets, params, ref, gap = generate_case(case)
        check_builtin(case["name"], cfg, idx, targets, params, ref)
        dropped = check_routing(case["name"], cfg, ref, case["expect_drops"])
        hr = headroom_f32(case["name"], cfg, idx, targets, params, ref)
        rec = build_record(case, seed, idx, targets, params, ref)
        text = dump(rec)
        assert len(text) < MAX_BYTES, (case["name"], len(text))
        caps = sorted({g["capacity"] for layer in rec["routing"] for g in layer}, key=str)
        per = [[g["dropped"] for g in layer] for layer in rec["routing"]]
        print(f"{case['name']:22s} L={cfg.n_layer} moe_layers={cfg.moe_layers()} k={cfg.k} "
              f"C={caps} dropped/layer/group={per} loss={rec['loss']:.6f} "
              f"ce={rec['ce_loss']:.6f} aux={[round(a, 6) for a in rec['aux']]} seed={seed} "
              f"min_gap={gap:.2e} size={len(text) // 1024}KiB builtin=ok")
        print(f"{'':22s} f32 err/tol: logits {hr['logits']:.3f} loss {hr['loss']:.3f} "
              f"ce {hr['ce_loss']:.3f} aux {hr['aux']:.3f} grads {hr['grads']:.3f} "
              f"({hr['worst_grad']}); f32 routing identical")
        outputs.append((rec["name"], text))
        assert dropped == sum(sum(p) for p in per)

    if args.check_only:
        return
    os.makedirs(args.out, exist_ok=True)
    for name, text in outputs:
        with open(os.path.join(args.out, name + ".json"), "w") as fh:
            fh.write(text)
    print(f"wrote {len(outputs)} files")


if __name__ == "__main__":
    main()

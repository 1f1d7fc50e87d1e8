"""Train the semoe GPT-MoE byte-level language model in PyTorch (CPU, float32).

The same model as tools/reference/gpt_reference.py (the float64 spec behind
tests/golden/gpt), written efficiently: torch's layer_norm, causal
scaled_dot_product_attention, and the MoE FFN with per-group top-k routing
(choice-major capacity slots, position drop policy) and per-expert
gather / addmm / scatter-add dispatch as in bench/moe_layer_torch.py (one
index_select of all kept assignments sorted by expert, per-expert addmm on
contiguous slices, one weighted index_add), merged over the groups. It
serves as the side-by-side baseline for the Rust trainer: same data, sampler, schedule, clipping and AdamW.

    python bench/train_torch.py --time-limit 60             # MoE, the default config of `semoe train`
    python bench/train_torch.py --time-limit 60 --dense     # dense FFN of width k*d_ff
    python bench/train_torch.py --print-params              # parameter counts, then exit
    python bench/train_torch.py --verify                    # float64 check against tests/golden/gpt
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

# The formulas shared with the references (tools/reference/), written once there.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "reference"))
from lr_schedule import lr_at as _lr_at  # noqa: E402
from moe_math import capacity_of  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS_F32 = torch.finfo(torch.float32).eps


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------

def is_moe(cfg: dict, layer: int) -> bool:
    return (not cfg["dense"]) and layer % cfg["moe_every"] == cfg["moe_every"] - 1


def dense_width(cfg: dict, layer: int) -> int:
    """Hidden width of a dense layer: k*d_ff where --dense replaced a MoE layer."""
    if cfg["dense"] and layer % cfg["moe_every"] == cfg["moe_every"] - 1:
        return cfg["k"] * cfg["d_ff"]
    return cfg["dense_d_ff"]


def param_shapes(cfg: dict) -> dict:
    """Names and shapes as in tools/reference/gpt_reference.py ([in][out] matrices)."""
    V, T, D, Fh, E = cfg["vocab"], cfg["block_size"], cfg["d_model"], cfg["d_ff"], cfg["experts"]
    s = {"wte": (V, D), "wpe": (T, D)}
    for l in range(cfg["n_layer"]):
        p = f"h.{l}."
        s.update({p + "ln1.weight": (D,), p + "ln1.bias": (D,), p + "attn.wqkv": (D, 3 * D),
                  p + "attn.bqkv": (3 * D,), p + "attn.wo": (D, D), p + "attn.bo": (D,),
                  p + "ln2.weight": (D,), p + "ln2.bias": (D,)})
        if is_moe(cfg, l):
            s.update({p + "moe.wg": (D, E), p + "moe.w1": (E, D, Fh), p + "moe.b1": (E, Fh),
                      p + "moe.w2": (E, Fh, D), p + "moe.b2": (E, D)})
        else:
            Fd = dense_width(cfg, l)
            s.update({p + "mlp.w1": (D, Fd), p + "mlp.b1": (Fd,), p + "mlp.w2": (Fd, D),
                      p + "mlp.b2": (D,)})
    s.update({"ln_f.weight": (D,), "ln_f.bias": (D,), "lm_head": (D, V)})
    return s


def init_params(cfg: dict, seed: int, std: float) -> dict:
    """semoe's initialisation (`Gpt::init`, src/model/gpt.rs), drawn from torch's generator:
    matrices, embeddings and the gate ~ N(0, std), except the position embeddings (N(0, std / 2))
    and the residual projections (`wo` and the FFN's second matrix: N(0, std / sqrt(2 n_layer)),
    GPT-2); biases 0; LayerNorm 1 / 0."""
    g = torch.Generator().manual_seed(seed)
    resid = std / math.sqrt(2 * cfg["n_layer"])
    params = {}
    for name, shape in param_shapes(cfg).items():
        if ".ln" in name or name.startswith("ln_f"):
            t = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        elif len(shape) == 1 or name.endswith("moe.b1") or name.endswith("moe.b2"):
            t = torch.zeros(shape)
        elif name == "wpe":
            t = torch.randn(*shape, generator=g) * (std / 2)
        elif name.endswith("attn.wo") or name.endswith(".w2"):
            t = torch.randn(*shape, generator=g) * resid
        else:
            t = torch.randn(*shape, generator=g) * std
        params[name] = torch.nn.Parameter(t)
    return params


def count_params(cfg: dict) -> tuple[int, int]:
    """(total, active per token): a MoE layer activates k of its E experts."""
    shapes = param_shapes(cfg)
    total = sum(math.prod(s) for s in shapes.values())
    D, Fh, E, k = cfg["d_model"], cfg["d_ff"], cfg["experts"], cfg["k"]
    per_expert = D * Fh + Fh + Fh * D + D
    n_moe = sum(1 for l in range(cfg["n_layer"]) if is_moe(cfg, l))
    return total, total - n_moe * (E - k) * per_expert


def capacity(cfg: dict, S: int) -> int:
    return capacity_of(S, cfg["experts"], cfg["k"], cfg["capacity_factor"], cfg["min_capacity"])


def moe_ffn(x, wg, w1, b1, w2, b2, cfg: dict):
    """x [N, D], N = G*S tokens, group g = rows g*S .. (g+1)*S-1. Routing per group.

    Returns y [N, D], the aux term mean_g(aux_coef*l_aux_g + z_coef*z_loss_g),
    and the number of dropped assignments."""
    N, D = x.shape
    G, k, E = cfg["groups"], cfg["k"], cfg["experts"]
    S = N // G
    cap = capacity(cfg, S)
    logits = x @ wg  # [N, E]
    gates = torch.softmax(logits, dim=1)
    with torch.no_grad():
        topi = torch.topk(gates, k, dim=1).indices  # [N, k], descending
        # choice-major slot order inside each group: all choice-0 assignments in
        # token order, then choice 1, ...
        idx_g = topi.view(G, S, k).transpose(1, 2).reshape(G, k * S)  # [G, k*S]
        onehot = F.one_hot(idx_g, E)  # [G, k*S, E]
        loc = (onehot.cumsum(1) - 1).gather(2, idx_g.unsqueeze(2)).squeeze(2)
        keep = (loc < cap).view(G, k, S).transpose(1, 2).reshape(N, k)  # [N, k]
    g = gates.gather(1, topi) * keep.to(gates.dtype)  # [N, k]
    if k >= 2 and cfg["normalize"]:
        g = g / g.sum(dim=1, keepdim=True).clamp(min=EPS_F32)

    with torch.no_grad():
        keep_flat = keep.reshape(-1)
        pos = keep_flat.nonzero().squeeze(1)  # n*k + j of kept assignments
        exp = topi.reshape(-1).index_select(0, pos)
        order = torch.argsort(exp, stable=True)
        pos = pos.index_select(0, order)
        tok = pos // k
        counts = torch.bincount(exp, minlength=E).tolist()
    w_sorted = g.reshape(-1).index_select(0, pos)

    # one gather of every kept assignment (sorted by expert), per-expert matmuls
    # on contiguous slices, one weighted scatter-add back to the tokens
    approx = "tanh" if cfg["gelu"] == "tanh" else "none"
    # (split / unbind rather than slicing, so that autograd concatenates /
    # stacks the pieces' gradients instead of zero-filling full-size buffers)
    xs = x.index_select(0, tok).split(counts)
    w1s, b1s, w2s, b2s = w1.unbind(0), b1.unbind(0), w2.unbind(0), b2.unbind(0)
    outs = []
    for e in range(E):
        if counts[e] == 0:
            continue
        h = F.gelu(torch.addmm(b1s[e], xs[e], w1s[e]), approximate=approx)
        outs.append(torch.addmm(b2s[e], h, w2s[e]))
    y = torch.zeros_like(x)
    if outs:
        y = y.index_add(0, tok, torch.cat(outs) * w_sorted.unsqueeze(1))

    mask1 = F.one_hot(topi[:, 0], E).to(gates.dtype)
    l_aux = (gates.view(G, S, E).mean(1) * mask1.view(G, S, E).mean(1)).mean(1) * (E * E)  # [G]
    aux = cfg["aux_coef"] * l_aux.mean()
    if cfg["z_coef"] != 0.0:
        aux = aux + cfg["z_coef"] * (torch.logsumexp(logits, dim=1) ** 2).mean()
    return y, aux, k * N - pos.numel()


def forward(p: dict, idx, targets, cfg: dict):
    """Returns (loss, ce_loss, logits, dropped assignments, total assignments)."""
    B, T = idx.shape
    D, H = cfg["d_model"], cfg["n_head"]
    dh = D // H
    eps = cfg["ln_eps"]
    approx = "tanh" if cfg["gelu"] == "tanh" else "none"
    x = F.embedding(idx, p["wte"]) + p["wpe"][:T]
    aux_total = x.new_zeros(())
    dropped = assigned = 0
    for l in range(cfg["n_layer"]):
        pre = f"h.{l}."
        a = F.layer_norm(x, (D,), p[pre + "ln1.weight"], p[pre + "ln1.bias"], eps)
        qkv = torch.addmm(p[pre + "attn.bqkv"], a.reshape(B * T, D), p[pre + "attn.wqkv"])
        q, k, v = qkv.view(B, T, 3, H, dh).permute(2, 0, 3, 1, 4)  # [B, H, T, dh] each
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o = o.transpose(1, 2).reshape(B * T, D)
        x = x + torch.addmm(p[pre + "attn.bo"], o, p[pre + "attn.wo"]).view(B, T, D)
        b = F.layer_norm(x, (D,), p[pre + "ln2.weight"], p[pre + "ln2.bias"], eps).reshape(B * T, D)
        if is_moe(cfg, l):
            y, aux, dr = moe_ffn(b, p[pre + "moe.wg"], p[pre + "moe.w1"], p[pre + "moe.b1"],
                                 p[pre + "moe.w2"], p[pre + "moe.b2"], cfg)
            aux_total = aux_total + aux
            dropped += dr
            assigned += cfg["k"] * B * T
        else:
            h = F.gelu(torch.addmm(p[pre + "mlp.b1"], b, p[pre + "mlp.w1"]), approximate=approx)
            y = torch.addmm(p[pre + "mlp.b2"], h, p[pre + "mlp.w2"])
        x = x + y.view(B, T, D)
    hf = F.layer_norm(x, (D,), p["ln_f.weight"], p["ln_f.bias"], eps)
    logits = hf @ p["lm_head"]
    ce = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1))
    return ce + aux_total, ce, logits, dropped, assigned


# --------------------------------------------------------------------------
# Optimizer and schedule (pinned by tests/golden/adamw)
# --------------------------------------------------------------------------

def lr_at(step: int, max_lr: float, min_lr: float, warmup: int, total_steps: int,
          schedule: str = "cosine", cooldown: float = 1.0) -> float:
    """semoe's OptimizerConfig::lr_at (tools/reference/lr_schedule.py)."""
    return _lr_at(step, max_lr, min_lr, warmup, total_steps, schedule, cooldown)


def make_optimizer(params: dict, a) -> torch.optim.Optimizer:
    decay = [t for t in params.values() if t.dim() >= 2]
    no_decay = [t for t in params.values() if t.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=a.lr, betas=(a.beta1, a.beta2), eps=a.eps, foreach=False)


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------

def load_bytes(path: str) -> torch.Tensor:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.long)


def eval_windows(data: torch.Tensor, T: int, count: int, B: int) -> list:
    """semoe's validation windows (`sampler::eval_starts`, src/train/sampler.rs): `count` windows
    of T+1 bytes at evenly spaced starts, in chunks of B (the last may be smaller)."""
    span = max(data.numel() - (T + 1), 0)
    starts = torch.tensor([0 if count <= 1 else i * span // (count - 1) for i in range(count)])
    w = data[starts.unsqueeze(1) + torch.arange(T + 1)]
    return [(w[i:i + B, :T], w[i:i + B, 1:]) for i in range(0, count, B)]


def sample(data: torch.Tensor, B: int, T: int, gen: torch.Generator):
    """B random windows of T+1 bytes: (inputs [B, T], targets [B, T])."""
    starts = torch.randint(0, data.numel() - T, (B,), generator=gen)
    w = data[starts.unsqueeze(1) + torch.arange(T + 1)]
    return w[:, :T], w[:, 1:]


# --------------------------------------------------------------------------
# Verification against the float64 golden vectors
# --------------------------------------------------------------------------

def verify() -> None:
    files = sorted(glob.glob(os.path.join(ROOT, "tests", "golden", "gpt", "*.json")))
    assert files, "no tests/golden/gpt/*.json"
    for path in files:
        with open(path) as fh:
            gold = json.load(fh)
        c = gold["config"]
        cfg = dict(c, dense=False)
        if cfg["drop_policy"] != "position" or cfg["dropless"]:
            print(f"skip {gold['name']}: only the position policy is implemented here")
            continue
        p = {n: torch.tensor(v, dtype=torch.float64, requires_grad=True)
             for n, v in gold["params"].items()}
        assert list(p) == list(param_shapes(cfg)), "parameter names/order"
        idx = torch.tensor(gold["idx"])
        tgt = torch.tensor(gold["targets"])
        loss, ce, logits, dropped, _ = forward(p, idx, tgt, cfg)
        grads = torch.autograd.grad(loss, list(p.values()))
        want_dropped = sum(gr["dropped"] for layer in gold["routing"] for gr in layer)

        def close(a, b, tol=1e-9):
            a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
            return bool(torch.all((a - b).abs() <= tol * (1e-3 + b.abs())))

        assert dropped == want_dropped, (gold["name"], dropped, want_dropped)
        assert close(logits.detach(), gold["logits"]), gold["name"]
        assert close(loss.detach(), gold["loss"]) and close(ce.detach(), gold["ce_loss"]), gold["name"]
        for n, g in zip(p, grads):
            assert close(g, gold["grads"][n]), (gold["name"], n)
        print(f"verify ok: {gold['name']} (loss {float(loss.detach()):.9f}, dropped {dropped})")


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description="Train the GPT-MoE byte LM in PyTorch (CPU, float32)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--data-dir", default=os.path.join(ROOT, "data", "shakespeare"),
                    help="folder with train.txt.gz and val.txt.gz")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-ff", type=int, default=256, help="hidden width of each expert")
    ap.add_argument("--dense-d-ff", type=int, default=None,
                    help="hidden width of the dense layers (default: d_ff)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--moe-every", type=int, default=1,
                    help="layer l is MoE if l %% moe_every == moe_every - 1")
    ap.add_argument("--dense", action="store_true",
                    help="replace every MoE FFN by a dense FFN of width k*d_ff")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--groups", type=int, default=4, help="routing groups per batch")
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--min-capacity", type=int, default=4)
    ap.add_argument("--gelu", choices=["erf", "tanh"], default="tanh")
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--z-coef", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    ap.add_argument("--min-lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--schedule", choices=["cosine", "linear"], default="cosine",
                    help="shape of the decay after warmup")
    ap.add_argument("--cooldown", type=float, default=1.0,
                    help="fraction of the steps after warmup that decay (below 1: warmup-stable-decay)")
    ap.add_argument("--steps", type=int, default=5000, help="total steps (of the schedule)")
    ap.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds")
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.99)
    ap.add_argument("--eps", type=float, default=1e-8)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip")
    ap.add_argument("--init-std", type=float, default=0.02)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-windows", type=int, default=256,
                    help="validation windows (semoe's train.eval_windows)")
    ap.add_argument("--print-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", default=None, help="JSON-lines log file")
    ap.add_argument("--print-params", action="store_true", help="print parameter counts and exit")
    ap.add_argument("--verify", action="store_true",
                    help="check the model against tests/golden/gpt (float64) and exit")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    if a.verify:
        verify()
        return

    cfg = {"vocab": 256, "block_size": a.block_size, "d_model": a.d_model, "n_layer": a.layers,
           "n_head": a.heads, "d_ff": a.d_ff, "experts": a.experts, "k": a.k,
           "capacity_factor": a.capacity_factor, "min_capacity": a.min_capacity,
           "moe_every": a.moe_every,
           "dense_d_ff": a.dense_d_ff if a.dense_d_ff is not None else a.d_ff,
           "aux_coef": a.aux_coef, "z_coef": a.z_coef, "gelu": a.gelu, "drop_policy": "position",
           "dropless": False, "normalize": True, "groups": a.groups, "ln_eps": 1e-5,
           "dense": a.dense}
    assert a.d_model % a.heads == 0 and a.batch % a.groups == 0
    total, active = count_params(cfg)
    kind = f"dense (FFN width {a.k * a.d_ff})" if a.dense else \
        f"MoE (E={a.experts}, k={a.k}, moe_every={a.moe_every})"
    print(f"model: {kind}, d_model={a.d_model}, layers={a.layers}, heads={a.heads}, "
          f"d_ff={a.d_ff}, block_size={a.block_size}")
    print(f"parameters: total {total:,}  active per token {active:,}")
    if a.print_params:
        return

    train = load_bytes(os.path.join(a.data_dir, "train.txt.gz"))
    val = load_bytes(os.path.join(a.data_dir, "val.txt.gz"))
    # One routing group per batch / groups windows, as in semoe's evaluation.
    val_batches = eval_windows(val, a.block_size, a.eval_windows, a.batch // a.groups)
    eval_cfg = dict(cfg, groups=1)
    gen = torch.Generator().manual_seed(a.seed)
    params = init_params(cfg, a.seed, a.init_std)
    plist = list(params.values())
    opt = make_optimizer(params, a)
    if not a.dense:
        print(f"capacity per expert per group: {capacity(cfg, a.batch // a.groups * a.block_size)}")
    print(f"train {train.numel():,} bytes, val {val.numel():,} bytes; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")

    def evaluate() -> float:
        with torch.no_grad():
            tot, n = 0.0, 0
            for x, y in val_batches:
                tot += float(forward(params, x, y, eval_cfg)[1]) * x.numel()
                n += x.numel()
        return tot / n

    logf = open(a.log, "w") if a.log else None
    tokens_per_step = a.batch * a.block_size
    t_start = time.perf_counter()
    train_time = 0.0
    step = 0
    while step < a.steps:
        t0 = time.perf_counter()
        x, y = sample(train, a.batch, a.block_size, gen)
        lr = lr_at(step, a.lr, a.min_lr, a.warmup, a.steps, a.schedule, a.cooldown)
        for grp in opt.param_groups:
            grp["lr"] = lr
        loss, ce, _, dropped, assigned = forward(params, x, y, cfg)
        for t in plist:
            t.grad = None
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(plist, a.clip))
        opt.step()
        loss_v, ce_v = float(loss.detach()), float(ce.detach())
        train_time += time.perf_counter() - t0
        elapsed = time.perf_counter() - t_start
        last = step + 1 >= a.steps or (a.time_limit is not None and elapsed >= a.time_limit)
        rec = {"step": step, "elapsed_s": round(elapsed, 3), "loss": loss_v, "ce_loss": ce_v,
               "lr": lr, "grad_norm": gnorm,
               "tokens_per_s": round(tokens_per_step * (step + 1) / train_time, 1)}
        if assigned:
            rec["dropped_frac"] = dropped / assigned
        if (step + 1) % a.eval_every == 0 or last:
            rec["val_loss"] = evaluate()
            rec["elapsed_s"] = round(time.perf_counter() - t_start, 3)
        if logf:
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
        if step % a.print_every == 0 or "val_loss" in rec or last:
            extra = f" | val {rec['val_loss']:.4f}" if "val_loss" in rec else ""
            drop = f" | drop {100 * rec['dropped_frac']:.1f}%" if assigned else ""
            print(f"step {step:5d} | loss {loss_v:.4f} (ce {ce_v:.4f}){extra} | lr {lr:.2e} | "
                  f"gnorm {gnorm:.2f}{drop} | {rec['tokens_per_s']:.0f} tok/s | "
                  f"{rec['elapsed_s']:.1f} s", flush=True)
        step += 1
        if last:
            break
    if logf:
        logf.close()
    print(f"done: {step} steps, {step * tokens_per_step:,} tokens, "
          f"{step * tokens_per_step / train_time:.0f} tokens/s (training only), "
          f"wall {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()

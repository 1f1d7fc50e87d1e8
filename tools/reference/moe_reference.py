"""Plain-PyTorch reference of the semoe Mixture-of-Experts layer.

This is the specification the Rust implementation is tested against (through
the golden vectors written by ``gen_moe_golden.py``).  It favours clarity over
speed: it is meant to be run in float64 on tiny problems.

Layer (S tokens, model width d_model, expert hidden width d_ff, E experts,
top-k routing):

    logits = x @ wg                      # [S, E], no bias
    gates  = softmax(logits, dim=1)
    idx_j  = j-th choice: argmax of gates with earlier choices masked to -inf
             (ties -> lowest expert index)
    C      = max(ceil(k * capacity_factor * S / E), min_capacity)
    keep_j, loc_j  by drop policy ("position" or "probs"), or all kept (dropless)
    g_j    = gates[s, idx_j[s]] * keep_j[s]
    w_j    = g_j                                     (k == 1, or normalize=False)
           = g_j / clamp(sum_j g_j, min=eps_f32)      (k >= 2, normalize=True)
    FFN_e(v) = GELU(v @ w1[e] + b1[e]) @ w2[e] + b2[e]
    y[s]   = sum_j w_j[s] * FFN_{idx_j[s]}(x[s])   over kept routes
    l_aux  = E * E * mean_e(mean_s(gates[:, e]) * mean_s(mask1[:, e]))
             (mask1 = one-hot of choice 0 before dropping, no gradient)
    z_loss = mean_s(logsumexp(logits[s]) ** 2)
    loss   = sum(y * gy) + aux_coef * l_aux + z_coef * z_loss

Routing decisions (idx, keep, loc) are discrete and carry no gradient; the
gradient flows through gates (combine weights and l_aux), logits (z_loss) and
the expert FFNs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from moe_math import capacity_of

EPS_F32 = torch.finfo(torch.float32).eps


@dataclass
class MoeConfig:
    S: int
    d_model: int
    d_ff: int
    E: int
    k: int
    capacity_factor: float = 1.0
    min_capacity: int = 4
    aux_coef: float = 0.01
    gelu: str = "erf"  # "erf" | "tanh"
    drop_policy: str = "position"  # "position" | "probs"
    dropless: bool = False
    z_coef: float = 0.0
    normalize: bool = True

    def validate(self) -> None:
        assert self.S >= 1 and self.d_model >= 1 and self.d_ff >= 1
        assert 1 <= self.k <= self.E, "k must be in 1..=E"
        assert self.gelu in ("erf", "tanh"), self.gelu
        assert self.drop_policy in ("position", "probs"), self.drop_policy
        assert self.min_capacity >= 0

    def to_dict(self) -> dict:
        return asdict(self)


def capacity(cfg: MoeConfig) -> int | None:
    """Expert capacity C, or None when dropless.

    Evaluated exactly as Python's ``math.ceil(k * capacity_factor * S / E)``
    (i.e. ((k * cf) * S) / E in float64, left to right) then clamped below by
    min_capacity.
    """
    return capacity_of(cfg.S, cfg.E, cfg.k, cfg.capacity_factor, cfg.min_capacity, cfg.dropless)


def topk_choices(gates: torch.Tensor, k: int) -> torch.Tensor:
    """idx [k, S]: choice j = argmax with earlier choices' experts masked out.

    torch.argmax returns the first maximal index, so ties go to the lowest
    expert index.
    """
    masked = gates.detach().clone()
    out = []
    rows = torch.arange(gates.shape[0])
    for _ in range(k):
        i = torch.argmax(masked, dim=1)
        out.append(i)
        masked[rows, i] = float("-inf")
    return torch.stack(out, dim=0)


def route(gates: torch.Tensor, cfg: MoeConfig) -> dict:
    """Discrete routing decisions (no gradient).

    Returns dict with idx [k,S] (long), keep [k,S] (bool), loc [k,S] (long),
    capacity (int | None).
    """
    S, E, k = cfg.S, cfg.E, cfg.k
    gd = gates.detach()
    idx = topk_choices(gd, k)  # [k, S]
    C = capacity(cfg)

    # Position-order slots: choice-major, then token order; counted before dropping.
    masks = F.one_hot(idx, E).to(torch.long)  # [k, S, E]
    loc = torch.empty(k, S, dtype=torch.long)
    prior = torch.zeros(E, dtype=torch.long)
    for j in range(k):
        loc_j = torch.cumsum(masks[j], dim=0) - 1 + prior  # [S, E]
        loc[j] = loc_j.gather(1, idx[j].unsqueeze(1)).squeeze(1)
        prior = prior + masks[j].sum(dim=0)

    if C is None:
        keep = torch.ones(k, S, dtype=torch.bool)
    elif cfg.drop_policy == "position":
        keep = loc < C
    else:  # "probs"
        keep = torch.zeros(k, S, dtype=torch.bool)
        loc = torch.full((k, S), -1, dtype=torch.long)
        for e in range(E):
            cand = [(j, s) for j in range(k) for s in range(S) if int(idx[j, s]) == e]
            # highest gate first; ties -> smaller choice j, then smaller token s
            ranked = sorted(cand, key=lambda js: (-float(gd[js[1], e]), js[0], js[1]))
            kept = sorted(ranked[:C])  # (choice j, token s) order
            for r, (j, s) in enumerate(kept):
                keep[j, s] = True
                loc[j, s] = r
    return {"idx": idx, "keep": keep, "loc": loc, "capacity": C}


def gelu(v: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "erf":
        return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))
    return F.gelu(v, approximate="tanh")


def moe_forward(x, wg, w1, b1, w2, b2, cfg: MoeConfig) -> dict:
    """Forward pass. Returns y, l_aux, z_loss, the combine weights w [k,S]
    (differentiable), gates, logits and the routing dict."""
    cfg.validate()
    S, E, k = cfg.S, cfg.E, cfg.k
    logits = x @ wg  # [S, E]
    gates = torch.softmax(logits, dim=1)
    r = route(gates, cfg)
    idx, keep = r["idx"], r["keep"]

    # combine weights
    g = torch.stack([gates.gather(1, idx[j].unsqueeze(1)).squeeze(1) for j in range(k)])  # [k,S]
    g = g * keep.to(gates.dtype)
    if k >= 2 and cfg.normalize:
        denom = torch.clamp(g.sum(dim=0), min=EPS_F32)
        w = g / denom
    else:
        w = g

    # dispatch / combine with index gathers and index_add
    y = torch.zeros_like(x)
    for e in range(E):
        sel = (idx == e) & keep  # [k, S]
        js, ss = torch.nonzero(sel, as_tuple=True)
        if ss.numel() == 0:
            continue
        xe = x.index_select(0, ss)
        h = gelu(xe @ w1[e] + b1[e], cfg.gelu)
        oe = h @ w2[e] + b2[e]
        we = w[js, ss]
        y = y.index_add(0, ss, oe * we.unsqueeze(1))

    mask1 = F.one_hot(idx[0], E).to(gates.dtype)  # before dropping, constant
    me = gates.mean(dim=0)
    ce = mask1.mean(dim=0)
    l_aux = (me * ce).mean() * E * E
    z_loss = (torch.logsumexp(logits, dim=1) ** 2).mean()
    return {"y": y, "l_aux": l_aux, "z_loss": z_loss, "w": w, "gates": gates,
            "logits": logits, "routing": r}


def moe_loss(x, wg, w1, b1, w2, b2, gy, cfg: MoeConfig) -> tuple[torch.Tensor, dict]:
    out = moe_forward(x, wg, w1, b1, w2, b2, cfg)
    loss = (out["y"] * gy).sum() + cfg.aux_coef * out["l_aux"] + cfg.z_coef * out["z_loss"]
    return loss, out


def run_reference(inputs: dict, cfg: MoeConfig) -> dict:
    """Full float64 forward + backward. ``inputs`` holds tensors x, gy, wg, w1,
    b1, w2, b2 (any float dtype; converted to float64). Returns expected values
    as float64 tensors / python scalars plus the routing."""
    names = ["x", "wg", "w1", "b1", "w2", "b2"]
    leaves = {n: inputs[n].detach().to(torch.float64).clone().requires_grad_(True) for n in names}
    gy = inputs["gy"].detach().to(torch.float64)
    loss, out = moe_loss(*(leaves[n] for n in names), gy, cfg)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    res = {
        "y": out["y"].detach(),
        "l_aux": float(out["l_aux"].detach()),
        "z_loss": float(out["z_loss"].detach()),
        "loss": float(loss.detach()),
        "w": out["w"].detach(),
        "gates": out["gates"].detach(),
        "routing": out["routing"],
    }
    for n, gr in zip(names, grads):
        res["grad_" + n] = gr.detach() if gr is not None else torch.zeros_like(leaves[n]).detach()
    return res

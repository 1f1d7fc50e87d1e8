"""Plain-PyTorch reference of the semoe GPT-MoE language model.

A GPT-style decoder whose feed-forward blocks are either dense GELU MLPs or the
semoe MoE layer.  The MoE layer is not re-implemented here: it is
``moe_reference.moe_forward`` (the layer specification the Rust code is tested
against).  Like that file, this one favours clarity over speed and is meant to
run in float64 on tiny problems.  ``gen_gpt_golden.py`` writes the golden
vectors from it.

Config (``GptConfig``): vocab V, block_size T, d_model D, n_layer L, n_head H
(d_head = D / H), d_ff F (hidden width of each expert), experts E, k,
capacity_factor, min_capacity, moe_every, dense_d_ff Fd (hidden width of the
dense FFN layers; None means F), aux_coef, z_coef, gelu, drop_policy,
dropless, normalize, groups G, ln_eps.

Layer l is a MoE layer when ``l % moe_every == moe_every - 1``, else dense.

Parameters, every matrix stored [in][out] so that y = x @ W:

    wte [V][D], wpe [T][D]
    h.{l}.ln1.weight [D], h.{l}.ln1.bias [D]
    h.{l}.attn.wqkv [D][3D], h.{l}.attn.bqkv [3D], h.{l}.attn.wo [D][D], h.{l}.attn.bo [D]
    h.{l}.ln2.weight [D], h.{l}.ln2.bias [D]
    MoE:   h.{l}.moe.wg [D][E], h.{l}.moe.w1 [E][D][F], h.{l}.moe.b1 [E][F],
           h.{l}.moe.w2 [E][F][D], h.{l}.moe.b2 [E][D]
    dense: h.{l}.mlp.w1 [D][Fd], h.{l}.mlp.b1 [Fd], h.{l}.mlp.w2 [Fd][D], h.{l}.mlp.b2 [D]
    ln_f.weight [D], ln_f.bias [D], lm_head [D][V]   (lm_head not tied to wte)

Forward for idx [B][T], targets [B][T]:

    x = wte[idx] + wpe[0:T]
    per layer:
        a = LN1(x); qkv = a @ wqkv + bqkv
        q, k, v = qkv[..., 0:D], qkv[..., D:2D], qkv[..., 2D:3D]
        head h uses columns h*dh:(h+1)*dh of q, k and v
        att = softmax(q k^T / sqrt(dh), future positions masked to -inf)
        x = x + concat_heads(att @ v) @ wo + bo
        b = LN2(x); x = x + FFN(b)
    logits = LN_f(x) @ lm_head
    ce_loss = mean over the B*T positions of -log_softmax(logits)[target]
    loss = ce_loss + sum over MoE layers of that layer's aux term

Dense FFN(b) = GELU(b @ w1 + b1) @ w2 + b2 (same GELU kind as the experts).

MoE FFN: the B sequences are split into G consecutive groups of B/G
sequences.  Group g holds the S = (B/G)*T tokens of sequences
g*B/G .. (g+1)*B/G - 1 in (sequence, position) row-major order.  The MoE layer
(moe_reference semantics, capacity computed from that S) runs separately on
each group; the outputs are put back in place.  The layer's aux term is
mean over groups of (aux_coef * l_aux_g + z_coef * z_loss_g).

LayerNorm(x) = (x - mean) / sqrt(var + eps) * w + b, biased variance.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_reference import MoeConfig, gelu, moe_forward  # noqa: E402


@dataclass
class GptConfig:
    block_size: int
    d_model: int
    n_layer: int
    n_head: int
    d_ff: int
    experts: int
    k: int
    vocab: int = 256
    capacity_factor: float = 1.0
    min_capacity: int = 4
    moe_every: int = 1
    dense_d_ff: int | None = None
    aux_coef: float = 0.01
    z_coef: float = 0.0
    gelu: str = "erf"  # "erf" | "tanh"
    drop_policy: str = "position"  # "position" | "probs"
    dropless: bool = False
    normalize: bool = True
    groups: int = 1
    ln_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dense_d_ff is None:
            self.dense_d_ff = self.d_ff

    def validate(self) -> None:
        assert self.d_model % self.n_head == 0, "d_model must be divisible by n_head"
        assert 1 <= self.k <= self.experts
        assert self.moe_every >= 1
        assert self.gelu in ("erf", "tanh")
        assert self.drop_policy in ("position", "probs")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    def is_moe(self, layer: int) -> bool:
        return layer % self.moe_every == self.moe_every - 1

    def moe_layers(self) -> list[int]:
        return [l for l in range(self.n_layer) if self.is_moe(l)]

    def moe_config(self, S: int) -> MoeConfig:
        """The MoE layer config for one routing group of S tokens."""
        return MoeConfig(S=S, d_model=self.d_model, d_ff=self.d_ff, E=self.experts, k=self.k,
                         capacity_factor=self.capacity_factor, min_capacity=self.min_capacity,
                         aux_coef=self.aux_coef, gelu=self.gelu, drop_policy=self.drop_policy,
                         dropless=self.dropless, z_coef=self.z_coef, normalize=self.normalize)

    def to_dict(self) -> dict:
        return asdict(self)


def param_shapes(cfg: GptConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes, in the canonical order."""
    V, T, D, F, E = cfg.vocab, cfg.block_size, cfg.d_model, cfg.d_ff, cfg.experts
    Fd = cfg.dense_d_ff
    shapes: dict[str, tuple[int, ...]] = {"wte": (V, D), "wpe": (T, D)}
    for l in range(cfg.n_layer):
        p = f"h.{l}."
        shapes[p + "ln1.weight"] = (D,)
        shapes[p + "ln1.bias"] = (D,)
        shapes[p + "attn.wqkv"] = (D, 3 * D)
        shapes[p + "attn.bqkv"] = (3 * D,)
        shapes[p + "attn.wo"] = (D, D)
        shapes[p + "attn.bo"] = (D,)
        shapes[p + "ln2.weight"] = (D,)
        shapes[p + "ln2.bias"] = (D,)
        if cfg.is_moe(l):
            shapes[p + "moe.wg"] = (D, E)
            shapes[p + "moe.w1"] = (E, D, F)
            shapes[p + "moe.b1"] = (E, F)
            shapes[p + "moe.w2"] = (E, F, D)
            shapes[p + "moe.b2"] = (E, D)
        else:
            shapes[p + "mlp.w1"] = (D, Fd)
            shapes[p + "mlp.b1"] = (Fd,)
            shapes[p + "mlp.w2"] = (Fd, D)
            shapes[p + "mlp.b2"] = (D,)
    shapes["ln_f.weight"] = (D,)
    shapes["ln_f.bias"] = (D,)
    shapes["lm_head"] = (D, V)
    return shapes


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased
    return (x - mean) / torch.sqrt(var + eps) * w + b


def attention(a: torch.Tensor, wqkv, bqkv, wo, bo, n_head: int) -> torch.Tensor:
    """Causal multi-head self-attention of a [B, T, D]."""
    B, T, D = a.shape
    dh = D // n_head
    qkv = a @ wqkv + bqkv  # [B, T, 3D]
    q, k, v = qkv[..., 0:D], qkv[..., D:2 * D], qkv[..., 2 * D:3 * D]
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # [t, t'] t' > t
    heads = []
    for h in range(n_head):
        cols = slice(h * dh, (h + 1) * dh)
        qh, kh, vh = q[..., cols], k[..., cols], v[..., cols]  # [B, T, dh]
        scores = qh @ kh.transpose(1, 2) / math.sqrt(dh)  # [B, T, T]
        scores = scores.masked_fill(future, float("-inf"))
        att = torch.softmax(scores, dim=-1)
        heads.append(att @ vh)
    o = torch.cat(heads, dim=-1)  # [B, T, D]
    return o @ wo + bo


def dense_ffn(b: torch.Tensor, w1, b1, w2, b2, kind: str) -> torch.Tensor:
    return gelu(b @ w1 + b1, kind) @ w2 + b2


def moe_ffn(b: torch.Tensor, p: dict, prefix: str, cfg: GptConfig):
    """MoE FFN of b [B, T, D], routed per group. Returns (y [B, T, D], aux term,
    list over groups of the moe_forward output dicts)."""
    B, T, D = b.shape
    G = cfg.groups
    assert B % G == 0, "batch must be divisible by groups"
    S = (B // G) * T
    mcfg = cfg.moe_config(S)
    flat = b.reshape(B * T, D)  # (sequence, position) row-major
    ys, outs = [], []
    aux = b.new_zeros(())
    for g in range(G):
        xg = flat[g * S:(g + 1) * S]
        out = moe_forward(xg, p[prefix + "wg"], p[prefix + "w1"], p[prefix + "b1"],
                          p[prefix + "w2"], p[prefix + "b2"], mcfg)
        ys.append(out["y"])
        outs.append(out)
        aux = aux + cfg.aux_coef * out["l_aux"] + cfg.z_coef * out["z_loss"]
    y = torch.cat(ys, dim=0).reshape(B, T, D)
    return y, aux / G, outs


def gpt_forward(p: dict, idx: torch.Tensor, targets: torch.Tensor, cfg: GptConfig) -> dict:
    """Forward pass. ``p`` maps parameter names to tensors (all the same float
    dtype). Returns logits [B,T,V], loss, ce_loss, aux (list of per-MoE-layer
    aux terms, tensors) and moe (list over MoE layers of lists over groups of
    moe_forward outputs, which hold the routing)."""
    cfg.validate()
    B, T = idx.shape
    assert T <= cfg.block_size
    x = p["wte"][idx] + p["wpe"][0:T]
    aux_terms, moe_outs = [], []
    for l in range(cfg.n_layer):
        pre = f"h.{l}."
        a = layer_norm(x, p[pre + "ln1.weight"], p[pre + "ln1.bias"], cfg.ln_eps)
        x = x + attention(a, p[pre + "attn.wqkv"], p[pre + "attn.bqkv"], p[pre + "attn.wo"],
                          p[pre + "attn.bo"], cfg.n_head)
        b = layer_norm(x, p[pre + "ln2.weight"], p[pre + "ln2.bias"], cfg.ln_eps)
        if cfg.is_moe(l):
            y, aux, outs = moe_ffn(b, p, pre + "moe.", cfg)
            aux_terms.append(aux)
            moe_outs.append(outs)
        else:
            y = dense_ffn(b, p[pre + "mlp.w1"], p[pre + "mlp.b1"], p[pre + "mlp.w2"],
                          p[pre + "mlp.b2"], cfg.gelu)
        x = x + y
    h = layer_norm(x, p["ln_f.weight"], p["ln_f.bias"], cfg.ln_eps)
    logits = h @ p["lm_head"]  # [B, T, V]
    logp = torch.log_softmax(logits, dim=-1)
    ce = -logp.gather(2, targets.unsqueeze(2)).squeeze(2).mean()
    loss = ce
    for a in aux_terms:
        loss = loss + a
    return {"logits": logits, "loss": loss, "ce_loss": ce, "aux": aux_terms, "moe": moe_outs}


def run_reference(params: dict, idx, targets, cfg: GptConfig) -> dict:
    """Float64 forward + backward. ``params`` holds tensors of any float dtype
    (converted to float64). Returns float64 tensors / python floats, the
    gradients of ``loss`` for every parameter, and the MoE outputs."""
    leaves = {n: params[n].detach().to(torch.float64).clone().requires_grad_(True)
              for n in param_shapes(cfg)}
    idx = torch.as_tensor(idx, dtype=torch.long)
    targets = torch.as_tensor(targets, dtype=torch.long)
    out = gpt_forward(leaves, idx, targets, cfg)
    names = list(leaves)
    grads = torch.autograd.grad(out["loss"], [leaves[n] for n in names], allow_unused=True)
    return {
        "logits": out["logits"].detach(),
        "loss": float(out["loss"].detach()),
        "ce_loss": float(out["ce_loss"].detach()),
        "aux": [float(a.detach()) for a in out["aux"]],
        "moe": out["moe"],
        "grads": {n: (g.detach() if g is not None else torch.zeros_like(leaves[n]).detach())
                  for n, g in zip(names, grads)},
    }

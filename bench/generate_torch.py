"""Key/value-cached generation from a semoe checkpoint in PyTorch (CPU, float32): the side-by-side
baseline for `semoe bench generate`.

The same model and the same decoding as src/infer/ (tools/reference/gpt_reference.py is the
float64 spec of the model): a cache of keys and values per block, one position of work per byte,
MoE blocks dropless (softmax gate, top-k, renormalised), and the same window policy (when the window
of block_size tokens is full, the newest block_size/2 are encoded again from position 0). All
sequences of a batch share the prompt, so they stay at the same position and decode as one tensor.

    python bench/generate_torch.py --checkpoint runs/run-<time> --threads 1 --batch 1,16
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def checkpoint_dir(path: str) -> str:
    if os.path.exists(os.path.join(path, "manifest.json")):
        return path
    steps = sorted(glob.glob(os.path.join(path, "checkpoints", "step-*")))
    if not steps:
        raise SystemExit(f"{path}: no checkpoint")
    return steps[-1]


class Model:
    def __init__(self, ckpt: str):
        d = checkpoint_dir(ckpt)
        with open(os.path.join(d, "manifest.json")) as f:
            self.cfg = json.load(f)["extra"]["config"]["model"]
        self.t = load_file(os.path.join(d, "model.safetensors"))
        c = self.cfg
        self.D, self.H, self.T, self.V = c["d_model"], c["n_head"], c["block_size"], c["vocab"]
        self.L, self.E, self.K = c["n_layer"], c["experts"], c["k"]
        every = c["moe_every"]
        self.moe = [every > 0 and l % every == every - 1 for l in range(self.L)]
        self.gelu = "tanh" if c.get("gelu", "erf") == "tanh" else "none"

    def w(self, name):
        return self.t[name]

    def ffn(self, x, w1, b1, w2, b2):
        return F.gelu(x @ w1 + b1, approximate=self.gelu) @ w2 + b2

    def moe_block(self, l, x):
        p = f"h.{l}.moe."
        gates = torch.softmax(x @ self.w(p + "wg"), dim=-1)
        top, idx = torch.topk(gates, self.K, dim=-1)
        if self.K >= 2 and self.cfg.get("normalize", True):
            top = top / top.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps)
        y = torch.zeros_like(x)
        w1, b1, w2, b2 = (self.w(p + n) for n in ("w1", "b1", "w2", "b2"))
        for e in torch.unique(idx).tolist():
            rows, slot = (idx == e).nonzero(as_tuple=True)
            out = self.ffn(x[rows], w1[e], b1[e], w2[e], b2[e])
            y.index_add_(0, rows, out * top[rows, slot].unsqueeze(-1))
        return y

    def forward(self, tokens, pos0, cache):
        """tokens [B][n] at positions pos0..pos0+n; cache[l] = (k, v) of [B][H][T][dh]."""
        B, n = tokens.shape
        D, H = self.D, self.H
        dh = D // H
        x = self.w("wte")[tokens] + self.w("wpe")[pos0 : pos0 + n]
        for l in range(self.L):
            p = f"h.{l}."
            a = F.layer_norm(x, (D,), self.w(p + "ln1.weight"), self.w(p + "ln1.bias"))
            qkv = a @ self.w(p + "attn.wqkv") + self.w(p + "attn.bqkv")
            q, k, v = qkv.split(D, dim=-1)
            q = q.view(B, n, H, dh).transpose(1, 2)
            kc, vc = cache[l]
            kc[:, :, pos0 : pos0 + n] = k.view(B, n, H, dh).transpose(1, 2)
            vc[:, :, pos0 : pos0 + n] = v.view(B, n, H, dh).transpose(1, 2)
            keys, values = kc[:, :, : pos0 + n], vc[:, :, : pos0 + n]
            mask = torch.ones(n, pos0 + n, dtype=torch.bool).tril(diagonal=pos0)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            o = o.transpose(1, 2).reshape(B, n, D)
            x = x + o @ self.w(p + "attn.wo") + self.w(p + "attn.bo")
            a = F.layer_norm(x, (D,), self.w(p + "ln2.weight"), self.w(p + "ln2.bias"))
            if self.moe[l]:
                y = self.moe_block(l, a.reshape(B * n, D)).view(B, n, D)
            else:
                y = self.ffn(a, *(self.w(p + "mlp." + s) for s in ("w1", "b1", "w2", "b2")))
            x = x + y
        last = F.layer_norm(x[:, -1], (D,), self.w("ln_f.weight"), self.w("ln_f.bias"))
        return last @ self.w("lm_head")


def sample(logits, gen, temperature=0.8, top_k=40):
    v, i = torch.topk(logits, top_k, dim=-1)
    p = torch.softmax(v / temperature, dim=-1)
    return i.gather(-1, torch.multinomial(p, 1, generator=gen))


@torch.no_grad()
def generate(m: Model, batch: int, tokens: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    dh = m.D // m.H
    cache = [(torch.zeros(batch, m.H, m.T, dh), torch.zeros(batch, m.H, m.T, dh)) for _ in range(m.L)]
    window = torch.tensor([list(b"ROMEO.\n")] * batch)
    start = time.perf_counter()
    logits = m.forward(window, 0, cache)
    length = window.shape[1]
    for _ in range(tokens):
        nxt = sample(logits, gen)
        if length == m.T:
            keep = m.T // 2
            window = torch.cat([window[:, -keep:], nxt], dim=1)
            logits = m.forward(window, 0, cache)
            length = window.shape[1]
        else:
            window = torch.cat([window, nxt], dim=1)
            logits = m.forward(nxt, length, cache)
            length += 1
    return batch * tokens / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    m = Model(a.checkpoint)
    generate(m, 1, 64, 0)
    for b in [int(x) for x in a.batch.split(",")]:
        figures = [generate(m, b, a.tokens, r) for r in range(a.rounds)]
        print(f"pytorch {torch.__version__}, {a.threads} thread(s), batch {b:>3}: {statistics.median(figures):>9.0f} bytes/s "
              f"(rounds {', '.join(f'{f:.0f}' for f in figures)})")


if __name__ == "__main__":
    main()

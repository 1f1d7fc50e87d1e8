"""PyTorch baseline for the semoe MoE layer (forward and forward+backward), on CPU or a GPU.

Same layer as tools/reference/moe_reference.py (position drop policy), in
float32, written the efficient plain-PyTorch way: routing with topk/cumsum,
then for each expert index_select its kept tokens, addmm, gelu, addmm and a
weighted index_add_ into the output. There is no dense one-hot dispatch
einsum. Backward is autograd.

    python bench/moe_layer_torch.py                      # headline config
    python bench/moe_layer_torch.py --iters 3 --json     # one JSON line
    python bench/moe_layer_torch.py --verify             # check against the float64 reference
    python bench/moe_layer_torch.py --device cuda --tokens 16384 --d-model 1024 --d-ff 4096
                                                         # on a GPU, with the matrix rate of the
                                                         # expert products' shape (cuBLAS)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# The formulas shared with the references (tools/reference/), written once there.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "reference"))
from moe_math import capacity_of  # noqa: E402

EPS_F32 = torch.finfo(torch.float32).eps


def capacity(S, E, k, capacity_factor, min_capacity, dropless):
    return capacity_of(S, E, k, capacity_factor, min_capacity, dropless)


def route(gates, k, cap):
    """Position policy (DeepSpeed top2gating generalised to k, choice-major).

    Returns idx [k, S], keep [k, S]. No gradient."""
    S, E = gates.shape
    _, topi = torch.topk(gates, k, dim=1)  # [S, k], descending
    idx = topi.t().contiguous()  # [k, S]
    if cap is None:
        return idx, torch.ones_like(idx, dtype=torch.bool)
    flat = idx.reshape(-1)  # choice-major then token order
    onehot = F.one_hot(flat, E)  # [k*S, E]
    loc = (onehot.cumsum(0) - 1).gather(1, flat.unsqueeze(1)).squeeze(1)
    keep = (loc < cap).view(k, S)
    return idx, keep


def moe_layer(x, wg, w1, b1, w2, b2, k, cap, gelu_kind="erf", normalize=True):
    """Returns y, l_aux, kept (number of kept assignments)."""
    S, _ = x.shape
    E = wg.shape[1]
    logits = x @ wg
    gates = torch.softmax(logits, dim=1)
    with torch.no_grad():
        idx, keep = route(gates, k, cap)
    g = gates.gather(1, idx.t()) * keep.t().to(gates.dtype)  # [S, k]
    if k >= 2 and normalize:
        g = g / g.sum(dim=1, keepdim=True).clamp(min=EPS_F32)

    with torch.no_grad():
        keep_flat = keep.reshape(-1)
        pos = keep_flat.nonzero().squeeze(1)  # positions j*S + s of kept assignments
        exp = idx.reshape(-1).index_select(0, pos)
        order = torch.argsort(exp, stable=True)
        pos = pos.index_select(0, order)
        tok = pos % S
        choice = pos // S
        counts = torch.bincount(exp, minlength=E).tolist()
    w_sorted = g[tok, choice]  # differentiable gather of the combine weights

    y = torch.zeros_like(x)
    start = 0
    for e in range(E):
        n = counts[e]
        if n == 0:
            continue
        t = tok[start:start + n]
        xe = x.index_select(0, t)
        h = torch.addmm(b1[e], xe, w1[e])
        h = F.gelu(h, approximate="tanh" if gelu_kind == "tanh" else "none")
        o = torch.addmm(b2[e], h, w2[e])
        y.index_add_(0, t, o * w_sorted[start:start + n].unsqueeze(1))
        start += n

    mask1 = F.one_hot(idx[0], E).to(gates.dtype)
    l_aux = (gates.mean(0) * mask1.mean(0)).mean() * (E * E)
    return y, l_aux, start


def make_inputs(S, d, f, E, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)

    params = {
        "x": rn(S, d),
        "wg": rn(d, E) / math.sqrt(d),
        "w1": rn(E, d, f) / math.sqrt(d),
        "b1": rn(E, f) * 0.1,
        "w2": rn(E, f, d) / math.sqrt(f),
        "b2": rn(E, d) * 0.1,
    }
    gy = rn(S, d)
    return params, gy


def verify() -> None:
    """Check this implementation against the float64 reference on small cases."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "..", "tools", "reference"))
    from moe_reference import MoeConfig, run_reference  # noqa: E402

    names = ["x", "wg", "w1", "b1", "w2", "b2"]
    for (S, d, f, E, k, cf, gelu_kind) in [(64, 16, 32, 8, 2, 1.0, "erf"),
                                          (37, 8, 16, 4, 1, 0.5, "tanh"),
                                          (48, 8, 16, 6, 3, 0.75, "erf")]:
        cfg = MoeConfig(S=S, d_model=d, d_ff=f, E=E, k=k, capacity_factor=cf, min_capacity=4,
                        aux_coef=0.01, gelu=gelu_kind)
        params, gy = make_inputs(S, d, f, E, seed=123)
        ref = run_reference({**params, "gy": gy}, cfg)
        leaves = [params[n].to(torch.float64).requires_grad_(True) for n in names]
        cap = capacity(S, E, k, cf, 4, False)
        y, l_aux, _ = moe_layer(*leaves, k, cap, gelu_kind)
        loss = (y * gy.double()).sum() + 0.01 * l_aux
        grads = torch.autograd.grad(loss, leaves)
        assert torch.allclose(y, ref["y"], rtol=1e-9, atol=1e-11)
        assert abs(float(l_aux.detach()) - ref["l_aux"]) < 1e-12
        for n, gr in zip(names, grads):
            assert torch.allclose(gr, ref["grad_" + n], rtol=1e-9, atol=1e-11), n
        print(f"verify ok: S={S} E={E} k={k} cf={cf} gelu={gelu_kind}")


def main() -> None:
    ap = argparse.ArgumentParser(description="PyTorch baseline for the MoE layer (CPU or GPU)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--capacity-factor", type=float, default=1.0)
    ap.add_argument("--min-capacity", type=int, default=4)
    ap.add_argument("--dropless", action="store_true")
    ap.add_argument("--gelu", choices=["erf", "tanh"], default="erf")
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (cuda:N) to run on a GPU")
    ap.add_argument("--tf32", action="store_true",
                    help="on a GPU, let matrix products use TF32 (default: full float32)")
    ap.add_argument("--bf16", action="store_true",
                    help="on a GPU, run the layer under torch.autocast(bfloat16): every matrix "
                         "product in bfloat16 with float32 sums (semoe's --precision bf16; "
                         "set_float32_matmul_precision('medium') would give TF32 on CUDA)")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--verify", action="store_true",
                    help="check against tools/reference/moe_reference.py and exit")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    if a.verify:
        verify()
        return

    dev = torch.device(a.device)
    gpu = dev.type == "cuda"
    if gpu:
        if not torch.cuda.is_available():
            sys.exit(f"--device {a.device}: torch {torch.__version__} sees no CUDA GPU")
        torch.backends.cuda.matmul.allow_tf32 = a.tf32
        torch.backends.cudnn.allow_tf32 = a.tf32

    def precision():
        # A fresh context each time (autocast contexts are not reentrant objects to share).
        if gpu and a.bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync():
        if gpu:
            torch.cuda.synchronize(dev)

    S, d, f, E, k = a.tokens, a.d_model, a.d_ff, a.experts, a.k
    cap = capacity(S, E, k, a.capacity_factor, a.min_capacity, a.dropless)
    params, gy = make_inputs(S, d, f, E, a.seed)
    params = {n: t.to(dev) for n, t in params.items()}
    gy = gy.to(dev)
    names = ["x", "wg", "w1", "b1", "w2", "b2"]
    leaves = [params[n].requires_grad_(True) for n in names]

    def fwd():
        with torch.no_grad(), precision():
            return moe_layer(*leaves, k, cap, a.gelu)

    def fwd_bwd():
        for p in leaves:
            p.grad = None
        with precision():
            y, l_aux, kept = moe_layer(*leaves, k, cap, a.gelu)
            loss = (y.float() * gy).sum() + a.aux_coef * l_aux.float()
        loss.backward()
        return kept

    def timeit(fn):
        for _ in range(a.warmup):
            fn()
        sync()
        ts = []
        for _ in range(a.iters):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    _, _, kept = fwd()
    kept = int(kept)
    t_fwd = timeit(fwd)
    t_fb = timeit(fwd_bwd)

    # The matrix rate at the expert products' shape ([capacity][d_model] x [d_model][d_ff], one per
    # expert): what the layer's products could reach on this device (cuBLAS on a GPU).
    # Dropless: as many rows per expert as the kept assignments spread evenly.
    rows = cap if cap is not None else -(-kept // E)
    xa = torch.randn(E, rows, d, device=dev)
    wa = torch.randn(E, d, f, device=dev)
    if gpu and a.bf16:
        # Converted once, outside the clock (autocast would convert them at every product).
        xa, wa = xa.to(torch.bfloat16), wa.to(torch.bfloat16)

    def products():
        with precision():
            for e in range(E):
                torch.mm(xa[e], wa[e])

    t_mm = timeit(products)
    mm_gflops = 2.0 * E * rows * d * f / t_mm / 1e9

    mm = 2.0 * kept * d * f  # flops of one expert matmul over all kept tokens
    res = {
        "impl": "torch",
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(dev) if gpu else platform.machine(),
        "tf32": bool(gpu and a.tf32),
        "bf16": bool(gpu and a.bf16),
        "threads": a.threads,
        "tokens": S, "d_model": d, "d_ff": f, "experts": E, "k": k,
        "capacity_factor": a.capacity_factor, "capacity": cap,
        "kept": kept, "dropped": k * S - kept, "gelu": a.gelu,
        "iters": a.iters, "warmup": a.warmup,
        "fwd_ms": t_fwd * 1e3,
        "fwd_bwd_ms": t_fb * 1e3,
        "fwd_tokens_per_s": S / t_fwd,
        "fwd_bwd_tokens_per_s": S / t_fb,
        "fwd_expert_gflops": 2 * mm / t_fwd / 1e9,
        "fwd_bwd_expert_gflops": 6 * mm / t_fb / 1e9,
        "matmul_gflops": mm_gflops,
    }
    if a.json:
        print(json.dumps(res))
        return
    mode = " (bf16 products)" if res["bf16"] else " (TF32)" if res["tf32"] else ""
    where = f"{res['device']}{mode}" if gpu else f"{platform.machine()}, {a.threads} thread(s)"
    print(f"torch {torch.__version__} on {where}")
    print(f"S={S} d_model={d} d_ff={f} E={E} k={k} cf={a.capacity_factor} capacity={cap} "
          f"kept={kept} dropped={k * S - kept} gelu={a.gelu}")
    print(f"forward      : {t_fwd * 1e3:9.2f} ms  {res['fwd_tokens_per_s']:10.0f} tokens/s  "
          f"{res['fwd_expert_gflops']:7.1f} expert GFLOP/s")
    print(f"fwd+backward : {t_fb * 1e3:9.2f} ms  {res['fwd_bwd_tokens_per_s']:10.0f} tokens/s  "
          f"{res['fwd_bwd_expert_gflops']:7.1f} expert GFLOP/s")
    print(f"matrix rate at the expert products' shape: {mm_gflops:7.1f} GFLOP/s")
    print(f"(median of {a.iters} iterations after {a.warmup} warm-up)")


if __name__ == "__main__":
    main()

"""Reproduce semoe's validation loss of a checkpoint with the float64 PyTorch reference.

Run from anywhere:

    .venv-ref/bin/python tools/reference/eval_checkpoint.py CHECKPOINT_DIR [--expect LOSS]
                                                            [--data PATH] [--threads N]

CHECKPOINT_DIR is a directory written by `semoe train` (e.g. RUN/checkpoints/step-00000500)
holding `model.safetensors` and `manifest.json`. The training config is read from the manifest's
`extra.config`; the loss is computed exactly as `Trainer::evaluate` does (src/train/trainer.rs):

  * validation text: the bundled corpus's `data/shakespeare/val.txt.gz` when `train.data` is null,
    otherwise the last `val_fraction` of the user's text (`Corpus::from_path`, src/train/data.rs:
    a file, or a directory's files in sorted path order joined with a blank line);
  * `eval_windows` windows of block_size + 1 bytes at `eval_starts(len, T, count)`
    (src/train/sampler.rs): inputs window[0:T], targets window[1:T+1];
  * the windows are run `batch // groups` at a time, each chunk one MoE routing group (capacity
    from that chunk's tokens; the last chunk may be smaller);
  * loss = summed cross-entropy over all windows and positions / (windows * T), in nats per byte.
    No auxiliary terms.

The forward pass is `gpt_reference.gpt_forward` in float64, on the checkpoint's float32 weights
converted to float64. semoe computes in float32, so the two agree to ~1e-6, not bit for bit. A
routing decision whose gate values are nearly tied may flip between the two precisions; the
script prints how many such near-ties it saw (each one moves the loss by at most ~1/tokens).

With --expect LOSS it exits with status 1 if |loss - LOSS| > --tol (default 1e-4).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt_reference import GptConfig, gpt_forward, param_shapes  # noqa: E402

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
BUNDLED_VAL = os.path.join(REPO_ROOT, "data", "shakespeare", "val.txt.gz")
NEAR_TIE = 1e-6  # gate gaps below this are counted as routing near-ties (informational)

# Defaults of src/model/gpt.rs (GptConfig) and src/train/config.rs (TrainSettings), used only for
# keys a manifest might lack (semoe writes the full config, so normally none).
MODEL_DEFAULTS = dict(vocab=256, block_size=64, d_model=128, n_layer=3, n_head=4, d_ff=256,
                      dense_d_ff=0, moe_every=1, experts=8, k=2, capacity_factor=1.25,
                      min_capacity=4, dropless=False, drop_policy="position", normalize=True,
                      aux_coef=0.01, z_coef=0.0, gelu="tanh")
TRAIN_DEFAULTS = dict(batch=32, groups=4, eval_windows=256, data=None, val_fraction=0.1)


def reference_config(m: dict) -> GptConfig:
    """gpt_reference's GptConfig for semoe's model config (one routing group per forward)."""
    n_layer = int(m["n_layer"])
    moe_every = int(m["moe_every"])
    if moe_every == 0:
        # semoe: 0 = no MoE block. gpt_reference's rule `l % e == e - 1` with e = n_layer + 1 is
        # false for every layer l < n_layer.
        moe_every = n_layer + 1
    return GptConfig(
        vocab=int(m["vocab"]), block_size=int(m["block_size"]), d_model=int(m["d_model"]),
        n_layer=n_layer, n_head=int(m["n_head"]), d_ff=int(m["d_ff"]),
        experts=int(m["experts"]), k=int(m["k"]),
        capacity_factor=float(m["capacity_factor"]), min_capacity=int(m["min_capacity"]),
        moe_every=moe_every, dense_d_ff=(int(m["dense_d_ff"]) or None),
        aux_coef=float(m["aux_coef"]), z_coef=float(m["z_coef"]), gelu=str(m["gelu"]).lower(),
        drop_policy=str(m["drop_policy"]).lower(), dropless=bool(m["dropless"]),
        normalize=bool(m["normalize"]), groups=1)


def collect_files(d: str, out: list) -> None:
    """Like data.rs collect_files: recurse into directories (whatever their name), keep regular
    files not starting with '.', skip symlinks and anything else."""
    with os.scandir(d) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                collect_files(e.path, out)
            elif e.is_file(follow_symlinks=False) and not e.name.startswith("."):
                out.append(e.path)


def user_val_text(path: str, val_fraction: float) -> bytes:
    """The validation split of Corpus::from_path."""
    if os.path.isdir(path):
        files: list[str] = []
        collect_files(path, files)
        # Rust sorts PathBufs component by component, comparing bytes.
        files.sort(key=lambda p: [os.fsencode(c) for c in p.split(os.sep)])
        if not files:
            raise SystemExit(f"error: training data {path}: the directory has no files")
    else:
        files = [path]
    text = bytearray()
    for f in files:
        with open(f, "rb") as fh:
            b = fh.read()
        if text and b:
            text += b"\n\n"
        text += b
    if not (0.0 < val_fraction < 1.0):
        raise SystemExit(f"error: val_fraction must be in (0, 1), got {val_fraction}")
    split = len(text) - int(len(text) * val_fraction)
    return bytes(text[split:])


def resolve_data(data: str) -> str:
    """train.data as written in the config: absolute, or relative to the directory `semoe train`
    ran in, which the checkpoint does not record. A relative path is taken from the current
    directory (run this script where the training ran, or pass --data); no other guess is made,
    since a same-named path elsewhere (e.g. the repository's own data/) would silently give a
    different text."""
    if os.path.isabs(data):
        return data
    p = os.path.abspath(data)
    if not os.path.exists(p):
        raise SystemExit(f"error: train.data is the relative path {data!r}, which is not found from "
                         f"the current directory; run where the training ran or give --data")
    print(f"note: train.data {data!r} is relative; using {p}", file=sys.stderr)
    return p


def eval_starts(text_len: int, t: int, count: int) -> list[int]:
    span = max(text_len - (t + 1), 0)
    return [0 if count <= 1 else i * span // (count - 1) for i in range(count)]


def count_near_ties(moe_outs: list, k: int, E: int) -> int:
    """Tokens whose top-(k+1) gate values (the k choices and the first excluded expert) have two
    neighbours closer than NEAR_TIE; a float32 run may route them differently."""
    n = 0
    top = min(k + 1, E)
    if top < 2:
        return 0
    for layer in moe_outs:
        for out in layer:
            srt, _ = torch.sort(out["gates"], dim=1, descending=True)
            gaps = srt[:, : top - 1] - srt[:, 1:top]
            n += int((gaps.min(dim=1).values < NEAR_TIE).sum())
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="checkpoint directory (model.safetensors + manifest.json)")
    ap.add_argument("--expect", type=float, default=None, help="semoe's logged val_loss")
    ap.add_argument("--tol", type=float, default=1e-4, help="tolerance for --expect (1e-4)")
    ap.add_argument("--data", default=None, help="override train.data (the user's text path)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, args.threads))

    with open(os.path.join(args.checkpoint, "manifest.json")) as fh:
        manifest = json.load(fh)
    config = manifest["extra"]["config"]
    m = {**MODEL_DEFAULTS, **config.get("model", {})}
    tr = {**TRAIN_DEFAULTS, **config.get("train", {})}
    cfg = reference_config(m)
    T = cfg.block_size

    data = args.data if args.data is not None else tr["data"]
    if data is None:
        with gzip.open(BUNDLED_VAL, "rb") as fh:
            val = fh.read()
        source = "bundled " + os.path.relpath(BUNDLED_VAL, REPO_ROOT)
    else:
        path = data if args.data is not None else resolve_data(str(data))
        val = user_val_text(path, float(tr["val_fraction"]))
        source = f"{path} (last {tr['val_fraction']})"
    if len(val) < T + 1:
        raise SystemExit(f"error: the validation text has {len(val)} bytes, fewer than block_size + 1")

    raw = load_file(os.path.join(args.checkpoint, "model.safetensors"))
    shapes = param_shapes(cfg)
    missing = [n for n in shapes if n not in raw]
    extra = [n for n in raw if n not in shapes]
    if missing or extra:
        raise SystemExit(f"error: checkpoint tensors do not match the config: missing {missing}, "
                         f"unexpected {extra}")
    p = {}
    for n, s in shapes.items():
        if tuple(raw[n].shape) != s:
            raise SystemExit(f"error: {n} has shape {tuple(raw[n].shape)}, expected {s}")
        p[n] = raw[n].to(torch.float64)

    count = int(tr["eval_windows"])
    seqs = max(int(tr["batch"]) // int(tr["groups"]), 1)
    starts = eval_starts(len(val), T, count)
    vt = torch.frombuffer(bytearray(val), dtype=torch.uint8).to(torch.long)
    ar = torch.arange(T + 1)

    t0 = time.time()
    ce_sum = 0.0
    near_ties = 0
    n_chunks = 0
    with torch.no_grad():
        for c in range(0, len(starts), seqs):
            chunk = torch.tensor(starts[c:c + seqs], dtype=torch.long)
            win = vt[chunk.unsqueeze(1) + ar]  # [B, T+1]
            idx, targets = win[:, :T], win[:, 1:]
            out = gpt_forward(p, idx, targets, cfg)  # one routing group: the whole chunk
            logp = torch.log_softmax(out["logits"], dim=-1)
            ce_sum += float(-logp.gather(2, targets.unsqueeze(2)).sum())
            near_ties += count_near_ties(out["moe"], cfg.k, cfg.experts)
            n_chunks += 1
    loss = ce_sum / (len(starts) * T)

    step = manifest.get("step")
    moe_layers = cfg.moe_layers() if int(m["moe_every"]) > 0 else []
    print(f"checkpoint: {args.checkpoint} (step {step})")
    print(f"model: {cfg.n_layer} layers, d_model {cfg.d_model}, MoE layers {moe_layers}"
          + (f", E={cfg.experts} k={cfg.k} cf={cfg.capacity_factor}" if moe_layers else ""))
    print(f"validation text: {source}, {len(val)} bytes")
    print(f"windows: {len(starts)} x {T} tokens = {len(starts) * T} tokens, "
          f"{n_chunks} chunks (routing groups) of up to {seqs} windows ({time.time() - t0:.1f} s)")
    if moe_layers:
        print(f"routing near-ties (top-{cfg.k + 1} gate gap < {NEAR_TIE:g}): {near_ties}")
    print(f"val_loss: {loss!r}")
    if args.expect is not None:
        diff = loss - args.expect
        ok = abs(diff) <= args.tol
        print(f"expected: {args.expect!r}  diff: {diff:+.3e}  tol: {args.tol:g}  "
              f"{'OK' if ok else 'MISMATCH'}")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark the fusion training step against a CLM-only step, and the fusion term's memory.

    python scripts/bench_train.py            # SmolLM2 (demo packages), 2 x 256-token blocks
    python scripts/bench_train.py --tiny     # a random 32k-vocabulary Llama (seconds)

* ``fusion_over_clm_step``: median time of a full training step (forward, loss, backward,
  AdamW step) with ``λ·CLM + (1−λ)·fusion`` over the same step with the plain CLM loss
  (``F.cross_entropy`` on the logits, as the HF model computes it), same batches,
  interleaved repeats.
* ``fusion_extra_bytes``: bytes the fusion loss allocates (forward + backward) beyond
  the plain CLM cross-entropy, for several k and two vocabulary sizes, counted by
  intercepting every tensor the ops create (a ``TorchDispatchMode``). Negative means it
  allocates less (its lean gather-from-log-softmax backward); ``fusion_bytes_k1_to_k100``
  is what k costs, the same at both vocabulary sizes.
* ``chunked_over_full_loss_peak``: peak memory of the loss (output head + λ·CLM + fusion,
  forward and backward) with the head in chunks (``train.head_chunk_tokens`` chosen
  automatically) over the unchunked loss, at V = 262,144 (Gemma's vocabulary) and
  B·T = 4,096, each measured as the rise of a fresh process's peak RSS (VmHWM).
* ``chunked_over_full_step``: median time of a full training step with the chunked loss
  over the unchunked one on the model (SmolLM2: V = 49,152), chunks of the size automatic
  chunking would pick for that vocabulary, same batches, interleaved repeats.

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fusellm.heads import OutputHead, last_hidden, no_logits  # noqa: E402
from fusellm.train.loss import chunked_fusion_loss_sums, fusion_loss_sums  # noqa: E402
from fusellm.train.trainer import CHUNK_LOGIT_BYTES, head_chunk_tokens  # noqa: E402


class AllocCounter(TorchDispatchMode):
    """Total bytes of new tensors created by the ops run under it (forward and backward).

    An output that shares storage with one of its op's inputs (a view, a no-op cast) is
    not an allocation. Addresses are compared per op only: freed memory is reused, so a
    global "seen" set would miss real allocations."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = list(args) + list((kwargs or {}).values())
        ins = {a.untyped_storage().data_ptr() for a in flat if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in ins:
                self.bytes += t.untyped_storage().nbytes()
        return out


def clm_loss(logits, labels):
    return F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
    )


def counted(fn, *inputs: torch.Tensor) -> int:
    with AllocCounter() as c:
        fn(*inputs)
    return c.bytes


def memory_table(B: int, T: int, vocabs: list[int], ks: list[int]) -> dict:
    """Bytes the fusion loss allocates beyond the plain CLM loss, forward + backward."""
    out = {}
    for V in vocabs:
        labels = torch.randint(0, V, (B, T))

        def clm(lg, labels=labels):
            clm_loss(lg, labels).backward()

        base = counted(clm, torch.randn(B, T, V, requires_grad=True))
        for k in ks:
            ids = torch.randint(0, V, (B, T, k))
            lps = torch.log_softmax(torch.randn(B, T, k), -1)
            mask = torch.ones(B, T, dtype=torch.bool)

            def fused(lg, labels=labels, ids=ids, lps=lps, mask=mask):
                fusion_loss_sums(lg, labels, ids, lps, mask, 0.9).total.backward()

            extra = counted(fused, torch.randn(B, T, V, requires_grad=True)) - base
            out[f"V{V}_k{k}"] = extra
    return out


LOSS_PEAK = """
import sys, torch
sys.path.insert(0, {root!r})
from fusellm.heads import OutputHead
from fusellm.train.loss import chunked_fusion_loss_sums, fusion_loss_sums
from fusellm.train.trainer import head_chunk_tokens
torch.manual_seed(0)
V, BT, H, k, chunked = {V}, {BT}, {H}, 10, {chunked}
head = OutputHead(torch.nn.Linear(H, V, bias=False))
hidden = torch.randn(1, BT, H, requires_grad=True)
labels = torch.randint(0, V, (1, BT))
ids = torch.randint(0, V, (1, BT, k))
lps = torch.log_softmax(torch.randn(1, BT, k), -1)
mask = torch.ones(1, BT, dtype=torch.bool)
def rss(key):
    return int([x for x in open("/proc/self/status") if x.startswith(key)][0].split()[1]) * 1024
before = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
if chunked:
    s = chunked_fusion_loss_sums(hidden, head, labels, ids, lps, mask, head_chunk_tokens(-1, V))
else:
    s = fusion_loss_sums(head(hidden), labels, ids, lps, mask)
s.total.backward()
print(rss("VmHWM:") - before)
"""


def loss_peak_bytes(V: int, BT: int, H: int, chunked: bool) -> int:
    """Rise of a fresh process's peak RSS over one forward + backward of the loss (with
    its output head), from inputs already in memory."""
    code = LOSS_PEAK.format(root=str(ROOT), V=V, BT=BT, H=H, chunked=chunked)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=32000,
                hidden_size=256,
                intermediate_size=512,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=4,
            )
        )
        name = "tiny-llama-32k"
    else:
        from fusellm.models import load_model
        from fusellm.recipe import load_recipe

        r = load_recipe(ROOT / "recipes" / "quickstart.yaml")
        model = load_model(r.models[r.target], r.target)
        name = r.target
    model.train()
    V = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    B, T, k = args.batch, args.block, args.top_k
    batches = []
    for _ in range(2):
        ids = torch.randint(0, V, (B, T), generator=g)
        labels = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], 1)
        f_ids = torch.randint(0, V, (B, T, k), generator=g)
        f_lps = torch.log_softmax(torch.randn(B, T, k, generator=g), -1)
        batches.append((ids, labels, f_ids, f_lps, torch.ones(B, T, dtype=torch.bool)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    head = OutputHead.of(model)
    # the chunk that automatic chunking picks for this vocabulary, were it chunked
    chunk = max(128, CHUNK_LOGIT_BYTES // (4 * V))

    def step(kind: str) -> None:
        for ids, labels, f_ids, f_lps, mask in batches:
            n = (labels != -100).sum()
            if kind == "chunked":
                out = model(input_ids=ids, logits_to_keep=no_logits(ids), output_hidden_states=True)
                s = chunked_fusion_loss_sums(
                    last_hidden(out), head, labels, f_ids, f_lps, mask, chunk, lm_weight=0.9
                )
                loss = s.total / n
            elif kind == "fusion":
                logits = model(input_ids=ids).logits
                loss = fusion_loss_sums(logits, labels, f_ids, f_lps, mask, 0.9).total / n
            else:
                loss = clm_loss(model(input_ids=ids).logits, labels) / n
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    kinds = ("clm", "fusion", "chunked")
    for kind in kinds:  # warm-up
        step(kind)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.repeats):
        for kind in kinds:
            t = time.perf_counter()
            step(kind)
            times[kind].append(time.perf_counter() - t)
    clm_s, fus_s, chunk_s = (statistics.median(times[kind]) for kind in kinds)
    mem = memory_table(2, 128, [32000, 128000], [1, 10, 100])
    big_v, big_bt, big_h = 262_144, 4_096, 256
    peak_full = loss_peak_bytes(big_v, big_bt, big_h, chunked=False)
    peak_chunked = loss_peak_bytes(big_v, big_bt, big_h, chunked=True)
    print(
        json.dumps(
            {
                "model": name,
                "vocab_size": V,
                "batch": B,
                "block": T,
                "top_k": k,
                "repeats": args.repeats,
                "clm_step_s": round(clm_s / len(batches), 4),
                "fusion_step_s": round(fus_s / len(batches), 4),
                "fusion_over_clm_step": round(fus_s / clm_s, 4),
                "chunk_tokens": chunk,
                "chunked_step_s": round(chunk_s / len(batches), 4),
                "chunked_over_full_step": round(chunk_s / fus_s, 4),
                "loss_peak_bytes": {
                    "vocab": big_v,
                    "positions": big_bt,
                    "hidden": big_h,
                    "chunk_tokens": head_chunk_tokens(-1, big_v),
                    "full": peak_full,
                    "chunked": peak_chunked,
                },
                "chunked_over_full_loss_peak": round(peak_chunked / peak_full, 4),
                "fusion_extra_bytes": mem,
                # what k costs: the same at both vocabulary sizes (grows with k, not V)
                "fusion_bytes_k1_to_k100": {
                    f"V{v}": mem[f"V{v}_k100"] - mem[f"V{v}_k1"] for v in (32000, 128000)
                },
                "fusion_extra_bytes_per_token_k10": {
                    f"V{v}": mem[f"V{v}_k10"] / (2 * 128) for v in (32000, 128000)
                },
            }
        )
    )


if __name__ == "__main__":
    main()

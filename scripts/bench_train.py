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

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fusellm.train.loss import fusion_loss_sums  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--block", type=int, default=256)
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

    def step(fusion: bool) -> None:
        for ids, labels, f_ids, f_lps, mask in batches:
            logits = model(input_ids=ids).logits
            n = (labels != -100).sum()
            if fusion:
                loss = fusion_loss_sums(logits, labels, f_ids, f_lps, mask, 0.9).total / n
            else:
                loss = clm_loss(logits, labels) / n
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    step(True)  # warm-up
    step(False)
    t_f, t_c = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        step(False)
        t_c.append(time.perf_counter() - t)
        t = time.perf_counter()
        step(True)
        t_f.append(time.perf_counter() - t)
    clm_s, fus_s = statistics.median(t_c), statistics.median(t_f)
    mem = memory_table(2, 128, [32000, 128000], [1, 10, 100])
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

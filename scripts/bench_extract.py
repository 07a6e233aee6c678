"""Benchmark extraction against a bare forward pass, storage size, and peak memory.

    python scripts/bench_extract.py                     # SmolLM2 from the demo packages
    python scripts/bench_extract.py --model gemma3      # Gemma-3 (262k vocabulary)
    python scripts/bench_extract.py --tiny              # a random model, seconds (CI smoke)

Measures, on the same documents and the same length-bucketed batches:

* ``extract_over_forward``: time of the whole per-shard extraction work (tokenize, run
  the model, top-k + CE, serialise, write the shard) over the time of a bare
  ``model(input_ids, attention_mask)`` forward pass; medians of interleaved repeats.
* ``bytes_per_token`` on disk at the chosen k, against the reference FuseLLM layout
  (fp16 values + int64 ids per top-k entry, for every position of sequences padded to
  ``--ref-block`` tokens): ``reference_over_ours``.
* peak RSS of the real ``fusellm extract`` command on a corpus and on a corpus 4× larger
  (``peak_rss_ratio`` ≈ 1 means memory does not grow with the corpus).

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fusellm.batching import pad_batch, plan_batches  # noqa: E402
from fusellm.extract.config import ExtractConfig  # noqa: E402
from fusellm.extract.core import TopKScorer  # noqa: E402
from fusellm.extract.runner import extract_shard  # noqa: E402
from fusellm.shards import encode_shard  # noqa: E402


def demo_texts(n: int) -> list[str]:
    from fusellm.corpus.builtin import read_builtin

    out = []
    for name in ("lambada", "boolq", "sciq"):
        for i, d in enumerate(read_builtin(name)):
            if i >= n // 3 + 1:
                break
            out.append(d.text[:1500])
    return out[:n]


def tiny_model_dir(root: Path, vocab: int = 32000) -> Path:
    """A random Llama with a real-size vocabulary and a byte-level BPE trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = root / f"tiny-{vocab}"
    if d.exists():
        return d
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = [f"w{i} x{i % 97} y{i % 13}" for i in range(5000)]
    tok.train_from_iterator(
        words, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<pad>", "<s>", "</s>"])
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    LlamaForCausalLM(cfg).save_pretrained(d)
    fast.save_pretrained(d)
    return d


def time_it(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def peak_rss(recipe: Path, run_dir: Path, n_docs: int) -> tuple[float, float]:
    """Peak RSS (MB) of a real `fusellm run --stages corpus,extract` in a child process,
    and the MB of shards it wrote."""
    # VmHWM, not getrusage's ru_maxrss: the latter survives fork + exec, so the child would
    # report this (model-holding) parent's RSS at the fork instead of its own peak.
    code = (
        "import sys\n"
        "from fusellm.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "hwm = [x for x in open('/proc/self/status') if x.startswith('VmHWM:')][0]\n"
        "print('PEAK', int(hwm.split()[1]) / 1024)\n"
        "sys.exit(rc)\n"
    )
    args = [
        "-q",
        "run",
        "--stages",
        "corpus,extract",
        str(recipe),
        f"run_dir={run_dir}",
        f"corpus.inputs.0.max_docs={n_docs}",
    ]
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    peak = float([x for x in r.stdout.splitlines() if x.startswith("PEAK")][-1].split()[1])
    man = json.loads((run_dir / "extract" / "m" / "manifest.json").read_text())
    return peak, man["stats"]["bytes"] / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2", help="a model of recipes/quickstart.yaml")
    ap.add_argument("--tiny", action="store_true", help="random 32k-vocab Llama instead (fast)")
    ap.add_argument("--docs", type=int, default=48)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--ref-block", type=int, default=2048, help="sequence length the reference pads to"
    )
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()

    from fusellm.models import load_model, load_tokenizer
    from fusellm.recipe import ModelSpec, load_recipe

    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    if args.tiny:
        spec = ModelSpec(path=str(tiny_model_dir(work)))
        texts = [
            " ".join(f"w{(i * 7 + j) % 5000}" for j in range(40 + (i * 37) % 200))
            for i in range(args.docs)
        ]
    else:
        spec = load_recipe(ROOT / "recipes" / "quickstart.yaml").models[args.model]
        texts = demo_texts(args.docs)
    name = "tiny" if args.tiny else args.model
    tok = load_tokenizer(spec, name)
    model = load_model(spec, name)
    cfg = ExtractConfig(top_k=args.top_k)
    scorer = TopKScorer(model, cfg.top_k, cfg.head_chunk_tokens)
    docs = [(f"d{i}", t) for i, t in enumerate(texts)]
    seqs = tok(texts)["input_ids"]
    batches = [
        pad_batch([seqs[i] for i in b], tok.pad_token_id or 0)
        for b in plan_batches([len(s) for s in seqs], cfg.batch_tokens, cfg.max_batch_size)
    ]
    n_tokens = sum(map(len, seqs))

    @torch.inference_mode()
    def forward():
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask)

    out_file = work / "shard.safetensors"
    size = {}

    def extract():
        dists = extract_shard(scorer, tok, docs, cfg, None, name)
        data = encode_shard(dists, scorer.vocab_size, {"model": name})
        out_file.write_bytes(data)
        size["bytes"] = len(data)

    forward()  # warm-up (allocator, kernels)
    extract()
    t_fwd, t_ext = [], []
    for _ in range(args.repeats):
        t_fwd.append(time_it(forward))
        t_ext.append(time_it(extract))
    fwd, ext = statistics.median(t_fwd), statistics.median(t_ext)
    bpt = size["bytes"] / n_tokens
    k = args.top_k
    ref_bytes = len(texts) * args.ref_block * k * (2 + 8)  # fp16 value + int64 id, padded positions
    result = {
        "model": name,
        "vocab_size": scorer.vocab_size,
        "head": "chunked" if scorer.split_head else "full",
        "docs": len(texts),
        "tokens": n_tokens,
        "top_k": k,
        "forward_s": round(fwd, 4),
        "extract_s": round(ext, 4),
        "extract_over_forward": round(ext / fwd, 4),
        "extract_tokens_per_s": round(n_tokens / ext, 1),
        "bytes_per_token": round(bpt, 2),
        "reference_bytes_per_token_padded": round(ref_bytes / n_tokens, 1),
        "reference_bytes_per_position": k * 10,
        "reference_over_ours": round(ref_bytes / size["bytes"], 1),
        "repeats": args.repeats,
    }
    if not args.skip_memory:
        # Memory: the real CLI over a corpus and one 4x larger (random tiny model: fast).
        mdir = tiny_model_dir(work)
        data = work / "corpus.jsonl"
        with open(data, "w") as f:
            for i in range(2000):
                f.write(
                    json.dumps(
                        {"text": " ".join(f"w{(i * 11 + j) % 5000}" for j in range(60 + i % 150))}
                    )
                    + "\n"
                )
        recipe = work / "mem.yaml"
        recipe.write_text(
            f"name: mem\nrun_dir: {work}/mem\nmodels: {{m: {{path: {mdir}}}}}\ntarget: m\nsources: [m]\n"
            f"tracking: {{backend: none}}\ncorpus: {{inputs: [{{path: {data}, max_docs: 1}}], block_size: 512, "
            f"valid_fraction: 0.0, test_fraction: 0.0}}\nextract: {{top_k: 64, docs_per_shard: 64}}\n"
        )
        # k = 64 makes the output large enough (~270 B/token) that holding it in RAM
        # would show in the peak: compare the peak difference with output_mb.
        small, out_small = peak_rss(recipe, work / "mem_small", 400)
        large, out_large = peak_rss(recipe, work / "mem_large", 1600)
        result.update(
            {
                "memory_top_k": 64,
                "peak_rss_mb_400_docs": round(small, 1),
                "peak_rss_mb_1600_docs": round(large, 1),
                "peak_rss_ratio": round(large / small, 3),
                "output_mb_400_docs": round(out_small, 1),
                "output_mb_1600_docs": round(out_large, 1),
            }
        )
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()

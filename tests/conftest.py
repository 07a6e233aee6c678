"""Shared fixtures: tokenizers of different kinds trained here, tiny random models of
different architectures, and a tiny recipe. No network, no downloaded weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Knowledge fusion combines the distributions of several language models.",
    "def add(a, b):\n    return a + b\n",
    "In 1843, Ada Lovelace wrote the first published algorithm.",
    "Tokyo 東京 and Kyoto 京都 are cities in Japan; emoji 😀🚀 appear too.",
    "Tabs\tand  double  spaces   and\n\nnew paragraphs matter.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    'She said: "I don\'t know!" — and left the room at 3:45 pm.',
] * 20

ADVERSARIAL = [
    "",
    "a",
    "😀",
    "👩‍👩‍👧‍👦 family emoji and 🇯🇵 flag",
    "日本語のテキストと中文文本",
    "tabs\t\t\tand    spaces\n\n\n\nand blank lines",
    "    leading spaces and trailing    ",
    "for (int i = 0; i < n; ++i) { x[i] = y[i] * 2; }",
    "\x00\x01 control bytes \u200b zero width",
    "ẞ Ω ∑ ∫ ≈ math symbols",
]


def _train_tokenizer(kind: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    corpus = TEXT + ADVERSARIAL
    if kind == "bpe":  # GPT-2 style byte-level BPE (Ġ)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    elif kind == "unigram":  # SentencePiece style (▁) with byte fallback
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>"
        )
    elif kind == "wordpiece":  # BERT style (##)
        tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    else:
        raise ValueError(kind)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def _llama2_style_tokenizer(vocab_size: int = 400, eos: bool = False):
    """A Llama-2-style tokenizer trained here: SentencePiece-style BPE with a dummy-prefix
    ``▁``, byte fallback whose ``<0x00>``..``<0xFF>`` ids (3-258) come *before* the normal
    pieces (so ``<0x2E>`` has a smaller id than ``.``), optionally appending EOS."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer(models.BPE())
    base.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    base.train_from_iterator(TEXT + ADVERSARIAL, trainers.BpeTrainer(vocab_size=vocab_size))
    trained = json.loads(base.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    vocab = {t: i for i, t in enumerate(specials)}
    for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = base.normalizer
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tail = " </s>" if eos else ""
    tok.post_processor = processors.TemplateProcessing(
        single=f"<s> $A{tail}", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _eos_bpe_tokenizer(vocab_size: int = 300):
    """Byte-level BPE that appends EOS to every text (and has an added non-special ``ö``)."""
    from tokenizers import processors

    tok = _train_tokenizer("bpe", vocab_size)
    tok.add_tokens(["ö", "naïve"])
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.convert_tokens_to_ids("</s>"))]
    )
    return tok


@pytest.fixture(scope="session")
def extra_toks() -> dict:
    """Tokenizers of the kinds the tiny models do not cover."""
    return {
        "llama2": _llama2_style_tokenizer(),
        "llama2_eos": _llama2_style_tokenizer(eos=True),
        "bpe_eos": _eos_bpe_tokenizer(),
    }


def _tiny_model(arch: str, vocab_size: int):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, MptConfig

    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        cfg = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **common,
        )
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=512,
            **common,
        )
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=512, **common)
    elif arch == "mpt":
        cfg = MptConfig(
            d_model=32, n_layers=2, n_heads=2, max_seq_len=512, expansion_ratio=2, **common
        )
    else:
        raise ValueError(arch)
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(sum(map(ord, arch)))  # deterministic across processes
    return AutoModelForCausalLM.from_config(cfg)


# name -> (architecture, tokenizer kind, tokenizer vocab, padded model vocab)
TINY = {
    "llama_bpe": ("llama", "bpe", 300, 320),
    "neox_unigram": ("gpt_neox", "unigram", 250, 256),
    "gpt2_wordpiece": ("gpt2", "wordpiece", 200, 200),
    "mpt_bpe": ("mpt", "bpe", 280, 320),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Local HF directories of tiny random models of four families and three tokenizer kinds."""
    root = tmp_path_factory.mktemp("tiny_models")
    out = {}
    for name, (arch, kind, tv, mv) in TINY.items():
        d = root / name
        tok = _train_tokenizer(kind, tv)
        model = _tiny_model(arch, mv)
        model.save_pretrained(d)
        tok.save_pretrained(d)
        out[name] = d
    return out


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("FUSELLM_CACHE", str(d))
    return d


def shas(files: dict[str, dict]) -> dict[str, str]:
    """A manifest's ``files`` as path → sha256 (sizes/mtimes left out: a recomputed file
    has a new mtime)."""
    return {k: v["sha256"] for k, v in files.items()}


def write_recipe(path: Path, body: str) -> Path:
    path.write_text(body, encoding="utf-8")
    return path


@pytest.fixture()
def tiny_recipe(tmp_path, tiny_models) -> Path:
    """A recipe over two tiny models with a jsonl corpus; tracking offline."""
    data = tmp_path / "data.jsonl"
    import json

    with open(data, "w", encoding="utf-8") as f:
        for i, t in enumerate(TEXT[:40] + [a for a in ADVERSARIAL if a.strip()]):
            f.write(json.dumps({"id": f"d{i}", "text": t * 3}) + "\n")
    body = f"""
name: tiny
run_dir: {tmp_path / "run"}
models:
  llama: {{path: {tiny_models["llama_bpe"]}}}
  neox: {{path: {tiny_models["neox_unigram"]}}}
target: llama
sources: [llama, neox]
tracking: {{mode: offline}}
corpus:
  inputs:
    - {{path: {data}, id_field: id, domain: mixed}}
  valid_fraction: 0.2
  test_fraction: 0.2
  block_size: 32
"""
    return write_recipe(tmp_path / "tiny.yaml", body)


@pytest.fixture()
def ext_recipe(tmp_path, tiny_models) -> Path:
    """Four tiny models of different families over a small corpus, extract configured."""
    import json

    data = tmp_path / "data.jsonl"
    docs = [t * (1 + i % 3) for i, t in enumerate(TEXT[:40])] + [
        a for a in ADVERSARIAL if a.strip()
    ]
    with open(data, "w", encoding="utf-8") as f:
        for i, t in enumerate(docs):
            f.write(json.dumps({"id": f"d{i}", "text": t}) + "\n")
    models = "\n".join(f"  {n}: {{path: {p}}}" for n, p in tiny_models.items())
    body = f"""
name: ext
run_dir: {tmp_path / "run"}
models:
{models}
target: llama_bpe
sources: [llama_bpe, neox_unigram, gpt2_wordpiece, mpt_bpe]
tracking: {{backend: none}}
corpus:
  inputs: [{{path: {data}, id_field: id}}]
  valid_fraction: 0.1
  test_fraction: 0.1
  block_size: 48
extract:
  top_k: 10
  docs_per_shard: 4
  batch_tokens: 128
  max_batch_size: 4
  head_chunk_tokens: 50
"""
    return write_recipe(tmp_path / "ext.yaml", body)


def free_port() -> int:
    """A free TCP port on the loopback interface (for torchrun's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face hub cache for this test (offline: the hub is never asked)."""
    from huggingface_hub import constants

    d = tmp_path / "hf-cache"
    d.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(d))
    # huggingface_hub and transformers read the cache folder from this constant at call time.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(d))
    return d


def hub_snapshot(cache: Path, repo_id: str, commit: str, src: Path, refs: tuple = ()) -> Path:
    """Lay ``src``'s files out in the hub cache as huggingface_hub stores a download of
    ``repo_id`` at ``commit``: blobs named by content hash, the commit's snapshot folder of
    symlinks to them, and ``refs/<ref>`` files (branches, tags) naming the commit."""
    import hashlib

    from huggingface_hub.file_download import repo_folder_name

    root = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    for ref in refs:
        move_ref(cache, repo_id, ref, commit)
    return snap


def move_ref(cache: Path, repo_id: str, ref: str, commit: str) -> None:
    """Point branch or tag ``ref`` of ``repo_id`` in the hub cache at ``commit``."""
    from huggingface_hub.file_download import repo_folder_name

    f = cache / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / ref
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(commit)


def torchrun(*args: str, env: dict | None = None, timeout: float = 600):
    """``python -m torch.distributed.run --nproc_per_node 2`` with ``args`` (a script, or
    ``-m module``, and its arguments) on a free port, one thread per process (both
    processes share the CI's 2 cores, and one-process references use the same kernels);
    output captured."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(free_port()), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)

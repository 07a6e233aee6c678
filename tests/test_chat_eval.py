"""Chat tasks in the bench: the question in the model's own chat template, a greedy reply
equal to the model's own generation one prompt at a time, exact match of the final
number, and a model without a chat template named."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
import torch

from fusellm.bench.chat import final_number, load_chat_task, prompt_ids, score_chat_task
from fusellm.bench.score import LogProbModel
from fusellm.cli import main
from fusellm.distributed import Rank

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize(
    "text, number",
    [
        ("She makes 9 * 2 = $18 a day.\n#### 18", "18"),
        ("#### 1,234.", "1234"),
        ("So the answer is $-3.50.", "-3.50"),
        ("The answer is: 7 apples, not 8", "7"),
        ("first 3 then 4 then 12", "12"),
        ("#### 5 ... later 6", "5"),
        ("no number here", None),
    ],
)
def test_the_final_number_of_a_reply(text, number):
    got = final_number(text)
    assert (got is None) if number is None else got == Decimal(number)


@pytest.fixture()
def chat_llama(tiny_models, tmp_path):
    """The tiny Llama with a chat template in its tokenizer files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_models["llama_bpe"]
    tok = AutoTokenizer.from_pretrained(src)
    tok.chat_template = TEMPLATE
    d = tmp_path / "chat_llama"
    tok.save_pretrained(d)
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(d)
    return d


def test_replies_are_the_model_s_own_greedy_generation_and_scored_by_their_number(chat_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_llama)
    model = AutoModelForCausalLM.from_pretrained(chat_llama).eval()
    task = load_chat_task("chat:gsm8k", 5, 0, None)
    assert len(task.items) == 5 and task.kind == "chat" and task.available == 1319
    lpm = LogProbModel([model], ["llama"])
    # a token budget that puts prompts of different lengths in one left-padded batch
    rec = score_chat_task(lpm, tok, task, 12, 4096, Rank(0, 1, 0), "llama")
    for it, out in zip(task.items, rec["output"], strict=True):
        ids = prompt_ids(tok, it.requests[0][0], "test")
        assert tok.decode(ids).endswith("<|assistant|>")
        with torch.no_grad():
            one = model.generate(
                torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0
            )[0, len(ids) :].tolist()
        eos = tok.eos_token_id
        one = one[: one.index(eos)] if eos in one else one
        assert out == tok.decode(one, skip_special_tokens=True)
    # scoring: a reply is right when its final number is the answer's
    assert any(a is not None for a in rec["answer"])  # numbers to score (digits in its vocab)
    for it, a in zip(task.items, rec["answer"], strict=True):
        it.requests = [(it.requests[0][0], "#### " + (a if a is not None else "0.5"))]
    again = score_chat_task(lpm, tok, task, 12, 4096, Rank(0, 1, 0), "llama")
    assert again["output"] == rec["output"]
    assert again["greedy"] == [a is not None for a in rec["answer"]]


def _bench(tiny_recipe, model_dir):
    text = tiny_recipe.read_text().replace(
        "target: llama", f"  chatty: {{path: {model_dir}}}\ntarget: llama"
    )
    text += "bench: {models: [chatty], tasks: [chat:gsm8k], limit: 3, chat: {max_new_tokens: 6}}\n"
    tiny_recipe.write_text(text)
    return main(["run", str(tiny_recipe), "--stages", "corpus,bench"])


def test_bench_reports_chat_accuracy_and_reuses_its_cache(chat_llama, tiny_recipe, tmp_path):
    assert _bench(tiny_recipe, chat_llama) == 0
    res = json.loads((tmp_path / "run" / "bench" / "results.json").read_text())
    rows = [r for r in res["rows"] if r["task"] == "chat:gsm8k"]
    assert [(r["metric"], r["n"]) for r in rows] == [("em", 3)]
    (cache,) = (tmp_path / "run" / "bench" / "cache").glob("chatty-*/chat_gsm8k.json")
    scores = json.loads(cache.read_text())["scores"]
    assert len(scores["output"]) == 3 and rows[0]["value"] == sum(scores["greedy"]) / 3
    # a longer reply is another score: not served from the cache
    before = cache.stat().st_mtime_ns
    assert main(["bench", str(tiny_recipe), "bench.chat.max_new_tokens=7"]) == 0
    assert cache.stat().st_mtime_ns != before


def test_a_model_without_a_chat_template_is_named(tiny_models, tiny_recipe, tmp_path, capsys):
    assert _bench(tiny_recipe, tiny_models["llama_bpe"]) != 0
    err = capsys.readouterr().err
    assert "bench chatty chat:gsm8k: the tokenizer has no chat template" in err


def test_a_recipe_template_serves_a_model_without_one_and_keys_its_cache(
    tiny_models, tiny_recipe, tmp_path
):
    tpl = tmp_path / "turns.jinja"
    tpl.write_text(TEMPLATE)
    model = f"{tiny_models['llama_bpe']}, chat_template: {tpl}"
    assert _bench(tiny_recipe, model) == 0
    (cache,) = (tmp_path / "run" / "bench" / "cache").glob("chatty-*/chat_gsm8k.json")
    key = json.loads(cache.read_text())["key"]
    tpl.write_text(TEMPLATE.replace("<|assistant|>", "<|bot|>"))  # another template: rescored
    assert main(["bench", str(tiny_recipe)]) == 0
    assert json.loads(cache.read_text())["key"] != key
    tpl.unlink()
    assert main(["bench", str(tiny_recipe)]) != 0  # named below by the CLI


def test_a_missing_template_file_names_the_model(tiny_models, tiny_recipe, tmp_path, capsys):
    model = f"{tiny_models['llama_bpe']}, chat_template: {tmp_path / 'none.jinja'}"
    assert _bench(tiny_recipe, model) != 0
    assert "models.chatty.chat_template" in capsys.readouterr().err

"""`llmlab eval tasks`: Wilson intervals against scipy, batched chat answers equal to one-at-a-time answers,
and a tiny model taught a few lookups scoring them all (library and CLI, JSON and PNG)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_one_line_error, run_cli
from llmlab.data.chat_data import SFTExample, encode_sft
from llmlab.data.tasks import TaskExample, make_split, prompt_record
from llmlab.evals.tasks import complete_chats, evaluate_tasks, load_chat_model, wilson_interval
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import Tokenizer
from llmlab.tokenizer.chat import LLMLAB_CHAT_TOKENS
from llmlab.tokenizer.identity import fingerprint, write_tokenizer_id

TEXT = "a=1 b=2 c=3. What is a? Sort 3 1 2 and reverse the word abc. How many r's are in rr? 4 5 6 7 8 9 0 "


def chat_tokenizer(chat: bool = True) -> Tokenizer:
    specials = ["<|eos|>", *LLMLAB_CHAT_TOKENS] if chat else ["<|eos|>"]
    return Tokenizer.train([TEXT * 3], vocab_size=256 + 20 + len(specials), special_tokens=specials,
                           progress=False, workers=1)


def save_checkpoint(model, tok, path):
    model.save(path)
    tok.save(path / "tokenizer")
    write_tokenizer_id(path, fingerprint(tok))
    return path


def teach(model, tok, examples: list[TaskExample], steps: int = 200) -> None:
    """Full-batch masked next-token training on the examples' chats (the SFT loss, written out here)."""
    rows = [encode_sft(tok, SFTExample(e.messages())) for e in examples]
    width = max(len(ids) for ids, _ in rows)
    x = torch.zeros(len(rows), width - 1, dtype=torch.long)
    y = torch.full((len(rows), width - 1), -100)
    for i, (ids, mask) in enumerate(rows):
        x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, :len(ids) - 1] = torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:], strict=True)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """A tiny model that has memorised eight lookups, saved as a checkpoint with its tokenizer."""
    torch.manual_seed(0)
    tok = chat_tokenizer()
    model = Transformer(ModelConfig.preset("gpt2", "tiny", vocab_size=tok.vocab_size, block_size=64))
    examples = make_split("lookup", "test", 8, difficulty=2)
    teach(model, tok, examples)
    path = save_checkpoint(model, tok, tmp_path_factory.mktemp("ckpt") / "taught")
    return path, examples


@pytest.mark.parametrize("correct,n", [(0, 10), (8, 10), (10, 10), (37, 120), (1, 1)])
def test_wilson_interval_matches_scipy(correct, n):
    from scipy.stats import binomtest

    ref = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(correct, n) == pytest.approx((ref.low, ref.high), abs=1e-9)


def test_wilson_interval_by_hand():
    lo, hi = wilson_interval(8, 10)  # p = 0.8, z = 1.96: centre 0.7167, half-width 0.2266
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_batched_answers_equal_single_answers():
    torch.manual_seed(1)
    tok = chat_tokenizer()
    model = Transformer(ModelConfig.preset("gpt2", "tiny", vocab_size=tok.vocab_size, block_size=64)).eval()
    chats = [e.prompt_messages() for e in make_split("sort", "test", 5, difficulty=3)]
    batched = complete_chats(model, tok, chats, max_new_tokens=6, batch_size=5)
    single = [complete_chats(model, tok, [c], max_new_tokens=6)[0] for c in chats]
    assert batched == single
    sampled = complete_chats(model, tok, chats, 6, temperature=1.0, seed=3, batch_size=2)
    assert sampled == complete_chats(model, tok, chats, 6, temperature=1.0, seed=3, batch_size=2)


def test_taught_model_scores_what_it_learned(taught):
    path, examples = taught
    model, tok, note = load_chat_model(path)
    assert note == ""
    result = evaluate_tasks(model, tok, examples)
    assert result["tasks"]["lookup"]["correct"] == 8 and result["overall"]["accuracy"] == 1.0
    assert result["tasks"]["lookup"]["ci95"] == pytest.approx(list(wilson_interval(8, 8)))
    assert all(s["correct"] and s["response"] == s["answer"] for s in result["samples"])
    assert len(result["samples"]) == 3  # the first few per task


def test_counts_and_intervals_per_task(taught):
    """Prompts it never saw (another task) are graded wrong, and counted apart."""
    path, examples = taught
    model, tok, _ = load_chat_model(path)
    other = make_split("reverse", "test", 4, difficulty=3)
    result = evaluate_tasks(model, tok, examples[:5] + other)
    assert result["tasks"]["lookup"]["n"] == 5 and result["tasks"]["reverse"]["n"] == 4
    assert result["tasks"]["reverse"]["correct"] == 0
    assert result["overall"] == {"n": 9, "correct": 5, "accuracy": 5 / 9, "ci95": list(wilson_interval(5, 9))}


def test_eval_tasks_cli_json_and_chart(taught, tmp_path, capsys):
    path, examples = taught
    prompts = tmp_path / "test_prompts.jsonl"
    prompts.write_text("".join(json.dumps(prompt_record(e)) + "\n" for e in examples))
    code, out, err = run_cli(capsys, "eval", "tasks", path, "--prompts", prompts, "--out",
                             tmp_path / "r.json")
    assert code == 0, err
    printed = json.loads(out)
    assert printed == json.loads((tmp_path / "r.json").read_text())
    assert printed["results"][0]["tasks"]["lookup"]["accuracy"] == 1.0
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_base_model_without_chat_tokens_is_asked_all_the_same(tmp_path, capsys):
    torch.manual_seed(2)
    tok = chat_tokenizer(chat=False)
    model = Transformer(ModelConfig.preset("gpt2", "tiny", vocab_size=tok.vocab_size, block_size=64))
    path = save_checkpoint(model, tok, tmp_path / "base")
    code, out, err = run_cli(capsys, "eval", "tasks", path, "--tasks", "add,sort", "--n", "3")
    assert code == 0, err
    assert "has no chat template" in err
    result = json.loads(out)["results"][0]
    assert {t: r["n"] for t, r in result["tasks"].items()} == {"add": 3, "sort": 3}


def test_eval_tasks_bad_prompt_set(taught, tmp_path, capsys):
    path, _ = taught
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "What is 1 + 1?", "task": "div"}\n')
    code, _, err = run_cli(capsys, "eval", "tasks", path, "--prompts", bad)
    assert_one_line_error(code, err, "p.jsonl:1", "field task")

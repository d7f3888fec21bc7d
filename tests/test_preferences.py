"""Simulated raters and `llmlab data preferences`: labels by hand, the noise rate, ties, determinism, and
output that the preference reader and encoder take."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import assert_one_line_error, run_cli
from llmlab.align.preferences import correct_rater, label_pairs, length_rater, make_preferences
from llmlab.data.chat_data import encode_preference, read_preferences
from llmlab.data.tasks import TaskExample, make_split, prompt_record
from llmlab.errors import ConfigError
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import Tokenizer
from llmlab.tokenizer.chat import LLMLAB_CHAT_TOKENS
from llmlab.tokenizer.identity import fingerprint, write_tokenizer_id

ADD = TaskExample("What is 1 + 1?", "2", "add")


def test_correct_rater_by_hand():
    assert correct_rater(ADD, "2", "3") is True
    assert correct_rater(ADD, "11", " 2 ") is False
    assert correct_rater(ADD, "3", "4") is None and correct_rater(ADD, "2", "2\n") is None


def test_length_rater_by_hand():
    assert length_rater(ADD, "22222", "2") is True      # longer wins, right or wrong
    assert length_rater(ADD, " 2 ", "34") is False      # surrounding whitespace does not count
    assert length_rater(ADD, "ab", "cd") is None


def test_pairs_prefer_correct_and_skip_ties():
    examples = [ADD, ADD, ADD]
    answers = [["3", "2", "2", "5"], ["2", "2"], ["7", "8"]]
    records, stats = label_pairs(examples, answers, "correct", noise=0.0, seed=0)
    assert len(records) == 1 and stats["ties"] == 2 and stats["pairs"] == 1
    rec = records[0]
    assert rec["chosen"] == [{"role": "assistant", "content": "2"}]
    assert rec["rejected"][0]["content"] in ("3", "5")
    assert rec["prompt"] == [{"role": "user", "content": ADD.prompt}]
    assert rec["chosen_correct"] and not rec["rejected_correct"] and not rec["flipped"]
    assert stats["sample_accuracy"] == pytest.approx(4 / 8)


def test_length_rater_pairs_prefer_the_longer():
    records, _ = label_pairs([ADD] * 20, [["2", "22", "222"]] * 20, "length", seed=1)
    assert len(records) == 20
    assert all(len(r["chosen"][0]["content"]) > len(r["rejected"][0]["content"]) for r in records)


def test_noise_flips_labels_at_its_rate():
    n, noise = 4000, 0.2
    records, stats = label_pairs([ADD] * n, [["2", "3"]] * n, "correct", noise=noise, seed=7)
    flipped = sum(r["flipped"] for r in records)
    assert flipped == stats["flipped"]
    assert abs(flipped / n - noise) < 4 * (noise * (1 - noise) / n) ** 0.5  # within 4 standard errors
    assert all(r["chosen_correct"] != r["flipped"] for r in records)
    again, _ = label_pairs([ADD] * n, [["2", "3"]] * n, "correct", noise=noise, seed=7)
    assert again == records


@pytest.mark.parametrize("call,fragment", [
    (lambda: label_pairs([ADD], [["2", "3"]], "loud"), "unknown rater 'loud'"),
    (lambda: label_pairs([ADD], [["2", "3"]], "correct", noise=0.7), "noise=0.7"),
])
def test_bad_settings(call, fragment):
    with pytest.raises(ConfigError, match=fragment):
        call()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    specials = ["<|eos|>", *LLMLAB_CHAT_TOKENS]
    tok = Tokenizer.train(["a=1 b=2. What is a? Sort 3 1 2 and reverse the word abc. 4 5 6 7 8 9 0 " * 3],
                          vocab_size=256 + 20 + len(specials), special_tokens=specials, progress=False,
                          workers=1)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    Transformer(ModelConfig.preset("gpt2", "tiny", vocab_size=tok.vocab_size, block_size=64)).save(path)
    tok.save(path / "tokenizer")
    write_tokenizer_id(path, fingerprint(tok))
    return path


def test_sampled_pairs_read_back_and_encode(checkpoint, tmp_path):
    from llmlab.evals.tasks import load_chat_model

    model, tok, _ = load_chat_model(checkpoint)
    examples = make_split("sort", "train", 6, difficulty=3)
    records, stats = make_preferences(model, tok, examples, rater="length", noise=0.0, samples=3,
                                      max_new_tokens=8, seed=0)
    assert stats["samples"] == 18 and stats["pairs"] == len(records) > 0
    again, _ = make_preferences(model, tok, examples, rater="length", noise=0.0, samples=3, max_new_tokens=8,
                                seed=0)
    assert again == records
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    pairs = read_preferences(path)
    assert [p.extra["task"] for p in pairs] == ["sort"] * len(records)
    prompt_ids, chosen_ids, rejected_ids = encode_preference(tok, pairs[0])
    assert chosen_ids[-1] == rejected_ids[-1] == tok.chat_template.end_of_turn_id
    assert len(tok.decode(chosen_ids[:-1]).strip()) > len(tok.decode(rejected_ids[:-1]).strip())


def test_data_preferences_cli(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(prompt_record(e)) + "\n"
                               for e in make_split("reverse", "train", 5, difficulty=3)))
    out = tmp_path / "prefs.jsonl"
    code, stdout, err = run_cli(capsys, "data", "preferences", checkpoint, "--prompts", prompts, "--out", out,
                                "--rater", "length", "--samples", "3", "--max-new-tokens", "6",
                                "--device", "cpu")
    assert code == 0, err
    assert "pairs from 5 prompts" in stdout
    assert all(p.extra["rater"] == "length" for p in read_preferences(out))
    code, _, err = run_cli(capsys, "data", "preferences", checkpoint, "--prompts", prompts, "--out", out)
    assert_one_line_error(code, err, "--overwrite")

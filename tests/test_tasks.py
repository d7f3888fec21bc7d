"""Verifiable tasks: graders checked by hand, train/test disjoint by construction, deterministic by seed, and
the `llmlab data tasks` files."""

from __future__ import annotations

import json

import pytest

from helpers import assert_one_line_error, run_cli
from llmlab.data.tasks import (
    TASKS,
    TaskExample,
    get_task,
    grade,
    make_split,
    mixture,
    parse_difficulty,
    read_prompt_set,
    solve,
    split_of,
)
from llmlab.errors import ConfigError, DataError

HAND = [  # (task, prompt, answer) worked out by hand
    ("add", "What is 47 + 385?", "432"),
    ("add", "What is 0 + 0?", "0"),
    ("mul", "What is 47 * 38?", "1786"),
    ("mul", "What is 9 * 0?", "0"),
    ("count", "How many r's are in strawberry?", "3"),
    ("count", "How many z's are in banana?", "0"),
    ("reverse", "Reverse the word stressed.", "desserts"),
    ("sort", "Sort 5 2 9 1 2", "1 2 2 5 9"),
    ("lookup", "k=3 a=8 q=1. What is a?", "8"),
    ("lookup", "k=3. What is k?", "3"),
]


@pytest.mark.parametrize("task,prompt,answer", HAND)
def test_graders_by_hand(task, prompt, answer):
    assert solve(task, prompt) == answer
    assert grade(task, prompt, answer)
    assert grade(task, prompt, f"  {answer}\n")          # surrounding whitespace is tolerated
    for wrong in (answer + ".", "0" + answer, answer + " " + answer, f"The answer is {answer}", ""):
        assert not grade(task, prompt, wrong), wrong      # anything else around the answer is not


def test_grade_an_example_uses_its_answer():
    example = TaskExample("What is 1 + 1?", "2", "add")
    assert grade("add", example, "2 ") and not grade("add", example, "3")


@pytest.mark.parametrize("task,prompt", [("add", "What is 1 - 1?"), ("sort", "Sort these"),
                                         ("lookup", "a=1 a=2. What is a?"), ("lookup", "a=1. What is b?"),
                                         ("mul", "What is 47 + 385?"), ("count", "How many r's in rr?")])
def test_a_prompt_of_another_shape_is_refused(task, prompt):
    with pytest.raises(DataError, match=task):
        grade(task, prompt, "1")


@pytest.mark.parametrize("task", TASKS)
def test_generated_examples_are_correct_and_parse_back(task):
    for split in ("train", "test"):
        for e in make_split(task, split, 50, seed=3):
            assert e.task == task and solve(task, e.prompt) == e.answer and grade(task, e.prompt, e.answer)
            assert len(e.answer) <= 12  # answers stay short for a tiny model


@pytest.mark.parametrize("task", TASKS)
def test_train_and_test_are_disjoint_by_construction(task):
    """No seed or difficulty puts a test problem (or a reordered copy of it) into any train set."""
    t = get_task(task)
    train = {t.canonical(t.parse(e.prompt)) for seed in (0, 1) for d in (1, 2, 3)
             for e in make_split(task, "train", 200, difficulty=d, seed=seed)}
    test = [e for seed in (0, 5) for e in make_split(task, "test", 8, difficulty=2, seed=seed)]
    assert all(split_of(t, t.parse(e.prompt)) == "test" for e in test)
    assert not train & {t.canonical(t.parse(e.prompt)) for e in test}


def test_reordered_problems_share_a_split():
    add, sort, lookup = get_task("add"), get_task("sort"), get_task("lookup")
    assert split_of(add, (12, 345)) == split_of(add, (345, 12))
    assert split_of(sort, (3, 1, 2)) == split_of(sort, (2, 3, 1))
    assert split_of(lookup, ((("a", 1), ("b", 2)), "a")) == split_of(lookup, ((("b", 2), ("a", 1)), "a"))


def test_test_split_holds_distinct_problems():
    test = make_split("sort", "test", 100, difficulty=4)
    assert len({e.answer for e in test}) == 100  # the canonical form of a sort problem is its answer


def test_deterministic_by_seed():
    assert make_split("add", "train", 20, seed=1) == make_split("add", "train", 20, seed=1)
    assert make_split("add", "train", 20, seed=1) != make_split("add", "train", 20, seed=2)
    assert mixture(list(TASKS), "test", 5, seed=0) == mixture(list(TASKS), "test", 5, seed=0)


def test_difficulty_knob():
    assert all(len(e.prompt.split()[-1]) == 6 + 1 for e in make_split("reverse", "train", 5, 6))  # "abcdef."
    assert all(len(e.answer.split()) == 7 for e in make_split("sort", "train", 5, 7))
    assert all(e.prompt.count("=") == 5 for e in make_split("lookup", "train", 5, 5))
    assert max(int(e.answer) for e in make_split("add", "train", 200, 1)) <= 18
    assert parse_difficulty("add=3, sort=5") == {"add": 3, "sort": 5}


@pytest.mark.parametrize("call,fragment", [
    (lambda: make_split("div", "train", 1), "unknown task 'div'"),
    (lambda: make_split("add", "val", 1), "split 'val'"),
    (lambda: make_split("add", "train", 1, difficulty=0), "difficulty 0 of task add"),
    (lambda: make_split("mul", "test", 50, difficulty=1), "only"),
    (lambda: parse_difficulty("add:3"), "TASK=INTEGER"),
])
def test_bad_settings(call, fragment):
    with pytest.raises(ConfigError, match=fragment):
        call()


def test_data_tasks_cli_writes_sft_data_and_prompt_sets(tmp_path, capsys):
    from llmlab.data.chat_data import read_sft

    out = tmp_path / "tasks"
    code, stdout, err = run_cli(capsys, "data", "tasks", "--out", out, "--tasks", "add,sort", "--train", "6",
                                "--test", "4", "--difficulty", "add=3")
    assert code == 0, err
    assert "train.jsonl (12)" in stdout
    sft = read_sft(out / "train.jsonl")
    assert len(sft) == 12 and all(len(e.messages) == 2 for e in sft)
    test = read_prompt_set(out / "test_prompts.jsonl")
    assert sorted(e.task for e in test) == ["add"] * 4 + ["sort"] * 4
    assert {e.prompt for e in test}.isdisjoint(m.messages[0]["content"] for m in sft)
    meta = json.loads((out / "tasks.json").read_text())
    assert meta["difficulty"] == {"add": 3, "sort": 4}
    code, _, err = run_cli(capsys, "data", "tasks", "--out", out)
    assert_one_line_error(code, err, "--overwrite")


def test_prompt_set_with_a_wrong_answer_is_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "What is 1 + 1?", "task": "add", "answer": "2"}) + "\n" +
                    json.dumps({"prompt": "What is 1 + 1?", "task": "add", "answer": "3"}) + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl:2: field answer is '3'"):
        read_prompt_set(path)

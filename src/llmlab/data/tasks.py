"""Verifiable tasks: problems a program makes, answers a program checks, sized so a tiny model can learn them.

    from llmlab.data.tasks import TASKS, make_split, grade
    train = make_split("add", "train", 1000, difficulty=2, seed=0)   # list[TaskExample]
    test = make_split("add", "test", 200)
    grade("add", test[0], " 57 ")           # True iff the stripped response is exactly the answer
    grade("add", "What is 12 + 45?", "57")  # a bare prompt is solved by parsing it

    llmlab data tasks --out data/tasks --train 2000 --test 200

Tasks (difficulty knob in brackets, default in the registry):
    add      "What is 47 + 385?" -> "432"                   [digits of each operand]
    mul      "What is 47 * 38?" -> "1786"                   [digits of the first operand; the second has one
                                                              fewer, at least one]
    count    "How many r's are in rrawbxr?" -> "3"          [letters in the word]
    reverse  "Reverse the word qmtz." -> "ztmq"             [letters in the word]
    sort     "Sort 5 2 9 1" -> "1 2 5 9"                    [numbers in the list, digits 0-9]
    lookup   "k=3 a=8 q=1. What is a?" -> "8"               [key=value pairs in the context]

Train and test are disjoint by construction: a problem's split is decided by a hash of its canonical form
(the content that fixes the answer: operands in sorted order for add and mul, the multiset for sort, the
pairs in sorted order for lookup), never by the seed. So no seed, difficulty or sample size can put a test
problem, or a commuted or reordered copy of it, into any train set. The seed only decides which problems of
a split are drawn, deterministically. Test examples are distinct problems, so the n of an accuracy counts
different problems; train examples may repeat where a difficulty has few problems.

Grading strips surrounding whitespace and then compares exactly: "57" and " 57\n" pass, "57." and "057"
do not. Words are random lowercase letters (no word list to ship), which also keeps a model from answering
from memory of real words.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path

from llmlab.data.chat_data import iter_records
from llmlab.errors import ConfigError, DataError
from llmlab.fsutil import atomic_dir

SPLITS = ("train", "test")
TEST_FRACTION = 0.2  # share of all problems (by hash of the canonical form) that belong to the test split


@dataclass(frozen=True)
class TaskExample:
    prompt: str
    answer: str
    task: str

    def messages(self) -> list[dict[str, str]]:
        """The example as a chat: the prompt as a user turn, the answer as the assistant's."""
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.answer}]

    def prompt_messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]


class Task:
    """A problem family: sample a problem, render its prompt, solve it, and parse a prompt back."""

    name: str
    summary: str
    default_difficulty: int
    max_difficulty: int
    pattern: re.Pattern

    def sample(self, rng: random.Random, difficulty: int) -> tuple:
        raise NotImplementedError

    def prompt(self, problem: tuple) -> str:
        raise NotImplementedError

    def answer(self, problem: tuple) -> str:
        raise NotImplementedError

    def canonical(self, problem: tuple) -> str:
        return repr(problem)

    def parse(self, prompt: str) -> tuple | None:
        """The problem a prompt states, or None if it is not this task's prompt."""
        m = self.pattern.fullmatch(prompt.strip())
        return None if m is None else self._from_match(m)

    def _from_match(self, m: re.Match) -> tuple:
        raise NotImplementedError


def _number(rng: random.Random, digits: int) -> int:
    return rng.randrange(10 ** digits)


def _letters(rng: random.Random, n: int, alphabet: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


class Add(Task):
    name, summary, default_difficulty, max_difficulty = "add", "add two numbers", 2, 12
    pattern = re.compile(r"What is (\d+) \+ (\d+)\?")

    def sample(self, rng, difficulty):
        return _number(rng, difficulty), _number(rng, difficulty)

    def prompt(self, problem):
        return f"What is {problem[0]} + {problem[1]}?"

    def answer(self, problem):
        return str(problem[0] + problem[1])

    def canonical(self, problem):
        return "+".join(map(str, sorted(problem)))

    def _from_match(self, m):
        return int(m[1]), int(m[2])


class Multiply(Task):
    name, summary, default_difficulty, max_difficulty = "mul", "multiply two numbers", 2, 8
    pattern = re.compile(r"What is (\d+) \* (\d+)\?")

    def sample(self, rng, difficulty):
        return _number(rng, difficulty), _number(rng, max(1, difficulty - 1))

    def prompt(self, problem):
        return f"What is {problem[0]} * {problem[1]}?"

    def answer(self, problem):
        return str(problem[0] * problem[1])

    def canonical(self, problem):
        return "*".join(map(str, sorted(problem)))

    def _from_match(self, m):
        return int(m[1]), int(m[2])


class CountLetter(Task):
    name, summary, default_difficulty, max_difficulty = "count", "count a letter in a word", 5, 30
    pattern = re.compile(r"How many ([a-z])'s are in ([a-z]+)\?")

    def sample(self, rng, difficulty):
        letter = rng.choice(string.ascii_lowercase)
        count = rng.randint(0, min(3, difficulty))  # answers spread over 0-3, not mostly 0
        others = string.ascii_lowercase.replace(letter, "")
        word = list(_letters(rng, difficulty - count, others))
        for _ in range(count):
            word.insert(rng.randint(0, len(word)), letter)
        return letter, "".join(word)

    def prompt(self, problem):
        return f"How many {problem[0]}'s are in {problem[1]}?"

    def answer(self, problem):
        return str(problem[1].count(problem[0]))

    def _from_match(self, m):
        return m[1], m[2]


class Reverse(Task):
    name, summary, default_difficulty, max_difficulty = "reverse", "reverse a word", 4, 30
    pattern = re.compile(r"Reverse the word ([a-z]+)\.")

    def sample(self, rng, difficulty):
        return (_letters(rng, difficulty),)

    def prompt(self, problem):
        return f"Reverse the word {problem[0]}."

    def answer(self, problem):
        return problem[0][::-1]

    def _from_match(self, m):
        return (m[1],)


class Sort(Task):
    name, summary, default_difficulty, max_difficulty = "sort", "sort a list of digits", 4, 30
    pattern = re.compile(r"Sort (\d(?: \d)*)")

    def sample(self, rng, difficulty):
        return tuple(rng.randrange(10) for _ in range(difficulty))

    def prompt(self, problem):
        return "Sort " + " ".join(map(str, problem))

    def answer(self, problem):
        return " ".join(map(str, sorted(problem)))

    def canonical(self, problem):
        return self.answer(problem)

    def _from_match(self, m):
        return tuple(int(d) for d in m[1].split())


class Lookup(Task):
    name, summary, default_difficulty, max_difficulty = "lookup", "look a key up in a context", 3, 26
    pattern = re.compile(r"((?:[a-z]=\d )*[a-z]=\d)\. What is ([a-z])\?")

    def sample(self, rng, difficulty):
        keys = rng.sample(string.ascii_lowercase, difficulty)
        pairs = tuple((k, rng.randrange(10)) for k in keys)
        return pairs, rng.choice(keys)

    def prompt(self, problem):
        pairs, key = problem
        return " ".join(f"{k}={v}" for k, v in pairs) + f". What is {key}?"

    def answer(self, problem):
        pairs, key = problem
        return str(dict(pairs)[key])

    def canonical(self, problem):
        pairs, key = problem
        return f"{sorted(pairs)}?{key}"

    def _from_match(self, m):
        pairs = tuple((p[0], int(p[2])) for p in m[1].split())
        if len({k for k, _ in pairs}) != len(pairs) or m[2] not in dict(pairs):
            return None  # repeated keys or an absent key: not a problem with one answer
        return pairs, m[2]


TASKS: dict[str, Task] = {t.name: t for t in (Add(), Multiply(), CountLetter(), Reverse(), Sort(), Lookup())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def check_difficulty(task: Task, difficulty: int) -> int:
    if isinstance(difficulty, bool) or not isinstance(difficulty, int) or not (
            1 <= difficulty <= task.max_difficulty):
        raise ConfigError(f"difficulty {difficulty!r} of task {task.name} is out of range; use an integer "
                          f"from 1 to {task.max_difficulty}")
    return difficulty


def split_of(task: Task, problem: tuple) -> str:
    """The split a problem belongs to, from a hash of its canonical form (independent of any seed)."""
    digest = hashlib.sha256(f"{task.name}:{task.canonical(problem)}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2 ** 64 < TEST_FRACTION else "train"


def make_split(task: str, split: str, n: int, difficulty: int | None = None, seed: int = 0
               ) -> list[TaskExample]:
    """n examples of `task` from `split` ("train" or "test"), the same list for the same arguments.

    Test examples are distinct problems; ConfigError if the difficulty has fewer than n of them."""
    t = get_task(task)
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    d = check_difficulty(t, t.default_difficulty if difficulty is None else difficulty)
    rng = random.Random(f"llmlab-tasks:{t.name}:{split}:{d}:{seed}")
    examples, seen = [], set()
    for _ in range(200 * n + 10_000):  # rejection sampling; the bound only trips for tiny problem spaces
        if len(examples) == n:
            break
        problem = t.sample(rng, d)
        if split_of(t, problem) != split:
            continue
        key = t.canonical(problem)
        if split == "test" and key in seen:
            continue
        seen.add(key)
        examples.append(TaskExample(t.prompt(problem), t.answer(problem), t.name))
    if len(examples) < n:
        raise ConfigError(f"task {t.name} at difficulty {d} has only {len(examples)} distinct {split} "
                          f"problems, fewer than the {n} asked for; ask for fewer or raise the difficulty")
    return examples


def solve(task: str, prompt: str) -> str:
    """The correct answer to a prompt of `task`, worked out from the prompt itself."""
    t = get_task(task)
    problem = t.parse(prompt)
    if problem is None:
        raise DataError(f"{prompt!r} is not a prompt of task {task} (expected e.g. "
                        f"{t.prompt(t.sample(random.Random(0), t.default_difficulty))!r}); fix the prompt or "
                        "its task")
    return t.answer(problem)


def grade(task: str, prompt_or_example: str | TaskExample, response: str) -> bool:
    """True iff `response`, stripped of surrounding whitespace, is exactly the answer."""
    if isinstance(prompt_or_example, TaskExample):
        answer = prompt_or_example.answer
    else:
        answer = solve(task, prompt_or_example)
    return response.strip() == answer


def parse_difficulty(spec: str | dict | None) -> dict[str, int]:
    """{"add": 3, ...} from "add=3,sort=5" (or a dict); tasks not named keep their default."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        items = []
        for part in spec.split(","):
            name, eq, value = part.partition("=")
            if not eq or not value.strip().lstrip("-").isdigit():
                raise ConfigError(f"difficulty {part!r} is not TASK=INTEGER; write e.g. add=3,sort=5")
            items.append((name.strip(), int(value)))
    return {name: check_difficulty(get_task(name), value) for name, value in items}


def parse_task_names(spec: str | list[str] | None) -> list[str]:
    """Task names from "add,sort" (or a list); None or "all" means every task."""
    if spec is None or spec == "all":
        return list(TASKS)
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    for name in names:
        get_task(name)
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"tasks {spec!r} must name each task once; choose from {', '.join(TASKS)}")
    return names


def mixture(tasks: list[str], split: str, n_per_task: int, difficulty: dict[str, int] | None = None,
            seed: int = 0) -> list[TaskExample]:
    """n_per_task examples of every task, interleaved in a seeded shuffle."""
    difficulty = difficulty or {}
    examples = [e for t in tasks for e in make_split(t, split, n_per_task, difficulty.get(t), seed)]
    random.Random(f"llmlab-mixture:{split}:{seed}").shuffle(examples)
    return examples


# ----- files: SFT data and prompt sets -----
def prompt_record(example: TaskExample) -> dict:
    """A prompt-set line: TRL's conversational prompt-only format plus the task and the answer."""
    return {"prompt": example.prompt_messages(), "task": example.task, "answer": example.answer}


def write_task_data(out: str | Path, tasks: list[str], n_train: int, n_test: int,
                    difficulty: dict[str, int] | None = None, seed: int = 0) -> dict:
    """Write OUT/train.jsonl (SFT {"messages"}), OUT/train_prompts.jsonl and OUT/test_prompts.jsonl (prompt
    sets) and OUT/tasks.json (settings and counts) into a new directory, all or nothing."""
    difficulty = difficulty or {}
    levels = {t: difficulty.get(t, get_task(t).default_difficulty) for t in tasks}
    train = mixture(tasks, "train", n_train, levels, seed)
    # Prompts for sampling (preferences, RL) come from the train split but another seed than the SFT data.
    train_prompts = mixture(tasks, "train", n_test, levels, seed + 1)
    test = mixture(tasks, "test", n_test, levels, seed)
    meta = {"tasks": tasks, "difficulty": levels, "seed": seed, "train_per_task": n_train,
            "test_per_task": n_test, "test_fraction": TEST_FRACTION,
            "files": {"train.jsonl": len(train), "train_prompts.jsonl": len(train_prompts),
                      "test_prompts.jsonl": len(test)}}
    with atomic_dir(out) as tmp:
        _write_jsonl(tmp / "train.jsonl", ({"messages": e.messages(), "task": e.task} for e in train))
        _write_jsonl(tmp / "train_prompts.jsonl", map(prompt_record, train_prompts))
        _write_jsonl(tmp / "test_prompts.jsonl", map(prompt_record, test))
        (tmp / "tasks.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _write_jsonl(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def read_prompt_set(path: str | Path) -> list[TaskExample]:
    """A prompt set (prompt_record lines: prompt as text or one user message, task, optional answer) as
    TaskExamples; the answer is worked out from the prompt and must match a given one."""
    examples = []
    for where, record in iter_records(path):
        examples.append(_prompt_example(record, where))
    if not examples:
        raise DataError(f"{path} holds no prompts; write one with `llmlab data tasks`")
    return examples


def _prompt_example(record, where: str) -> TaskExample:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with prompt and task, got {type(record).__name__}; "
                        "fix that record")
    for key in ("prompt", "task"):
        if key not in record:
            raise DataError(f"{where}: no field {key} (keys: {', '.join(sorted(record)) or 'none'}); prompt "
                            "sets come from `llmlab data tasks`")
    if record["task"] not in TASKS:
        raise DataError(f"{where}: field task is {record['task']!r}; use one of {', '.join(TASKS)}")
    prompt = record["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], dict) and \
            prompt[0].get("role") == "user":
        prompt = prompt[0].get("content")
    if not isinstance(prompt, str):
        raise DataError(f"{where}: field prompt must be a string or one user message; fix that record")
    try:
        answer = solve(record["task"], prompt)
    except DataError as e:
        raise DataError(f"{where}: field prompt: {e}") from None
    if "answer" in record and str(record["answer"]) != answer:
        raise DataError(f"{where}: field answer is {record['answer']!r} but the prompt's answer is "
                        f"{answer!r}; fix or drop the answer")
    return TaskExample(prompt, answer, record["task"])

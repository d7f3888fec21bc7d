"""The output rule (llmlab.fsutil.check_output) for every verb that writes, and failed writes.

- A non-empty output is refused without --overwrite and left untouched; with --overwrite it is replaced.
- An output equal to, containing or inside an input is refused even with --overwrite (export-hf into the run
  directory of its checkpoint, import-hf into the parent of its source).
- --overwrite writes beside the old output and swaps: a process killed mid-write leaves the old one intact.
- A full disk (RLIMIT_FSIZE: writes past the limit fail with EFBIG) is one line, exit 2, and leaves no
  partial output, for the tokenizer, shards, a checkpoint, a quantized model and an HF export.
"""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llmlab.cli import main
from llmlab.errors import OutputError
from llmlab.fsutil import atomic_dir, check_output, write_failure
from test_bad_inputs import build_world, tree_digest


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("outputs"))


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def someones_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("keep me\n")
    return path


# ---- export-hf / import-hf: the verbs that used to delete a non-empty OUT ----


def test_export_and_import_refuse_a_non_empty_directory(world, tmp_path, capsys):
    taken = someones_dir(tmp_path / "taken")
    before = tree_digest(tmp_path)
    for argv in (["export-hf", world.ckpt, taken], ["import-hf", world.hf, taken]):
        code, err = run(capsys, *argv)
        assert code == 2 and "already exists as a non-empty directory" in err and "--overwrite" in err
        assert err.count("\n") == 1
    assert tree_digest(tmp_path) == before


def test_export_into_its_own_run_directory_is_refused_even_with_overwrite(world, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "exp"
    shutil.copytree(world.ckpt, run_dir / "ckpt-000600")
    before = tree_digest(tmp_path)
    for argv in (
        ["export-hf", run_dir / "ckpt-000600", run_dir],
        ["export-hf", run_dir / "ckpt-000600", run_dir, "--overwrite"],
    ):
        code, err = run(capsys, *argv)
        assert code == 2 and "contains the input" in err
    code, err = run(capsys, "export-hf", run_dir / "ckpt-000600", run_dir / "ckpt-000600" / "hf")
    assert code == 2 and "inside the input" in err
    assert tree_digest(tmp_path) == before


def test_import_into_the_parent_of_its_source_is_refused_even_with_overwrite(world, tmp_path, capsys):
    shutil.copytree(world.hf, tmp_path / "a" / "src")
    before = tree_digest(tmp_path)
    for extra in ([], ["--overwrite"]):
        code, err = run(capsys, "import-hf", tmp_path / "a" / "src", tmp_path / "a", *extra)
        assert code == 2 and "contains the input" in err
    (tmp_path / "link").symlink_to(tmp_path / "a" / "src")  # paths are compared after resolving links
    code, err = run(capsys, "import-hf", tmp_path / "link", tmp_path / "a" / "src", "--overwrite")
    assert code == 2 and "is the input" in err
    (tmp_path / "link").unlink()
    assert tree_digest(tmp_path) == before


def test_overwrite_replaces_the_old_output_whole(world, tmp_path, capsys):
    for argv in (["export-hf", world.ckpt], ["import-hf", world.hf]):
        out = someones_dir(tmp_path / argv[0])
        code, err = run(capsys, *argv, out, "--overwrite")
        assert code == 0, err
        assert not (out / "notes.txt").exists() and (out / "config.json").is_file()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp or .old left


def test_a_failed_overwrite_leaves_the_old_output(world, tmp_path, capsys, monkeypatch):
    import llmlab.model.hf as hf

    out = someones_dir(tmp_path / "hf")
    before = tree_digest(tmp_path)

    def fail_midway(file, tensors, metadata=None):
        file.write_bytes(b"half a safetensors file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf, "write_safetensors", fail_midway)
    code, err = run(capsys, "export-hf", world.ckpt, out, "--overwrite")
    assert code == 2 and "No space left on device" in err and str(out) in err and err.count("\n") == 1
    assert tree_digest(tmp_path) == before  # old output intact, temporary directory gone


KILLABLE = """
import sys, time
import llmlab.model.hf as hf

def stall(file, tensors, metadata=None):
    file.write_bytes(b"half a safetensors file")
    print("writing", flush=True)
    time.sleep(120)

hf.write_safetensors = stall
from llmlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_mid_write_leaves_the_old_output_intact(world, tmp_path):
    out = someones_dir(tmp_path / "hf")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE, "export-hf", str(world.ckpt), str(out), "--overwrite"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me\n"
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]  # the abandoned temporary sibling


# ---- the same rule for every verb that writes ----


def _argv(verb: str, w, out: Path) -> list:
    gen = ["--sequences", "2", "--prompt-tokens", "4", "--length", "12", "--device", "cpu", "--no-progress"]
    return {
        "tokenizer train": [
            "tokenizer",
            "train",
            w.doc,
            "--vocab-size",
            "270",
            "--out",
            out,
            "--no-progress",
        ],
        "tokenizer export": ["tokenizer", "export", out, "--tokenizer", w.tok],
        "data prepare": ["data", "prepare", w.docs, "--tokenizer", w.tok, "--out", out, "--no-progress"],
        "data generate": ["data", "generate", w.ckpt, "--shards", w.shards, "--out", out, *gen],
        "quantize": ["quantize", w.ckpt, "--out", out],
        "export-hf": ["export-hf", w.ckpt, out],
        "import-hf": ["import-hf", w.hf, out],
    }[verb]


VERBS = [
    "tokenizer train",
    "tokenizer export",
    "data prepare",
    "data generate",
    "quantize",
    "export-hf",
    "import-hf",
]


@pytest.mark.parametrize("verb", VERBS)
def test_every_writing_verb_follows_the_rule(verb, world, tmp_path, capsys):
    taken = someones_dir(tmp_path / "taken")
    if verb == "tokenizer export":  # writes one file
        taken = taken / "notes.txt"
    (tmp_path / "file.txt").write_text("a regular file\n")
    before = tree_digest(tmp_path)
    code, err = run(capsys, *_argv(verb, world, taken))
    assert code == 2 and "already exists as a non-empty" in err and err.count("\n") == 1, err
    code, err = run(capsys, *_argv(verb, world, tmp_path / "file.txt" / "out"))
    assert code == 2 and "regular file" in err, err
    assert tree_digest(tmp_path) == before

    # its own earlier output: refused without --overwrite, replaced with it
    made = tmp_path / ("made.json" if verb == "tokenizer export" else "made")
    first = ["--val-fraction", "0.5"] if verb == "data prepare" else []  # another preparation
    assert run(capsys, *_argv(verb, world, made), *first)[0] == 0
    marker = (
        made if verb == "tokenizer export" else made / "meta.json" if verb == "data prepare" else made / "x"
    )
    marker.write_text("{}")
    before = tree_digest(tmp_path)
    code, err = run(capsys, *_argv(verb, world, made))
    assert code == 2 and "--overwrite" in err, err
    assert tree_digest(tmp_path) == before
    code, err = run(capsys, *_argv(verb, world, made), "--overwrite")
    assert code == 0, err
    assert not marker.exists() or marker.read_text() != "{}"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_data_prepare_resumes_its_own_preparation_without_overwrite(world, tmp_path, capsys):
    argv = _argv("data prepare", world, tmp_path / "shards")
    assert run(capsys, *argv)[0] == 0
    assert run(capsys, *argv)[0] == 0  # the same preparation again is not someone else's output


def test_speedrun_and_pretrain_refuse_outputs_around_their_inputs(world, tmp_path, capsys):
    code, err = run(capsys, "speedrun", "--preset", world.preset, "--out", world.docs.parent, "--overwrite")
    assert code == 2 and "contains the input" in err
    code, err = run(
        capsys,
        "pretrain",
        "--config",
        "tiny",
        f"data.shards={world.shards}",
        f"train.out_dir={world.shards}",
        "train.run_name=run",
    )
    assert code == 2 and "lies inside the input" in err


def test_check_output_rules_by_hand(tmp_path, monkeypatch):
    data = someones_dir(tmp_path / "data")
    assert check_output(tmp_path / "new", inputs=[data]) == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty")  # an empty directory is not someone's files
    check_output(data, overwrite=True)
    check_output(data, reusable=lambda p: (p / "notes.txt").is_file())
    for out, inputs, overwrite, message in [
        (data, [], False, "non-empty directory"),
        (data, [data / "notes.txt"], True, "contains the input"),
        (data / "x", [data], True, "inside the input"),
        (data / "notes.txt", [data / "notes.txt"], True, "is the input file"),
        (data / "notes.txt" / "x", [], True, "regular file"),
    ]:
        with pytest.raises(OutputError, match=message):
            check_output(out, inputs=inputs, overwrite=overwrite)
    check_output(data / "run", inputs=[data / "run" / "shards"], kept=True)  # written into, never replaced
    monkeypatch.chdir(data)
    for out in (".", "..", "/"):
        with pytest.raises(OutputError, match="current directory"):
            check_output(out, overwrite=True)
    with pytest.raises(OutputError, match="is a regular file"):
        check_output(data / "notes.txt", overwrite=True, into=True)


def test_atomic_dir_turns_a_failed_write_into_one_line_and_cleans_up(tmp_path):
    with pytest.raises(OutputError, match=r"cannot write .*File too large"):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a").write_text("x")
            raise OSError(27, "File too large")
    assert list(tmp_path.iterdir()) == []
    # writers that hide the errno: safetensors' message, torch.save's short write
    assert "File too large" in str(
        write_failure(RuntimeError("I/O error: File too large (os error 27)"), "f")
    )
    assert "stopped short" in str(write_failure(RuntimeError("unexpected pos 704 vs 598"), "f"))
    assert write_failure(ValueError("a bug"), "f") is None


# ---- disk full: a small RLIMIT_FSIZE in a subprocess ----


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _limited(argv: list, limit: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmlab", *map(str, argv)],
        capture_output=True,
        text=True,
        preexec_fn=_file_size_limit(limit),
        timeout=300,
    )


@pytest.mark.parametrize(
    "verb,limit",
    [
        ("tokenizer train", 4000),
        ("data prepare", 1000),
        ("quantize", 20000),
        ("export-hf", 20000),
    ],
)
def test_disk_full_is_one_line_and_leaves_nothing(verb, limit, world, tmp_path):
    out = tmp_path / "out"
    proc = _limited(_argv(verb, world, out), limit)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("llmlab: error: cannot write") and "File too large" in last, proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))


def test_disk_full_while_writing_a_checkpoint(world, tmp_path):
    proc = _limited(
        [
            "pretrain",
            "--config",
            "tiny",
            f"data.shards={world.shards}",
            f"train.out_dir={tmp_path}",
            "train.run_name=run",
            "optim.max_steps=2",
            "train.ckpt_every=2",
            "train.eval_every=2",
            "train.eval_batches=1",
            "train.progress=false",
            "train.plot=false",
        ],
        40000,
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("llmlab: error: cannot write") and "ckpt-000002" in last, proc.stderr
    assert "Traceback" not in proc.stderr
    run_dir = tmp_path / "run"
    assert not [p.name for p in run_dir.iterdir() if "ckpt" in p.name], list(run_dir.iterdir())


def test_data_prepare_overwrite_is_made_beside_and_swapped_in(world, tmp_path, capsys, monkeypatch):
    import llmlab.data.prepare as prepare
    from llmlab.errors import DataError

    out = tmp_path / "shards"
    assert run(capsys, *_argv("data prepare", world, out), "--val-fraction", "0.5")[0] == 0
    (out / "notes.txt").write_text("someone's\n")
    before = tree_digest(tmp_path)

    def fail(*args, **kwargs):
        raise DataError("stopped midway")

    with monkeypatch.context() as patch:
        patch.setattr(prepare, "_meta", fail)
        code, err = run(capsys, *_argv("data prepare", world, out), "--overwrite")
    assert code == 2 and "stopped midway" in err
    assert tree_digest(tmp_path) == before  # the old preparation, untouched; no temporary directory
    assert run(capsys, *_argv("data prepare", world, out), "--overwrite")[0] == 0
    assert not (out / "notes.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]

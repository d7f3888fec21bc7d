"""Bad input, verb by verb: for every `llmlab` verb a table of wrong files, paths, numbers and overrides.

Each case runs the CLI in-process and asserts the user-error contract: exit code 2, one line on stderr (an
argparse error adds one line pointing at --help), no traceback, every input byte-for-byte untouched and no
output, partial or temporary, left anywhere. The artefacts (corpus, tokenizer, shards, a trained checkpoint,
an HF directory) are made once per module and shared read-only; `build_world` is reused by test_outputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmlab.cli import build_parser, main

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home", "def", "x", "="]


def build_world(root: Path) -> SimpleNamespace:
    """A small corpus and everything made from it: tokenizer, shards, a 2-step run, an HF export."""
    from llmlab.config import find_preset, load_config
    from llmlab.data.prepare import prepare_shards
    from llmlab.model.hf import export_hf
    from llmlab.tokenizer import Tokenizer
    from llmlab.train.pretrain import PretrainConfig, run_pretrain

    docs = root / "docs"
    docs.mkdir(parents=True)
    for i in range(24):
        words = [WORDS[(i * 7 + j * (1 + i % 3)) % len(WORDS)] for j in range(90)]
        (docs / f"d{i:02d}.txt").write_text(" ".join(words) + ".\n")
    texts = [p.read_text() for p in sorted(docs.iterdir())]
    Tokenizer.train(texts, vocab_size=300, progress=False, workers=1).save(root / "tok")
    no_eos = Tokenizer.train(texts, vocab_size=280, special_tokens=[], progress=False, workers=1)
    no_eos.save(root / "tok_noeos")
    prepare_shards(str(docs), root / "tok", root / "shards", val_fraction=0.25, workers=1, progress=False)
    cfg = load_config(PretrainConfig, find_preset("tiny"), [
        f"data.shards={root / 'shards'}", f"train.out_dir={root / 'runs'}", "train.run_name=exp",
        "optim.max_steps=2", "train.eval_every=2", "train.ckpt_every=2", "train.eval_batches=1",
        "train.progress=false", "train.plot=false"])
    ckpt = Path(run_pretrain(cfg)["checkpoint"])
    export_hf(ckpt, root / "hf")
    make_reward_model(ckpt, root / "rm")
    preset = root / "speedrun.toml"
    preset.write_text(f'pretrain_config = "tiny"\n[tokenizer]\nvocab_size = 280\n[corpus]\n'
                      f'sources = ["{docs}/*.txt"]\n')
    return SimpleNamespace(root=root, docs=docs, doc=docs / "d00.txt", tok=root / "tok",
                           tok_noeos=root / "tok_noeos", shards=root / "shards", run=root / "runs" / "exp",
                           runs=root / "runs", ckpt=ckpt, hf=root / "hf", preset=preset, rm=root / "rm")


def make_reward_model(ckpt: Path, out: Path) -> None:
    """A reward model (scalar head, no LM head) of CKPT's shape, with a copy of CKPT's tokenizer."""
    from llmlab.model.transformer import Transformer, read_config

    Transformer(dataclasses.replace(read_config(ckpt), head="scalar")).save(out)
    shutil.copytree(ckpt / "tokenizer", out / "tokenizer")


def tree_digest(root: Path) -> str:
    """Names, kinds and contents of everything under ROOT: any change, addition or leftover shows."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            h.update(str(path.relative_to(root)).encode() + b"\0")
            if path.is_file() and not path.is_symlink():
                h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def make_scratch(t: Path, w: SimpleNamespace) -> None:
    """What the cases point at besides the world ({t}/...): a directory of someone's files, a regular file,
    corrupt copies of the artefacts."""
    (t / "taken").mkdir()
    (t / "taken" / "notes.txt").write_text("someone's notes\n")
    (t / "file").write_text("a regular file\n")
    (t / "empty.txt").write_text("")
    (t / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (t / "bad.jsonl").write_text("{not json\n")
    (t / "small.csv").write_text("N,D,loss\n1e6,1e9,3.1\n2e6,1e9,3.0\n")
    (t / "badnum.csv").write_text("N,D,loss\n1e6,1e9,3.1\n2e6,lots,3.0\n" + "3e6,1e9,2.9\n" * 4)
    (t / "prompts.jsonl").write_text('{"prompt": "What is 1 + 2?", "task": "add"}\n')
    (t / "sft.jsonl").write_text('{"prompt": "What is 1 + 2?", "completion": "3"}\n' * 4)
    (t / "tok_bad").mkdir()
    (t / "tok_bad" / "llmlab.json").write_text('{"format": "llmlab-tokenizer", "merges": 7')
    for name in ("no_weights", "bad_config", "trunc_weights"):
        shutil.copytree(w.ckpt, t / name)
    (t / "no_weights" / "model.safetensors").unlink()
    (t / "bad_config" / "config.json").write_text('{"n_layer": ')
    weights = t / "trunc_weights" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    shutil.copytree(w.shards, t / "shards_trunc")
    shard = sorted((t / "shards_trunc").glob("train_*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:20])
    shutil.copytree(w.shards, t / "shards_badmeta")
    (t / "shards_badmeta" / "meta.json").write_text("[1, 2")
    (t / "run_nometrics").mkdir()
    (t / "run_badmetrics").mkdir()
    (t / "run_badmetrics" / "metrics.jsonl").write_text('\x00\x01 garbage\n{"step": \n')
    (t / "run_plotfile").mkdir()
    shutil.copy(w.run / "metrics.jsonl", t / "run_plotfile" / "metrics.jsonl")
    (t / "run_plotfile" / "plots").write_text("not a directory")
    shutil.copytree(w.hf, t / "hf_nocfg")
    (t / "hf_nocfg" / "config.json").unlink()
    shutil.copytree(w.hf, t / "hf_badcfg")
    (t / "hf_badcfg" / "config.json").write_text("{oops")
    shutil.copytree(w.hf, t / "hf_badchat")
    (t / "hf_badchat" / "tokenizer_config.json").write_text('{"chat_template": 5}')
    shutil.copytree(w.ckpt, t / "ckpt_badchat")  # a stored chat template whose pad ends a turn
    tok_json = t / "ckpt_badchat" / "tokenizer" / "llmlab.json"
    tok_json.write_text(tok_json.read_text().replace('"pad": "<|pad|>"', '"pad": "<|end|>"'))
    shutil.copytree(w.hf, t / "hfs" / "src")
    (t / "long_prompt.jsonl").write_text('{"prompt": "' + "the cat " * 40 + '"}\n')
    for name in ("rm_scalar", "rm_othertok"):  # reward models: the checkpoint's config with a scalar head
        shutil.copytree(w.ckpt, t / name)
        config = t / name / "config.json"
        config.write_text(config.read_text().replace('"head": "lm"', '"head": "scalar"'))
    shutil.rmtree(t / "rm_othertok" / "tokenizer")
    shutil.copytree(w.tok_noeos, t / "rm_othertok" / "tokenizer")
    (t / "rm_othertok" / "tokenizer_id.json").unlink(missing_ok=True)
    shutil.copytree(w.ckpt, t / "runs" / "exp" / "ckpt-000002")


USAGE = "usage"  # an argparse error: one line plus the --help hint
# Whole words of a template that stand for several arguments, or for one argument holding spaces.
EXPANSIONS = {"{gen}": "--sequences 2 --prompt-tokens 4 --length 12 --no-progress --device cpu".split(),
              "{special}": ["a <|eos|> b"], "{long}": ["the cat " * 80]}


def case(id: str, template: str, fragment: str, kind: str = "error"):
    """A bad command line: TEMPLATE's words with {t} (this case's scratch directory) and the world's paths
    filled in; FRAGMENT must appear in the error line."""
    return pytest.param(SimpleNamespace(template=template, fragment=fragment, kind=kind), id=id)


def argv(template: str, w: SimpleNamespace, t: Path) -> list[str]:
    names = {**{k: str(v) for k, v in vars(w).items()}, "t": str(t)}
    words = []
    for word in template.split():
        words += EXPANSIONS.get(word) or [word.format(**names)]
    return words


CASES = [
    # ---- top level ----
    case("no-verb", "", "missing VERB", USAGE),
    case("unknown-verb", "frobnicate", "invalid choice", USAGE),
    case("unknown-option", "--nope", "unrecognized argument", USAGE),
    # ---- tokenizer train ----
    case("tok-train-missing-source", "tokenizer train {t}/missing.txt --out {t}/o", "does not exist"),
    case("tok-train-empty-source", "tokenizer train {t}/empty.txt --out {t}/o", "is empty"),
    case("tok-train-corrupt-jsonl", "tokenizer train {t}/bad.jsonl --out {t}/o", "bad.jsonl"),
    case("tok-train-vocab-0", "tokenizer train {doc} --vocab-size 0", ">= 1", USAGE),
    case("tok-train-vocab-small", "tokenizer train {doc} --vocab-size 260 --out {t}/o --no-progress",
         "vocab_size"),
    case("tok-train-workers-neg", "tokenizer train {doc} --workers -3", "--workers", USAGE),
    case("tok-train-max-chars-0", "tokenizer train {doc} --max-chars 0", "--max-chars", USAGE),
    case("tok-train-bad-pattern", "tokenizer train {doc} --pattern gtp4 --out {t}/o --no-progress", "gtp4"),
    case("tok-train-out-existing", "tokenizer train {doc} --out {tok} --no-progress", "--overwrite"),
    case("tok-train-out-taken", "tokenizer train {doc} --out {t}/taken --no-progress", "non-empty"),
    case("tok-train-out-under-file", "tokenizer train {doc} --out {t}/file/o", "regular file"),
    case("tok-train-out-is-input", "tokenizer train {docs} --out {docs} --overwrite", "contains the input"),
    case("tok-train-out-holds-input", "tokenizer train {doc} --out {docs} --overwrite", "contains the input"),
    case("tok-train-out-in-proc", "tokenizer train {doc} --out /proc/llmlab/o", "cannot write"),
    # ---- tokenizer encode / decode / inspect / stats / export ----
    case("tok-encode-nothing", "tokenizer encode --tokenizer {tok}", "exactly one"),
    case("tok-encode-missing-tok", "tokenizer encode hi --tokenizer {t}/nope", "does not exist"),
    case("tok-encode-tok-is-file", "tokenizer encode hi --tokenizer {t}/file", "file"),
    case("tok-encode-corrupt-tok", "tokenizer encode hi --tokenizer {t}/tok_bad", "llmlab.json"),
    case("tok-encode-missing-file", "tokenizer encode --file {t}/nofile --tokenizer {tok}", "does not exist"),
    case("tok-encode-file-is-dir", "tokenizer encode --file {t}/taken --tokenizer {tok}", "is a directory"),
    case("tok-encode-not-utf8", "tokenizer encode --file {t}/latin1.txt --tokenizer {tok}", "UTF-8"),
    case("tok-encode-special-text", "tokenizer encode {special} --tokenizer {tok}", "<|eos|>"),
    case("tok-decode-not-int", "tokenizer decode 1 x --tokenizer {tok}", "must be integers"),
    case("tok-decode-past-vocab", "tokenizer decode 99999 --tokenizer {tok}", "99999"),
    case("tok-decode-negative", "tokenizer decode --tokenizer {tok} -- -5", "-5"),
    case("tok-inspect-missing-tok", "tokenizer inspect hi --tokenizer {t}/nope", "does not exist"),
    case("tok-stats-missing-file", "tokenizer stats {t}/nofile.txt --tokenizer {tok}", "does not exist"),
    case("tok-export-bad-format", "tokenizer export {t}/o.json --format xx", "invalid choice", USAGE),
    case("tok-export-into-input", "tokenizer export {tok} --tokenizer {tok} --overwrite", "inside the input"),
    case("tok-export-existing-file", "tokenizer export {t}/file --tokenizer {tok}", "--overwrite"),
    case("tok-export-under-file", "tokenizer export {t}/file/t.json --tokenizer {tok}", "regular file"),
    # ---- data prepare ----
    case("prep-missing-source", "data prepare {t}/nope.txt --tokenizer {tok} --out {t}/o --no-progress",
         "does not exist"),
    case("prep-missing-tok", "data prepare {doc} --tokenizer {t}/nope --out {t}/o --no-progress",
         "tokenizer directory"),
    case("prep-tok-no-eos", "data prepare {doc} --tokenizer {tok_noeos} --out {t}/o --no-progress", "eos"),
    case("prep-out-is-input", "data prepare {doc} --tokenizer {tok} --out {doc} --overwrite", "is the input"),
    case("prep-out-is-tokenizer", "data prepare {doc} --tokenizer {tok} --out {tok} --overwrite",
         "is the input"),
    case("prep-out-holds-input", "data prepare {doc} --tokenizer {tok} --out {root} --overwrite",
         "contains the input"),
    case("prep-out-taken", "data prepare {doc} --tokenizer {tok} --out {t}/taken --no-progress", "non-empty"),
    case("prep-out-under-file", "data prepare {doc} --tokenizer {tok} --out {t}/file/o", "regular file"),
    case("prep-other-preparation", "data prepare {docs} --tokenizer {tok} --out {shards} --no-progress",
         "another preparation"),
    case("prep-shard-tokens-0", "data prepare {doc} --tokenizer {tok} --out {t}/o --shard-tokens 0",
         "--shard-tokens", USAGE),
    case("prep-val-fraction-1", "data prepare {doc} --tokenizer {tok} --out {t}/o --val-fraction 1",
         "--val-fraction", USAGE),
    case("prep-val-fraction-nan", "data prepare {doc} --tokenizer {tok} --out {t}/o --val-fraction nan",
         "--val-fraction", USAGE),
    case("prep-workers-neg", "data prepare {doc} --tokenizer {tok} --out {t}/o --workers -3",
         "--workers", USAGE),
    case("prep-seed-neg", "data prepare {doc} --tokenizer {tok} --out {t}/o --seed -1", "--seed", USAGE),
    case("prep-no-tokenizer-option", "data prepare {doc} --out {t}/o", "--tokenizer", USAGE),
    # ---- data generate ----
    case("gen-data-missing-ckpt", "data generate {t}/nope --shards {shards} --out {t}/o {gen}", "nope"),
    case("gen-data-missing-shards", "data generate {ckpt} --shards {t}/nope --out {t}/o {gen}", "nope"),
    case("gen-data-out-is-shards", "data generate {ckpt} --shards {shards} --out {shards} --overwrite {gen}",
         "is the input"),
    case("gen-data-out-holds-ckpt", "data generate {ckpt} --shards {shards} --out {run} --overwrite {gen}",
         "contains the input"),
    case("gen-data-out-taken", "data generate {ckpt} --shards {shards} --out {t}/taken {gen}", "non-empty"),
    case("gen-data-out-under-file", "data generate {ckpt} --shards {shards} --out {t}/file/o {gen}",
         "regular file"),
    case("gen-data-sequences-0", "data generate {ckpt} --shards {shards} --out {t}/o --sequences 0",
         "--sequences", USAGE),
    case("gen-data-temperature-inf", "data generate {ckpt} --shards {shards} --out {t}/o --temperature inf",
         "--temperature", USAGE),
    case("gen-data-length-past-context", "data generate {ckpt} --shards {shards} --out {t}/o --sequences "
         "2 --length 999 --no-progress --device cpu",
         "999"),
    case("gen-data-prompt-too-long", "data generate {ckpt} --shards {shards} --out {t}/o --prompt-tokens "
         "12 --length 12 --device cpu",
         "--prompt-tokens"),
    # ---- data tasks ----
    case("tasks-unknown-task", "data tasks --out {t}/o --tasks add,div", "'div'"),
    case("tasks-difficulty-range", "data tasks --out {t}/o --difficulty add=99", "difficulty 99"),
    case("tasks-difficulty-syntax", "data tasks --out {t}/o --difficulty add", "TASK=INTEGER"),
    case("tasks-too-few-problems", "data tasks --out {t}/o --tasks mul --difficulty mul=1 --test 50", "only"),
    case("tasks-out-taken", "data tasks --out {t}/taken", "non-empty"),
    case("tasks-out-under-file", "data tasks --out {t}/file/o", "regular file"),
    case("tasks-train-0", "data tasks --out {t}/o --train 0", "--train", USAGE),
    case("tasks-no-out", "data tasks", "--out", USAGE),
    # ---- data preferences ----
    case("prefs-missing-ckpt", "data preferences {t}/nope --prompts {t}/prompts.jsonl --out {t}/o.jsonl",
         "nope"),
    case("prefs-missing-prompts", "data preferences {ckpt} --prompts {t}/nope.jsonl --out {t}/o.jsonl",
         "nope.jsonl"),
    case("prefs-corrupt-prompts", "data preferences {ckpt} --prompts {t}/bad.jsonl --out {t}/o.jsonl",
         "bad.jsonl:1"),
    case("prefs-out-is-prompts", "data preferences {ckpt} --prompts {t}/prompts.jsonl --out "
         "{t}/prompts.jsonl --overwrite", "is the input"),
    case("prefs-out-under-file", "data preferences {ckpt} --prompts {t}/prompts.jsonl --out {t}/file/o.jsonl",
         "regular file"),
    case("prefs-samples-1", "data preferences {ckpt} --prompts {t}/prompts.jsonl --out {t}/o.jsonl "
         "--samples 1", "--samples", USAGE),
    case("prefs-noise-0.9", "data preferences {ckpt} --prompts {t}/prompts.jsonl --out {t}/o.jsonl "
         "--noise 0.9", "--noise", USAGE),
    case("prefs-temperature-0", "data preferences {ckpt} --prompts {t}/prompts.jsonl --out {t}/o.jsonl "
         "--temperature 0", "--temperature", USAGE),
    case("prefs-bad-rater", "data preferences {ckpt} --prompts {t}/prompts.jsonl --out {t}/o.jsonl "
         "--rater loud", "loud", USAGE),
    case("prefs-no-prompts", "data preferences {ckpt} --out {t}/o.jsonl", "--prompts", USAGE),
    # ---- data info ----
    case("info-missing", "data info {t}/nope", "nope"),
    case("info-not-shards", "data info {docs}", "meta.json"),
    case("info-truncated-shard", "data info {t}/shards_trunc", "train_00000.bin"),
    case("info-corrupt-meta", "data info {t}/shards_badmeta", "meta.json"),
    # ---- generate ----
    case("generate-missing-ckpt", "generate {t}/nope", "does not exist"),
    case("generate-no-weights", "generate {t}/no_weights", "model.safetensors"),
    case("generate-corrupt-config", "generate {t}/bad_config", "config.json"),
    case("generate-truncated-weights", "generate {t}/trunc_weights", "model.safetensors"),
    case("generate-missing-tok", "generate {ckpt} --tokenizer {t}/nope", "nope"),
    case("generate-missing-draft", "generate {ckpt} --draft {t}/nope", "nope"),
    case("generate-bad-device", "generate {ckpt} --device tpu", "tpu"),
    case("generate-long-prompt", "generate {ckpt} --prompt {long}", "block_size"),
    case("generate-temperature-inf", "generate {ckpt} --temperature inf", "--temperature", USAGE),
    case("generate-temperature-nan", "generate {ckpt} --temperature nan", "--temperature", USAGE),
    case("generate-temperature-neg", "generate {ckpt} --temperature -1", "--temperature", USAGE),
    case("generate-top-p-2", "generate {ckpt} --top-p 2", "--top-p", USAGE),
    case("generate-max-new-0", "generate {ckpt} --max-new-tokens 0", "--max-new-tokens", USAGE),
    case("generate-top-k-neg", "generate {ckpt} --top-k -1", "--top-k", USAGE),
    case("generate-reward-model", "generate {rm}", "reward model (scalar head"),
    case("generate-reward-model-draft", "generate {ckpt} --draft {rm}", "reward model (scalar head"),
    # ---- serve / chat ----
    case("serve-missing-ckpt", "serve {t}/nope --port 0", "does not exist"),
    case("serve-no-weights", "serve {t}/no_weights --port 0", "model.safetensors"),
    case("serve-missing-tok", "serve {ckpt} --port 0 --tokenizer {t}/nope", "nope"),
    case("serve-cannot-bind", "serve {ckpt} --host 203.0.113.7 --port 0", "cannot listen"),
    case("serve-port-too-big", "serve {ckpt} --port 70000", "--port", USAGE),
    case("serve-max-tokens-0", "serve {ckpt} --max-tokens 0", "--max-tokens", USAGE),
    case("serve-kv-budget-0", "serve {ckpt} --kv-budget-mb 0", "--kv-budget-mb", USAGE),
    case("serve-kv-budget-tiny", "serve {ckpt} --port 0 --kv-budget-mb 0.00001", "kv_budget_bytes"),
    case("chat-missing-ckpt", "chat {t}/nope", "does not exist"),
    case("chat-bad-device", "chat {ckpt} --device tpu", "tpu"),
    case("chat-temperature-neg", "chat {ckpt} --temperature -1", "--temperature", USAGE),
    case("chat-top-p-2", "chat {ckpt} --top-p 2", "--top-p", USAGE),
    # ---- pretrain ----
    case("pretrain-missing-config", "pretrain --config {t}/nope.toml", "nope"),
    case("pretrain-missing-shards", "pretrain --config tiny data.shards={t}/nope", "nope"),
    case("pretrain-unknown-key", "pretrain --config tiny optim.lrr=1", "optim.lrr"),
    case("pretrain-not-an-override", "pretrain --config tiny foo", "foo"),
    case("pretrain-overrides-between-options", "pretrain data.shards={t}/nope --config tiny train.run_name=x",
         "nope"),
    case("pretrain-lr-nan", "pretrain --config tiny data.shards={shards} train.out_dir={t} optim.lr=nan",
         "optim.lr"),
    case("pretrain-lr-negative", "pretrain --config tiny data.shards={shards} train.out_dir={t} optim.lr=-1",
         "optim.lr"),
    case("pretrain-layers-0", "pretrain --config tiny data.shards={shards} train.out_dir={t} model.n_layer=0",
         "n_layer"),
    case("pretrain-missing-resume", "pretrain --config tiny data.shards={shards} train.out_dir={t} "
         "--resume {t}/nope",
         "nope"),
    case("pretrain-run-under-file", "pretrain --config tiny data.shards={shards} train.out_dir={t}/file",
         "regular file"),
    case("pretrain-run-is-shards", "pretrain --config tiny data.shards={shards} train.out_dir={root} "
         "train.run_name=shards",
         "is the input"),
    case("pretrain-existing-run", "pretrain --config tiny data.shards={shards} train.out_dir={runs} "
         "train.run_name=exp",
         "already holds a run"),
    case("pretrain-resume-needs-value", "pretrain --resume", "--resume", USAGE),
    # ---- sft ----
    case("sft-no-checkpoint", "sft --data {t}/sft.jsonl train.out_dir={t}", "checkpoint is not set"),
    case("sft-missing-checkpoint", "sft --checkpoint {t}/nope --data {t}/sft.jsonl train.out_dir={t}",
         "nope"),
    case("sft-checkpoint-no-weights", "sft --checkpoint {t}/no_weights --data {t}/sft.jsonl "
         "train.out_dir={t}", "model.safetensors"),
    case("sft-corrupt-config", "sft --checkpoint {t}/bad_config --data {t}/sft.jsonl train.out_dir={t}",
         "config.json"),
    case("sft-missing-data", "sft --checkpoint {ckpt} --data {t}/nope.jsonl train.out_dir={t}", "nope.jsonl"),
    case("sft-malformed-record", "sft --checkpoint {ckpt} --data {t}/prompts.jsonl train.out_dir={t}",
         "prompts.jsonl:1"),
    case("sft-corrupt-jsonl", "sft --checkpoint {ckpt} --data {t}/bad.jsonl train.out_dir={t}",
         "bad.jsonl:1"),
    case("sft-missing-val", "sft --checkpoint {ckpt} --data {t}/sft.jsonl --val {t}/nope.jsonl "
         "train.out_dir={t}", "nope.jsonl"),
    case("sft-unknown-key", "sft --checkpoint {ckpt} --data {t}/sft.jsonl lora.rnk=4", "lora.rnk"),
    case("sft-bad-lora-target", "sft --checkpoint {ckpt} --data {t}/sft.jsonl lora.rank=4 "
         'lora.targets=["attn.q"]', "lora.targets"),
    case("sft-block-past-context", "sft --checkpoint {ckpt} --data {t}/sft.jsonl train.out_dir={t} "
         "data.block_size=9999", "data.block_size"),
    case("sft-missing-tokenizer", "sft --checkpoint {ckpt} --data {t}/sft.jsonl train.out_dir={t} "
         "data.tokenizer={t}/nope", "data.tokenizer"),
    case("sft-other-tokenizer", "sft --checkpoint {ckpt} --data {t}/sft.jsonl train.out_dir={t} "
         "data.tokenizer={tok_noeos}", "data.tokenizer"),
    case("sft-missing-resume", "sft --checkpoint {ckpt} --data {t}/sft.jsonl train.out_dir={t} "
         "--resume {t}/nope", "nope"),
    case("sft-existing-run", "sft --checkpoint {ckpt} --data {t}/sft.jsonl train.out_dir={runs} "
         "train.run_name=exp", "already holds a run"),
    case("sft-run-under-file", "sft --checkpoint {ckpt} --data {t}/sft.jsonl train.out_dir={t}/file",
         "regular file"),
    case("sft-lr-nan", "sft --checkpoint {ckpt} --data {t}/sft.jsonl optim.lr=nan", "optim.lr"),
    # ---- ppo ----
    case("ppo-no-checkpoint", "ppo --reward-model {t}/rm_scalar --prompts {t}/prompts.jsonl "
         "train.out_dir={t}", "checkpoint is not set"),
    case("ppo-no-reward-model", "ppo --checkpoint {ckpt} --prompts {t}/prompts.jsonl train.out_dir={t}",
         "reward_model is not set"),
    case("ppo-reward-model-lm-head", "ppo --checkpoint {ckpt} --reward-model {ckpt} --prompts "
         "{t}/prompts.jsonl train.out_dir={t}", "head 'lm'"),
    case("ppo-reward-model-other-tokenizer", "ppo --checkpoint {ckpt} --reward-model {t}/rm_othertok "
         "--prompts {t}/prompts.jsonl train.out_dir={t}", "policy's SFT checkpoint"),
    case("ppo-missing-prompts", "ppo --checkpoint {ckpt} --reward-model {t}/rm_scalar --prompts "
         "{t}/nope.jsonl train.out_dir={t} ppo.response_length=8", "nope.jsonl"),
    case("ppo-prompt-past-context", "ppo --checkpoint {ckpt} --reward-model {t}/rm_scalar --prompts "
         "{t}/long_prompt.jsonl train.out_dir={t} ppo.response_length=8", "shorten the prompt"),
    case("ppo-no-room-to-respond", "ppo --checkpoint {ckpt} --reward-model {t}/rm_scalar --prompts "
         "{t}/prompts.jsonl train.out_dir={t} ppo.response_length=40", "ppo.response_length=40"),
    case("ppo-batch-does-not-split", "ppo --checkpoint {ckpt} --reward-model {t}/rm_scalar --prompts "
         "{t}/prompts.jsonl train.out_dir={t} ppo.response_length=8 ppo.rollout_batch_size=6 "
         "ppo.num_mini_batches=4", "multiple of"),
    case("ppo-bad-kl-estimator", "ppo --checkpoint {ckpt} ppo.kl_estimator=k2", "ppo.kl_estimator"),
    # ---- grpo ----
    case("grpo-no-checkpoint", "grpo --prompts {t}/prompts.jsonl train.out_dir={t}", "checkpoint is not set"),
    case("grpo-reward-model-other-tokenizer", "grpo --checkpoint {ckpt} --reward-model {t}/rm_othertok "
         "--prompts {t}/prompts.jsonl train.out_dir={t}", "policy's SFT checkpoint"),
    case("grpo-prompt-past-context", "grpo --checkpoint {ckpt} --reward-model {t}/rm_scalar --prompts "
         "{t}/long_prompt.jsonl train.out_dir={t} grpo.max_completion_length=8", "shorten the prompt"),
    case("grpo-grader-prompts-without-task", "grpo --checkpoint {ckpt} --prompts {t}/long_prompt.jsonl "
         "train.out_dir={t} grpo.max_completion_length=8", "no field task"),
    case("grpo-bad-baseline", "grpo --checkpoint {ckpt} grpo.baseline=mean", "grpo.baseline"),
    # ---- plot ----
    case("plot-missing-dir", "plot {t}/nope", "metrics.jsonl"),
    case("plot-no-metrics", "plot {t}/run_nometrics", "metrics.jsonl"),
    case("plot-corrupt-metrics", "plot {t}/run_badmetrics", "metrics.jsonl"),
    case("plot-plots-is-file", "plot {t}/run_plotfile", "regular file"),
    # ---- import-hf ----
    case("import-missing", "import-hf {t}/nope {t}/o", "nope"),
    case("import-no-config", "import-hf {t}/hf_nocfg {t}/o", "config.json"),
    case("import-corrupt-config", "import-hf {t}/hf_badcfg {t}/o", "config.json"),
    case("import-out-is-src", "import-hf {hf} {hf} --overwrite", "is the input"),
    case("import-out-holds-src", "import-hf {t}/hfs/src {t}/hfs --overwrite", "contains the input"),
    case("import-out-inside-src", "import-hf {hf} {hf}/sub", "inside the input"),
    case("import-out-taken", "import-hf {hf} {t}/taken", "non-empty"),
    case("import-out-under-file", "import-hf {hf} {t}/file/o", "regular file"),
    case("import-bad-dtype", "import-hf {hf} {t}/o --dtype fp7", "fp7"),
    case("import-bad-chat-template", "import-hf {t}/hf_badchat {t}/o", "chat_template is int"),
    # ---- export-hf ----
    case("export-missing", "export-hf {t}/nope {t}/o", "nope"),
    case("export-truncated-weights", "export-hf {t}/trunc_weights {t}/o", "model.safetensors"),
    case("export-out-is-ckpt", "export-hf {ckpt} {ckpt} --overwrite", "is the input"),
    case("export-out-is-run-dir", "export-hf {t}/runs/exp/ckpt-000002 {t}/runs/exp --overwrite",
         "contains the input"),
    case("export-out-taken", "export-hf {ckpt} {t}/taken", "non-empty"),
    case("export-out-under-file", "export-hf {ckpt} {t}/file/o", "regular file"),
    case("export-missing-tok", "export-hf {ckpt} {t}/o --tokenizer {t}/nope", "nope"),
    case("export-bad-dtype", "export-hf {ckpt} {t}/o --dtype fp7", "fp7"),
    case("export-reward-no-tokenizer", "export-hf {rm} {t}/o --no-tokenizer", "pad_token_id"),
    case("export-bad-chat-template", "export-hf {t}/ckpt_badchat {t}/o", "also ends a turn"),
    # ---- quantize ----
    case("quant-missing", "quantize {t}/nope --out {t}/o", "nope"),
    case("quant-bits-3", "quantize {ckpt} --out {t}/o --bits 3", "bits=3"),
    case("quant-method", "quantize {ckpt} --out {t}/o --method foo", "foo"),
    case("quant-group-0", "quantize {ckpt} --out {t}/o --group-size 0", "--group-size", USAGE),
    case("quant-calib-samples-0", "quantize {ckpt} --out {t}/o --calib-samples 0", "--calib-samples", USAGE),
    case("quant-missing-calib", "quantize {ckpt} --out {t}/o --method gptq --calib {t}/nope.bin", "nope"),
    case("quant-out-is-ckpt", "quantize {ckpt} --out {ckpt} --overwrite", "is the input"),
    case("quant-out-holds-ckpt", "quantize {ckpt} --out {run} --overwrite", "contains the input"),
    case("quant-out-taken", "quantize {ckpt} --out {t}/taken", "non-empty"),
    case("quant-out-under-file", "quantize {ckpt} --out {t}/file/o", "regular file"),
    case("quant-no-out", "quantize {ckpt}", "--out", USAGE),
    case("quant-reward-model", "quantize {rm} --out {t}/o", "reward model (scalar head"),
    # ---- eval ppl ----
    case("ppl-missing-ckpt", "eval ppl {t}/nope --data {shards}", "nope"),
    case("ppl-missing-data", "eval ppl {ckpt} --data {t}/nope", "nope"),
    case("ppl-data-not-shards", "eval ppl {ckpt} --data {docs}", "meta.json"),
    case("ppl-truncated-weights", "eval ppl {t}/trunc_weights --data {shards}", "model.safetensors"),
    case("ppl-batch-0", "eval ppl {ckpt} --data {shards} --batch-size 0", "--batch-size", USAGE),
    case("ppl-block-0", "eval ppl {ckpt} --data {shards} --block-size 0", "--block-size", USAGE),
    case("ppl-bad-split", "eval ppl {ckpt} --data {shards} --split test", "test", USAGE),
    case("ppl-no-action", "eval", "missing EVAL", USAGE),
    case("ppl-reward-model", "eval ppl {ckpt} {rm} --data {shards}", "reward model (scalar head"),
    # ---- eval tasks ----
    case("evtasks-missing-ckpt", "eval tasks {t}/nope --n 1", "nope"),
    case("evtasks-unknown-task", "eval tasks {ckpt} --tasks add,div", "'div'"),
    case("evtasks-missing-prompts", "eval tasks {ckpt} --prompts {t}/nope.jsonl", "nope.jsonl"),
    case("evtasks-corrupt-prompts", "eval tasks {ckpt} --prompts {t}/bad.jsonl", "bad.jsonl:1"),
    case("evtasks-n-0", "eval tasks {ckpt} --n 0", "--n", USAGE),
    case("evtasks-out-under-file", "eval tasks {ckpt} --n 1 --out {t}/file/r.json", "regular file"),
    case("evtasks-out-in-ckpt", "eval tasks {ckpt} --n 1 --out {ckpt}/r.json", "inside the input"),
    # ---- reward train / reward score / dpo ----
    case("reward-no-checkpoint", "reward train --data {t}/bad.jsonl train.out_dir={t}",
         "checkpoint is not set"),
    case("reward-missing-checkpoint", "reward train --checkpoint {t}/nope --data {t}/bad.jsonl "
         "train.out_dir={t}", "nope"),
    case("reward-missing-data", "reward train --checkpoint {ckpt} --data {t}/nope.jsonl train.out_dir={t}",
         "nope.jsonl"),
    case("reward-corrupt-jsonl", "reward train --checkpoint {ckpt} --data {t}/bad.jsonl train.out_dir={t}",
         "bad.jsonl:1"),
    case("reward-not-pairs", "reward train --checkpoint {ckpt} --data {t}/sft.jsonl train.out_dir={t}",
         "chosen"),
    case("reward-negative-center", "reward train --checkpoint {ckpt} reward.center_coefficient=-1",
         "reward.center_coefficient"),
    case("reward-unknown-key", "reward train --checkpoint {ckpt} reward.center=1", "reward.center"),
    case("reward-block-past-context", "reward train --checkpoint {ckpt} --data {t}/bad.jsonl "
         "data.block_size=100000 train.out_dir={t}", "data.block_size"),
    case("reward-no-action", "reward", "missing ACTION", USAGE),
    case("reward-score-missing-ckpt", "reward score {t}/nope --data {t}/sft.jsonl --out {t}/o.jsonl", "nope"),
    case("reward-score-lm-head", "reward score {ckpt} --data {t}/sft.jsonl --out {t}/o.jsonl", "scalar head"),
    case("reward-score-no-out", "reward score {ckpt} --data {t}/sft.jsonl", "--out", USAGE),
    case("reward-score-batch-0", "reward score {ckpt} --data {t}/sft.jsonl --out {t}/o.jsonl --batch-size 0",
         "--batch-size", USAGE),
    case("reward-score-out-is-data", "reward score {ckpt} --data {t}/sft.jsonl --out {t}/sft.jsonl "
         "--overwrite", "is the input"),
    case("reward-score-out-under-file", "reward score {ckpt} --data {t}/sft.jsonl --out {t}/file/o.jsonl",
         "regular file"),
    case("reward-score-missing-data", "reward score {rm} --data {t}/nope.jsonl --out {t}/o.jsonl",
         "nope.jsonl"),
    case("reward-score-corrupt-jsonl", "reward score {rm} --data {t}/bad.jsonl --out {t}/o.jsonl",
         "bad.jsonl:1"),
    case("reward-score-not-a-conversation", "reward score {rm} --data {t}/prompts.jsonl --out {t}/o.jsonl",
         "prompts.jsonl:1"),
    case("dpo-reward-model-checkpoint", "dpo --checkpoint {rm} --data {t}/bad.jsonl train.out_dir={t}",
         "head='scalar'"),
    case("dpo-no-checkpoint", "dpo --data {t}/bad.jsonl train.out_dir={t}", "checkpoint is not set"),
    case("dpo-missing-data", "dpo --checkpoint {ckpt} --data {t}/nope.jsonl train.out_dir={t}", "nope.jsonl"),
    case("dpo-corrupt-jsonl", "dpo --checkpoint {ckpt} --data {t}/bad.jsonl train.out_dir={t}",
         "bad.jsonl:1"),
    case("dpo-beta-0", "dpo --checkpoint {ckpt} dpo.beta=0", "dpo.beta"),
    case("dpo-unknown-loss", "dpo --checkpoint {ckpt} dpo.loss_type=hinge", "hinge"),
    case("dpo-smoothing-half", "dpo --checkpoint {ckpt} dpo.label_smoothing=0.5", "dpo.label_smoothing"),
    case("dpo-smoothing-with-ipo", "dpo --checkpoint {ckpt} --data {t}/bad.jsonl train.out_dir={t} "
         "dpo.loss_type=ipo dpo.label_smoothing=0.1", "dpo.label_smoothing"),
    case("dpo-unknown-reference", "dpo --checkpoint {ckpt} dpo.reference=copy", "copy"),
    case("dpo-run-under-file", "dpo --checkpoint {ckpt} --data {t}/bad.jsonl train.out_dir={t}/file",
         "regular file"),
    # ---- speedrun ----
    case("speedrun-unknown-preset", "speedrun --preset nope --out {t}/o", "nope"),
    case("speedrun-bad-override", "speedrun --preset {preset} --out {t}/o tokenizer.vocab_size=abc",
         "vocab_size"),
    case("speedrun-unknown-key", "speedrun --preset {preset} tokenizer.vocab=3 --out {t}/o",
         "tokenizer.vocab"),
    case("speedrun-out-under-file", "speedrun --preset {preset} --out {t}/file/o", "regular file"),
    case("speedrun-out-taken", "speedrun --preset {preset} --out {t}/taken", "non-empty"),
    case("speedrun-out-is-corpus", "speedrun --preset {preset} --out {docs} --overwrite",
         "contains the input"),
    case("speedrun-chat-unknown-task", "speedrun --preset cpu-chat --out {t}/o tasks.tasks=['div']", "'div'"),
    case("speedrun-chat-missing-base", "speedrun --preset cpu-chat --out {t}/o base.checkpoint={t}/nope",
         "nope"),
    case("speedrun-chat-bad-rater", "speedrun --preset cpu-chat --out {t}/o preferences.rater='loud'",
         "preferences.rater"),
    case("speedrun-chat-noise", "speedrun --preset cpu-chat --out {t}/o preferences.noise=0.9",
         "preferences.noise"),
    case("speedrun-chat-out-taken", "speedrun --preset cpu-chat --out {t}/taken base.checkpoint={ckpt}",
         "non-empty"),
    # ---- scaling ----
    case("scaling-no-action", "scaling", "missing ACTION", USAGE),
    case("scaling-flops-missing-config", "scaling flops --config {t}/nope.toml", "nope"),
    case("scaling-flops-no-vocab", "scaling flops --config tiny", "model.vocab_size"),
    case("scaling-flops-bad-model", "scaling flops --config tiny model.vocab_size=64 model.n_head=3",
         "n_head"),
    case("scaling-flops-seq-0", "scaling flops --config tiny --seq-len 0", "--seq-len", USAGE),
    case("scaling-sweep-missing-shards", "scaling sweep --out {t}/o pretrain.data.shards={t}/nope", "nope"),
    case("scaling-sweep-no-points", "scaling sweep --out {t}/o pretrain.data.shards={shards} budgets=[]",
         "no points"),
    case("scaling-sweep-unknown-key", "scaling sweep --out {t}/o budget=[1e12]", "budget"),
    case("scaling-sweep-out-taken", "scaling sweep --out {t}/taken pretrain.data.shards={shards} "
         "budgets=[1e8] depths=[1] min_steps=1", "taken"),
    case("scaling-fit-missing", "scaling fit {t}/nope.csv", "does not exist"),
    case("scaling-fit-not-csv", "scaling fit {t}/file", "lacks column"),
    case("scaling-fit-too-small", "scaling fit {t}/small.csv", "at least 5"),
    case("scaling-fit-bad-number", "scaling fit {t}/badnum.csv", "line 3"),
    case("scaling-fit-bootstrap-neg", "scaling fit {t}/small.csv --bootstrap -1", "--bootstrap", USAGE),
    case("scaling-plan-budget-0", "scaling plan --budget 0", "--budget", USAGE),
    case("scaling-plan-missing-law", "scaling plan --budget 1e21 --law {t}/nope.json", "nope.json"),
    case("scaling-plan-bad-law", "scaling plan --budget 1e21 --law {t}/file", "fit.json"),
    # ---- experiment ----
    case("experiment-no-name", "experiment", "missing EXPERIMENT", USAGE),
    case("experiment-chinchilla-unknown-key", "experiment chinchilla --out {t}/o vocab=3", "vocab"),
    case("experiment-chinchilla-bad-value", "experiment chinchilla --out {t}/o sweep.depths=[0]",
         "sweep.depths"),
    case("experiment-chinchilla-out-under-file", "experiment chinchilla --out {t}/file/o --smoke",
         "regular file"),
    case("experiment-rlhf-unknown-key", "experiment rlhf --out {t}/o rollout=3", "rollout"),
    case("experiment-rlhf-bad-value", "experiment rlhf --out {t}/o rollouts=0", "rollouts"),
    case("experiment-rlhf-group-split", "experiment rlhf --out {t}/o responses_per_rollout=6 group_size=4",
         "group_size"),
    case("experiment-rlhf-missing-base", "experiment rlhf --out {t}/o chat_run={t}/nochat "
         "base_checkpoint={t}/nope", "nope"),
    case("experiment-rlhf-out-under-file", "experiment rlhf --out {t}/file/o --smoke", "regular file"),
]


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_is_one_line_and_changes_nothing(bad, world, tmp_path, capsys):
    make_scratch(tmp_path, world)
    before = tree_digest(world.root), tree_digest(tmp_path)
    code = main(argv(bad.template, world, tmp_path))
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    if bad.kind == USAGE:
        assert len(lines) == 2 and ": error: " in lines[0], err
        assert lines[1].startswith("llmlab: see 'llmlab") and lines[1].endswith(" --help'"), err
    else:
        assert len(lines) == 1 and lines[0].startswith("llmlab: error: "), err
    assert bad.fragment in lines[0], (bad.fragment, err)
    assert (tree_digest(world.root), tree_digest(tmp_path)) == before, "an input changed or output was left"


@pytest.mark.parametrize("template,fragment", [
    ("export-hf {ckpt} {run} --overwrite", "contains the input"),
    ("generate {ckpt} --temperature nan", "--temperature"),
    ("tokenizer train {doc} --out {t}/file/o --no-progress", "regular file"),
])
def test_bad_input_through_a_real_process(template, fragment, world, tmp_path):
    """The same contract when `python -m llmlab` runs as its own process (exit status, stderr)."""
    make_scratch(tmp_path, world)
    before = tree_digest(world.root)
    proc = subprocess.run([sys.executable, "-m", "llmlab", *argv(template, world, tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) <= 2
    assert tree_digest(world.root) == before


def test_every_verb_has_cases():
    """`llmlab --help` lists the verbs; each one, and each action of a verb family, has cases in the table."""
    verbs = build_parser()._subparsers._group_actions[0].choices
    names = []
    for verb, parser in verbs.items():
        families = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        names += [f"{verb} {action}" for action in families[0].choices] if families else [verb]
    covered = {" ".join(p.values[0].template.split()[:2]) for p in CASES} | {
        p.values[0].template.split()[0] for p in CASES if p.values[0].template}
    assert [n for n in names if n not in covered] == []


def test_case_ids_are_unique():
    ids = [p.id for p in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)

"""Speculative decoding: greedy output equals plain greedy output token for token (several k, both flavours,
drafts that disagree / partly agree / are the target, prompt lookup, ragged batches, stop tokens,
max_new_tokens); sampled output follows exactly the plain sampling distribution (an exact formula check and a
chi-square test against the enumerated joint distribution, with broken acceptance rules as negative controls);
stats; bad input."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from llmlab.cli import main
from llmlab.errors import ConfigError, ModelError, TokenizerError
from llmlab.infer import generate
from llmlab.infer import speculative as spec
from llmlab.infer.lookup import PromptLookup
from llmlab.infer.sampling import probs_from_logits
from llmlab.infer.speculative import speculative_generate
from llmlab.model import ModelConfig, Transformer


def tiny(flavour: str, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    # Untied head: a tied, sharpened head just repeats the input token, and every draft would agree.
    model = Transformer(ModelConfig.preset(flavour, "tiny", tie_embeddings=False, **overrides)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(5)  # decisive greedy picks, far from ties
    return model


def perturbed(model: Transformer, noise: float, seed: int = 5) -> Transformer:
    """A draft that partly agrees with `model`: its weights plus noise of `noise` x each tensor's std."""
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise * p.std())
    return draft


PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


# ----- greedy: the same tokens as plain greedy decoding -----
@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_greedy_speculative_equals_plain_greedy(flavour):
    target = tiny(flavour)
    drafts = {"other": tiny(flavour, seed=1), "noisy": perturbed(target, 0.15), "self": target,
              "lookup": "lookup", "lookup+noisy": PromptLookup(fallback=perturbed(target, 0.15))}
    expected = generate(target, PROMPT, 40, temperature=0)
    rates = {}
    for k in (1, 2, 4, 7):
        for name, draft in drafts.items():
            out, stats = speculative_generate(target, draft, PROMPT, 40, temperature=0, speculate_k=k,
                                              return_stats=True)
            assert out.tolist() == expected.tolist(), (name, k)
            assert stats.generated == 40
            rates[name, k] = stats.acceptance_rate
        # generate() dispatches to the same code
        out = generate(target, PROMPT, 40, temperature=0, draft=drafts["noisy"], speculate_k=k)
        assert out.equal(expected)
    assert all(rates["self", k] == 1.0 for k in (1, 2, 4, 7))
    assert all(rates["other", k] < 0.2 for k in (1, 2, 4, 7))  # rejections happened and were repaired
    assert 0.05 < rates["noisy", 2] < 0.95


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_greedy_with_a_draft_confidence_is_still_exact(flavour):
    """Rounds whose guesses stop early (some rows, all rows, or none) still give the plain greedy tokens."""
    target = tiny(flavour)
    prompts = [[7, 8, 9], PROMPT, [42]]
    expected = generate(target, prompts, 30, temperature=0)
    proposed = {}
    for name, draft in (("noisy", perturbed(target, 0.15)), ("other", tiny(flavour, seed=1))):
        for conf in (0.01, 0.03, 0.9):
            for k in (1, 3, 6):
                out, stats = speculative_generate(target, draft, prompts, 30, temperature=0, speculate_k=k,
                                                  draft_confidence=conf, return_stats=True)
                assert out.equal(expected), (name, conf, k)
                proposed[name, conf, k] = stats.proposed / stats.row_rounds
    # a higher bar proposes fewer guesses per round
    assert proposed["noisy", 0.01, 6] > proposed["noisy", 0.03, 6] > proposed["noisy", 0.9, 6] == 0


def test_a_confidence_no_guess_reaches_is_plain_decoding():
    target = tiny("gpt2")
    out, stats = speculative_generate(target, perturbed(target, 0.15), PROMPT, 20, temperature=0,
                                      speculate_k=4, draft_confidence=1 - 1e-9, return_stats=True)
    assert out.equal(generate(target, PROMPT, 20, temperature=0))
    assert stats.proposed == 0 and stats.target_forwards == 1 + 20 and stats.draft_forwards == 1 + 20


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_greedy_batched_ragged_prompts(flavour):
    target = tiny(flavour)
    prompts = [[7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42], [5, 6, 5, 6, 5]]
    expected = generate(target, prompts, 25, temperature=0)
    for draft in (perturbed(target, 0.15), target, "lookup", PromptLookup(fallback=perturbed(target, 0.15))):
        for k in (1, 3, 6):
            out = speculative_generate(target, draft, prompts, 25, temperature=0, speculate_k=k)
            assert out.equal(expected), (draft if isinstance(draft, str) else "model", k)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])  # equal lengths as a tensor
    out = speculative_generate(target, target, ids, 10, temperature=0)
    assert out.equal(generate(target, ids, 10, temperature=0))


def test_stop_tokens_and_max_new_tokens_are_exact():
    target = tiny("llama")
    plain = generate(target, PROMPT, 30, temperature=0)
    stop = int(plain[len(PROMPT) + 11])  # a token the output reaches after 12 steps
    for draft in (target, perturbed(target, 0.15), "lookup", PromptLookup(fallback=perturbed(target, 0.15))):
        for n in range(7):  # all-accepted rounds would emit k+1 tokens: the last round must be cut
            out = speculative_generate(target, draft, PROMPT, n, temperature=0, speculate_k=4)
            assert out.tolist() == plain[: len(PROMPT) + n].tolist()
        out = speculative_generate(target, draft, PROMPT, 30, temperature=0, speculate_k=5, stop=stop)
        assert out.equal(generate(target, PROMPT, 30, temperature=0, stop=stop))
        assert int(out[-1]) == stop and stop not in out[len(PROMPT):-1].tolist()
    prompts = [PROMPT, [2, 7], [11, 12, 13, 14]]
    ref = generate(target, prompts, 20, temperature=0, stop=[stop, 17])
    for draft in (target, perturbed(target, 0.15), "lookup"):
        out = speculative_generate(target, draft, prompts, 20, temperature=0, stop=[stop, 17], speculate_k=3)
        assert out.equal(ref)


def test_lookup_then_draft_uses_each_proposer_where_it_fits():
    """Rounds where the context has a lookup match go to prompt lookup, the others to the draft; stats count
    both."""
    target = tiny("llama")
    looping = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]  # every context ends in a long match at first
    draft = perturbed(target, 0.15)
    out, stats = speculative_generate(target, PromptLookup(fallback=draft), looping, 30, temperature=0,
                                      speculate_k=4, return_stats=True)
    assert out.equal(generate(target, looping, 30, temperature=0))
    _, alone = speculative_generate(target, draft, looping, 30, temperature=0, speculate_k=4,
                                    return_stats=True)
    assert 0 < stats.lookup_rounds < stats.rounds
    assert 0 < stats.draft_forwards < alone.draft_forwards


def test_stats_with_a_draft_that_always_agrees():
    target = tiny("gpt2")
    _, stats = speculative_generate(target, target, PROMPT, 20, temperature=0, speculate_k=4,
                                    return_stats=True)
    # 4 rounds of 4 accepted guesses + 1 bonus token; plus the prompt prefill.
    assert (stats.rounds, stats.target_forwards, stats.accepted, stats.proposed) == (4, 5, 16, 16)
    assert stats.draft_forwards == 1 + 4 * 4
    assert stats.acceptance_rate == 1.0 and stats.mean_accepted_length == 4.0
    assert stats.target_forwards_per_token == 5 / 20
    assert stats.as_dict()["target_forwards_per_token"] == 0.25
    _, stats = speculative_generate(target, target, [PROMPT, PROMPT[:3]], 20, temperature=0,
                                    return_stats=True)
    assert stats.rows == 2 and stats.generated == 40 and stats.target_forwards_per_token == 5 / 20


# ----- prompt lookup -----
def test_prompt_lookup_proposals():
    lookup = PromptLookup()  # n-grams of 4 down to 1, K tokens copied on any match
    assert lookup.index([1, 2, 3, 4, 5, 9, 1, 2, 3]).match() == (3, 3)
    assert lookup.propose([1, 2, 3, 4, 5, 9, 1, 2, 3], 4) == [4, 5, 9, 1]  # what followed "1 2 3"
    # the copy runs into the end of the context and goes on from the tokens it just proposed
    assert lookup.propose([1, 2, 3, 4, 5, 9, 1, 2, 3], 8) == [4, 5, 9, 1, 2, 3, 4, 5]
    assert lookup.propose([7, 8, 7, 8, 7, 8], 7) == [7, 8, 7, 8, 7, 8, 7]  # a loop keeps copying past the end
    assert lookup.propose([6, 1, 2, 9, 1, 2], 3) == [9, 1, 2]  # 2-gram match
    assert lookup.propose([1, 2, 3, 4], 4) == []  # nothing recurs
    # A 1-gram falls back when no longer n-gram recurs; the most recent occurrence wins.
    assert lookup.index([5, 1, 6, 2, 5, 3, 5]).match() == (5, 1)
    assert lookup.propose([5, 1, 6, 2, 5, 3, 5], 2) == [3, 5]
    assert PromptLookup(3, 2).index([5, 1, 6, 2, 5, 3, 5]).match() == (-1, 0)
    # Growing the index token by token gives the same answers as building it at once.
    seq = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9, 5]
    grown = lookup.index(seq[:1])
    for i in range(1, len(seq)):
        grown.extend(seq[i:i + 1])
        assert grown.propose(5) == lookup.propose(seq[:i + 1], 5) == brute_force_lookup(seq[:i + 1], 5)


def brute_force_lookup(seq: list[int], K: int) -> list[int]:
    """The rule written out as a scan: largest n-gram first, most recent earlier occurrence, recursive
    copy."""
    for g in (4, 3, 2, 1):
        if len(seq) <= g:
            continue
        starts = [i for i in range(len(seq) - g) if seq[i:i + g] == seq[-g:]]
        if starts:
            ext = list(seq)
            for j in range(K):
                ext.append(ext[starts[-1] + g + j])
            return ext[len(seq):]
    return []


def test_prompt_lookup_saves_target_forwards_on_repetitive_text():
    target = tiny("llama")
    loop = [10, 20, 30, 40, 50] * 4
    ids = generate(target, loop, 40, temperature=0)
    out, stats = speculative_generate(target, PromptLookup(), loop, 40, temperature=0, speculate_k=4,
                                      return_stats=True)
    assert out.equal(ids) and stats.draft_forwards == 0
    assert stats.proposed > 0 and stats.target_forwards < 41


# ----- sampling: the exact distribution -----
@pytest.mark.parametrize("one_hot_q", [False, True])
def test_one_round_output_distribution_equals_p_exactly(one_hot_q):
    """P(first emitted token = x) = sum_d q(d) [a(d) 1{x = d} + (1 - a(d)) residual_d(x)], a = min(1, p/q)."""
    gen = torch.Generator().manual_seed(0)
    V = 12
    for trial in range(20):
        p = torch.softmax(torch.randn(V, generator=gen) * 2, -1)
        p[trial % V] = 0  # tokens the transform (top-k / top-p) removed
        p /= p.sum()
        q = torch.softmax(torch.randn(V, generator=gen) * 2, -1)
        if one_hot_q:  # prompt lookup: a deterministic proposal d
            guesses = [(int(torch.randint(V, (1,), generator=gen)), 1.0)]
        else:
            guesses = [(d, float(q[d])) for d in range(V)]
        dist = torch.zeros(V, dtype=torch.float64)
        for d, q_d in guesses:
            q_vec = torch.zeros(V).scatter_(0, torch.tensor([d]), 1.0) if one_hot_q else q
            a = float(spec.accept_probability(p[d], torch.tensor(q_d)))
            dist[d] += q_d * a
            dist += q_d * (1 - a) * spec.residual_distribution(p, q_vec).double()
        torch.testing.assert_close(dist, p.double(), rtol=0, atol=1e-6)


V_SMALL, N_NEW, N_SAMPLES = 8, 3, 8000
SMALL_PROMPT = [1, 2, 3, 1, 2]


@pytest.fixture(scope="module")
def small_pair():
    """A vocab-8 target and a draft that partly agrees with it (acceptance ~0.75 at temperature 1)."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("llama", "tiny", vocab_size=V_SMALL, d_model=32, n_head=2, block_size=16)
    target = Transformer(cfg).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(6)
    return target, perturbed(target, 0.5)


def exact_joint(model, opts) -> torch.Tensor:
    """P(next N_NEW tokens = s) for all V^N_NEW sequences s, by enumeration."""
    seqs = torch.tensor(list(itertools.product(range(V_SMALL), repeat=N_NEW)))
    full = torch.cat([torch.tensor(SMALL_PROMPT).expand(len(seqs), -1), seqs], 1)
    with torch.no_grad():
        p = probs_from_logits(model(full[:, :-1])[:, len(SMALL_PROMPT) - 1:], **opts)
    return p.gather(-1, seqs[..., None]).squeeze(-1).double().prod(-1)


def chi_square(out: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """(statistic, threshold): Pearson's chi-square of the sampled sequences against `probs`, cells with an
    expected count < 5 pooled; threshold = df + 5 sqrt(2 df), about 5 standard deviations above the mean
    under the null. A sequence of probability 0 counts as infinite."""
    idx = (out[:, len(SMALL_PROMPT):] * V_SMALL ** torch.arange(N_NEW - 1, -1, -1)).sum(1)
    counts = torch.bincount(idx, minlength=V_SMALL ** N_NEW).double()
    if counts[probs == 0].sum() > 0:
        return float("inf"), 0.0
    expected = probs * len(out)
    big, small = expected >= 5, (expected < 5) & (probs > 0)
    obs = torch.cat([counts[big], counts[small].sum()[None]])
    exp = torch.cat([expected[big], expected[small].sum()[None]])
    keep = exp > 0
    stat = float(((obs - exp)[keep] ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    return stat, df + 5 * (2 * df) ** 0.5


SAMPLING = [
    ("draft", dict(temperature=1.0)),
    ("draft@0.25", dict(temperature=1.0)),  # guesses stop where the draft's top probability is below 0.25
    ("draft", dict(temperature=1.0, top_k=3)),
    ("lookup", dict(temperature=1.0)),
    ("lookup", dict(temperature=0.8, top_p=0.9)),
    ("lookup+draft", dict(temperature=1.0)),
]


@pytest.mark.parametrize("proposer,opts", SAMPLING)
def test_sampled_tokens_follow_the_plain_sampling_distribution(small_pair, proposer, opts):
    target, draft = small_pair
    probs = exact_joint(target, opts)
    ids = torch.tensor(SMALL_PROMPT).expand(N_SAMPLES, -1)  # independent rows, one batch
    stat, threshold = chi_square(generate(target, ids, N_NEW, seed=1, **opts), probs)
    assert stat < threshold  # the harness itself: plain sampling passes
    confidence = float(proposer.split("@")[1]) if "@" in proposer else None
    proposers = {"lookup": "lookup", "lookup+draft": PromptLookup(fallback=draft)}
    out, stats = speculative_generate(target, proposers.get(proposer, draft), ids, N_NEW, seed=1,
                                      speculate_k=2, draft_confidence=confidence, return_stats=True, **opts)
    assert 0.05 < stats.acceptance_rate < 0.95  # both accept and reject paths are exercised
    if confidence is not None:  # rounds with fewer guesses than speculate_k happened
        assert 0.1 < stats.proposed / (2 * stats.row_rounds) < 0.95
    stat, threshold = chi_square(out, probs)
    assert stat < threshold, (stat, threshold)


@pytest.mark.parametrize("proposer", ["draft", "lookup"])
@pytest.mark.parametrize("broken", ["always_accept", "resample_from_p"])
def test_a_wrong_acceptance_rule_fails_the_distribution_test(small_pair, monkeypatch, proposer, broken):
    """Negative control: the chi-square test has the power to see a subtly wrong rule."""
    target, draft = small_pair
    opts = dict(temperature=1.0)
    if broken == "always_accept":
        monkeypatch.setattr(spec, "accept_probability", lambda px, qx: torch.ones_like(px))
    else:
        monkeypatch.setattr(spec, "residual_distribution", lambda p, q: p)
    ids = torch.tensor(SMALL_PROMPT).expand(N_SAMPLES, -1)
    out = speculative_generate(target, draft if proposer == "draft" else "lookup", ids, N_NEW, seed=1,
                               speculate_k=2, **opts)
    stat, threshold = chi_square(out, exact_joint(target, opts))
    assert stat > 1.5 * threshold, (stat, threshold)  # the correct rule scores below 1.0x


def test_sampling_is_reproducible_with_a_seed(small_pair):
    target, draft = small_pair
    ids = torch.tensor(SMALL_PROMPT).expand(50, -1)
    a = speculative_generate(target, draft, ids, 6, seed=7, speculate_k=3)
    assert a.equal(speculative_generate(target, draft, ids, 6, seed=7, speculate_k=3))
    assert not a.equal(speculative_generate(target, draft, ids, 6, seed=8, speculate_k=3))


# ----- bad input -----
def test_bad_speculative_input_is_one_clear_error():
    target = tiny("gpt2")
    with pytest.raises(ModelError, match=r"draft model's vocabulary has 300 tokens but the target's has 256"):
        generate(target, PROMPT, 5, draft=tiny("gpt2", vocab_size=300))
    for k in (0, -1, True, 2.5):
        with pytest.raises(ConfigError, match=r"speculate_k=.* must be an integer >= 1"):
            generate(target, PROMPT, 5, draft=target, speculate_k=k)
    with pytest.raises(ModelError, match=r"draft model's context \(block_size 16\) is shorter .* \(18\)"):
        generate(target, PROMPT, 10, draft=tiny("gpt2", block_size=16))
    with pytest.raises(ModelError, match=r"draft model's vocabulary has 300 tokens"):  # a lookup fallback too
        generate(target, PROMPT, 5, draft=PromptLookup(fallback=tiny("gpt2", vocab_size=300)))
    with pytest.raises(ModelError, match="draft='ngram' is not a model"):
        generate(target, PROMPT, 5, draft="ngram")
    with pytest.raises(ConfigError, match="min_ngram=3 exceeds max_ngram=2"):
        PromptLookup(max_ngram=2, min_ngram=3)
    with pytest.raises(ModelError, match="prompt is empty"):  # the usual prompt checks apply
        generate(target, [], 5, draft=target)
    for conf in (0, 1, 1.5, True, "high"):
        with pytest.raises(ConfigError,
                           match=r"draft_confidence=.* must be a probability strictly between 0 and 1"):
            generate(target, PROMPT, 5, draft=target, draft_confidence=conf)
    with pytest.raises(ConfigError, match="prompt lookup has no probabilities"):
        generate(target, PROMPT, 5, draft="lookup", draft_confidence=0.5)
    with pytest.raises(ConfigError, match="needs a draft model"):
        generate(target, PROMPT, 5, draft_confidence=0.5)


def test_tokenizers_of_equal_size_are_compared_token_by_token(tmp_path, small_corpus):
    from llmlab.tokenizer import Tokenizer
    from llmlab.tokenizer.identity import check_same_tokenizer, fingerprint

    a = Tokenizer.train(small_corpus, vocab_size=280, progress=False, workers=1)
    b = Tokenizer.train(small_corpus[::-1][:2], vocab_size=280, progress=False, workers=1)
    assert a.vocab_size == b.vocab_size == 280
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    a.save(tmp_path / "a2")
    check_same_tokenizer(tmp_path / "a", tmp_path / "a2")  # same tokenizer: fine
    assert fingerprint(a) == fingerprint(Tokenizer.load(tmp_path / "a2")) != fingerprint(b)
    with pytest.raises(TokenizerError,
                       match=r"differs from the target's .*\(token \d+ is b'.*' vs the target's b'"):
        check_same_tokenizer(tmp_path / "a", tmp_path / "b")
    check_same_tokenizer(tmp_path / "a", tmp_path / "missing")  # nothing to compare: vocab check only


@pytest.fixture
def checkpoints(tmp_path, small_corpus):
    from llmlab.tokenizer import Tokenizer

    tok = Tokenizer.train(small_corpus, vocab_size=300, progress=False, workers=1)
    other = Tokenizer.train(small_corpus[:2], vocab_size=300, progress=False, workers=1)
    paths = {}
    for name, seed, vocab, t in [("target", 0, tok.vocab_size, tok), ("draft", 1, tok.vocab_size, tok),
                                 ("wrong_vocab", 2, tok.vocab_size + 8, tok),
                                 ("wrong_tokenizer", 3, tok.vocab_size, other)]:
        tiny("gpt2", seed=seed, vocab_size=vocab).save(tmp_path / name)
        t.save(tmp_path / name / "tokenizer")
        paths[name] = str(tmp_path / name)
    return paths


def test_cli_speculative_greedy_prints_the_plain_greedy_text(checkpoints, capsys):
    base = ["generate", checkpoints["target"], "--prompt", "The quick", "--temperature", "0",
            "--max-new-tokens", "12", "--ignore-eos"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    for extra in (["--draft", checkpoints["draft"], "--speculate-k", "3"], ["--lookup"],
                  ["--draft", checkpoints["draft"], "--draft-confidence", "0.3"],
                  ["--lookup", "--draft", checkpoints["draft"]]):
        assert main(base + extra) == 0
        assert capsys.readouterr().out == plain


@pytest.mark.parametrize("extra,match", [
    (lambda c: ["--draft", c["wrong_vocab"]], "draft model's vocabulary has"),
    (lambda c: ["--draft", c["wrong_tokenizer"]], "tokenizer differs from the target's"),
    (lambda c: ["--draft", c["draft"], "--speculate-k", "0"], "--speculate-k: 0 is out of range"),
    (lambda c: ["--lookup", "--speculate-k", "-2"], "--speculate-k: -2 is out of range"),
    (lambda c: ["--lookup", "--draft", c["wrong_vocab"]], "draft model's vocabulary has"),
    (lambda c: ["--draft", c["target"] + "-missing"], "does not exist"),
    (lambda c: ["--draft-confidence", "0.5"], "needs --draft CKPT"),
    (lambda c: ["--draft", c["draft"], "--draft-confidence", "2"], "--draft-confidence: 2 is out of range"),
    (lambda c: ["--draft", c["draft"], "--draft-confidence", "1"],
     "draft_confidence=1.0 must be a probability"),
])
def test_cli_bad_speculative_input_is_one_line_exit_2(checkpoints, capsys, extra, match):
    """One line naming the problem; an option refused while parsing adds the line pointing at --help."""
    assert main(["generate", checkpoints["target"], "--prompt", "a", *extra(checkpoints)]) == 2
    captured = capsys.readouterr()
    first, *hint = captured.err.splitlines()
    assert captured.out == "" and match in first
    assert hint in ([], ["llmlab: see 'llmlab generate --help'"])

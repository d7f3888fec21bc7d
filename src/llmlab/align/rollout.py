"""Rollouts for RL fine-tuning: sample responses to a batch of prompts, then score every sampled token.

    ro = rollout(policy, prompts, stop_ids=tok.chat_template.stop_ids, pad_id=tok.chat_template.pad_id,
                 max_new_tokens=64, seed=step, reference=ref, reward_model=rm, missing_eos_penalty=1.0)
    ro.responses [B, R], ro.mask [B, R], ro.logprobs / ro.ref_logprobs [B, R], ro.scores [B], ro.ended [B]

Sampling uses the KV-cache generator (llmlab.infer.generate.sample_with_logprobs) on prompts of any
lengths: it prefills each distinct prompt once and starts each row after its own prompt, so a row samples
what it would alone. A
response ends right after its first stop id (the chat template's end-of-turn, kept in the response) or at
max_new_tokens; `ended` says which rows ended on a stop id. The sampler hands back each sampled token's
log-probability under the policy that drew it, so the old policy's log-probs cost no second forward.

Layout. Row b of `sequences` [B, W] is prompt_b followed by response_b, then `pad_id`; response-aligned
tensors [B, R] follow llmlab.align.rl's layout (`mask` is 1 on the n_b real tokens of row b). The response's
token t is predicted from the token before it: the prompt's last token for t = 0.

Packed forwards. The forwards after sampling (reference, reward and value models; the policy's trainable
pass in the update) do not run on the padded `sequences`: `pack` lays the rows out as one ragged row without
padding (llmlab.model.transformer.RaggedLayout). Rows with the same prompt (GRPO's group) share one copy of
it: prompt[:-1] once, then one segment per response, [prompt[-1], response tokens], each segment attending
the shared prompt and itself only, positions continuing from the prompt's, so every token is computed
exactly as in its own padded row. The forward returns only the outputs read (the positions predicting
response tokens, or each response's last token for a reward model), so its last layer skips the rest. A
module that is not an llmlab Transformer (a hand-written reward function) gets the padded rows instead.

Log-probabilities are those of the distribution the tokens were sampled from before any top-k/top-p:
softmax(logits / temperature), for the sampler, the reference and the update alike (as TRL), so PPO's ratio
starts at 1 and the KL compares like with like; temperature 0 (greedy) means the raw logits. Every forward
here runs without gradients; the policy's trainable pass during the update goes through
`response_logprobs` with the same layout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import nn

from llmlab.data.chat_data import iter_records
from llmlab.data.tasks import TaskExample, grade, read_prompt_set
from llmlab.errors import ConfigError, DataError, LLMLabError, ModelError
from llmlab.infer.generate import generate, sample_with_logprobs
from llmlab.model import Transformer
from llmlab.model.transformer import RaggedLayout
from llmlab.train.checkpoint import unwrap
from llmlab.train.objective import Objective


@dataclass
class Rollout:
    """One batch of sampled responses and what was measured about them (module docstring for the layout)."""

    sequences: torch.Tensor            # [B, W] prompt + response + pad_id, right-padded
    prompt_lengths: torch.Tensor       # [B]
    responses: torch.Tensor            # [B, R] response tokens, pad_id after each row's end
    mask: torch.Tensor                 # [B, R] float, 1 on real response tokens
    ended: torch.Tensor                # [B] bool: the response ended on a stop id (not at the length limit)
    logprobs: torch.Tensor             # [B, R] policy log p of each sampled token (0 on padding)
    ref_logprobs: torch.Tensor | None = None   # [B, R] the reference model's (0 on padding)
    scores: torch.Tensor | None = None         # [B] reward-model score at the last real token (+ penalty)
    hidden: torch.Tensor | None = None         # [B, R, d_model] the sampler's hidden states that drew each
                                               # token (rollout(..., hidden=True); 0 on padding)

    @property
    def columns(self) -> torch.Tensor:
        """[B, R]: where response token t's prediction sits in a forward over sequences[:, :-1]."""
        return response_columns(self.prompt_lengths, self.responses.shape[1])

    @property
    def lengths(self) -> torch.Tensor:
        """[B] response lengths in tokens."""
        return self.mask.sum(dim=1).long()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name (what an objective's buffer keeps)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def select(self, rows: torch.Tensor) -> Rollout:
        """The rollout restricted to `rows` (a minibatch), every per-row tensor indexed alike."""
        return Rollout(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
                          for f in fields(self)})


def response_columns(prompt_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width]: column prompt_lengths[b] - 1 + t, where the prediction of response token t sits."""
    return prompt_lengths[:, None] - 1 + torch.arange(width, device=prompt_lengths.device)


# ----- packed rows -----
@dataclass
class Packed:
    """A rollout's rows laid out as one ragged row without padding (module docstring): the inputs of one
    forward, and where to read its outputs back (the forward returns only the K outputs asked for)."""

    idx: torch.Tensor                 # [1, N] tokens
    layout: RaggedLayout              # which tokens attend which, and whose outputs are wanted
    targets: torch.Tensor | None      # [1, K] the response token each output predicts (read="predictions")
    where: torch.Tensor | None        # [B, R] output index predicting response token t (0 on padding)
    last: torch.Tensor | None         # [B] output index of each response's last token (read="last")

    def gather(self, outputs: torch.Tensor) -> torch.Tensor:
        """[B, R]: a forward's outputs [1, K] at the positions predicting response tokens."""
        return outputs.reshape(-1)[self.where]


def pack(ro: Rollout, read: Literal["predictions", "last"] = "predictions") -> Packed:
    """The rows of `ro` as one ragged row, each distinct prompt once (module docstring). read="predictions":
    the input ends at each response's last predicting position and the forward returns the outputs that
    predict response tokens; read="last": the input holds each response's last token too and the forward
    returns that token's output alone (where a reward model's score is read)."""
    last_only = read == "last"
    seqs = ro.sequences.tolist()
    plens, rlens = ro.prompt_lengths.tolist(), ro.lengths.tolist()
    groups: dict[tuple[int, ...], list[int]] = {}
    for b, (seq, p) in enumerate(zip(seqs, plens, strict=True)):
        groups.setdefault(tuple(seq[: p - 1]), []).append(b)
    tokens: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    outputs: list[int] = []
    rows: list[tuple[list[int], list[int]]] = []   # per response: (query tokens, key tokens)
    first = [0] * len(seqs)                          # each response's first output index
    for prefix, members in groups.items():
        shared = list(range(len(tokens), len(tokens) + len(prefix)))
        tokens += prefix
        positions += range(len(prefix))
        for k, b in enumerate(members):
            p, n = plens[b], rlens[b]
            response = seqs[b][p: p + n]
            segment = [seqs[b][p - 1]] + response[: n - 1 + last_only]
            own = list(range(len(tokens), len(tokens) + len(segment)))
            tokens += segment
            positions += range(p - 1, p - 1 + len(segment))
            rows.append(((shared if k == 0 else []) + own, shared + own))  # the prompt's queries once
            first[b] = len(outputs)
            outputs += own[-1:] if last_only else own
            targets += [] if last_only else response
    device = ro.sequences.device
    starts = torch.tensor(first, device=device)
    where = starts[:, None] + torch.arange(ro.mask.shape[1], device=device)
    return Packed(torch.tensor([tokens], device=device),
                  RaggedLayout.build(positions, rows, device, outputs=outputs),
                  None if last_only else torch.tensor([targets], device=device),
                  None if last_only else torch.where(ro.mask.bool(), where, 0),
                  starts if last_only else None)


def packable(model: nn.Module) -> bool:
    """Whether `model` takes packed rows (an llmlab Transformer; a hand-written scorer gets padded ones)."""
    return isinstance(unwrap(model), Transformer)


# ----- scoring -----
def response_logprobs(model: nn.Module, ro: Rollout, temperature: float = 1.0,
                      packed: Packed | None = None) -> torch.Tensor:
    """[B, R] log p(response token t | prompt, earlier response tokens) under `model` at `temperature`
    (0 on padding), from ragged rows (`packed`, or packed here).

    Goes through model(...), so it is the trainable pass under DDP too (no_grad is the caller's)."""
    temperature = temperature or 1.0
    packed = packed if packed is not None else pack(ro)
    logprobs = model(packed.idx, targets=packed.targets, output="logprobs", temperature=temperature,
                     layout=packed.layout)
    return packed.gather(logprobs) * ro.mask


def response_values(model: nn.Module, ro: Rollout, packed: Packed | None = None) -> torch.Tensor:
    """[B, R] a scalar-head model's value of each response token's state: its output at the position that
    predicts the token (the prompt's last token for t = 0), 0 on padding."""
    if not packable(model):
        values = model(ro.sequences[:, :-1], output="scores")
        return at_response(values.float(), ro) * ro.mask
    packed = packed if packed is not None else pack(ro)
    return packed.gather(model(packed.idx, output="scores", layout=packed.layout).float()) * ro.mask


def last_token_scores(model: nn.Module, ro: Rollout, packed: Packed | None = None) -> torch.Tensor:
    """[B] a scalar-head model's output at each sequence's last real token (the response's last token);
    `packed` must come from pack(ro, read="last")."""
    if not packable(model):
        scores = model(ro.sequences, output="scores").float()
        last = ro.prompt_lengths + ro.lengths - 1
        return scores[torch.arange(scores.shape[0], device=scores.device), last]
    packed = packed if packed is not None else pack(ro, read="last")
    return model(packed.idx, output="scores", layout=packed.layout).float().reshape(-1)[packed.last]


def at_response(per_position: torch.Tensor, ro: Rollout) -> torch.Tensor:
    """[B, R]: a forward's per-position output over sequences[:, :-1] [B, W-1] read at ro.columns."""
    columns = ro.columns.clamp(max=per_position.shape[1] - 1)  # padding columns past the end: masked anyway
    return per_position.gather(1, columns)


def sample_responses(policy: nn.Module, prompts: Sequence[Sequence[int]], *, stop_ids: Sequence[int],
                     pad_id: int, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None, seed: int | None = None, logprobs: bool = False,
                     hidden: bool = False) -> dict[str, torch.Tensor]:
    """Sample one response per prompt -> sequences, prompt_lengths, responses, mask, ended (see Rollout);
    with logprobs also the sampled tokens' log-probs [B, R] under the policy (module docstring), with
    hidden also the hidden states [B, R, d_model] that drew them."""
    if not prompts:
        raise ModelError("no prompts to roll out; give at least one")
    if max_new_tokens < 1:
        raise ModelError(f"max_new_tokens={max_new_tokens} leaves no room for a response; use at least 1")
    model = unwrap(policy)
    rows = [list(p) for p in prompts]
    # pad -1 is never a token, so it marks where each row's response ends; replaced by pad_id below.
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=list(stop_ids),
                   pad_id=-1)
    if logprobs or hidden:
        out, token_logprobs, states = sample_with_logprobs(model, rows, max_new_tokens, hidden=hidden,
                                                           **options)
    else:
        out = generate(model, rows, max_new_tokens, **options)
    out = out.clone()  # generate runs in inference mode; a plain tensor can feed autograd passes later
    if out.dim() == 1:
        out = out[None]
    device = out.device
    prompt_lengths = torch.tensor([len(p) for p in rows], device=device)
    real = out != -1
    n_resp = real.sum(dim=1) - prompt_lengths
    width = int(n_resp.max())
    cols = prompt_lengths[:, None] + torch.arange(width, device=device)
    mask = (torch.arange(width, device=device) < n_resp[:, None])
    responses = out.gather(1, cols.clamp(max=out.shape[1] - 1)).masked_fill(~mask, pad_id)
    last = responses.gather(1, (n_resp - 1)[:, None]).squeeze(1)
    ended = torch.isin(last, torch.tensor(list(stop_ids), device=device))
    sequences = out.masked_fill(~real, pad_id)[:, : int((prompt_lengths + n_resp).max())]
    sampled = {"sequences": sequences, "prompt_lengths": prompt_lengths, "responses": responses,
               "mask": mask.float(), "ended": ended}
    if logprobs:
        sampled["logprobs"] = token_logprobs[:, :width].clone() * mask
    if hidden:
        sampled["hidden"] = states[:, :width].clone() * mask[..., None]
    return sampled


@torch.no_grad()
def rollout(policy: nn.Module, prompts: Sequence[Sequence[int]], *, stop_ids: Sequence[int], pad_id: int,
            max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
            top_p: float | None = None, seed: int | None = None, reference: nn.Module | None = None,
            reward_model: nn.Module | None = None, missing_eos_penalty: float | None = None,
            timings: dict[str, float] | None = None, hidden: bool = False) -> Rollout:
    """Sample a response to each prompt and score it: the policy's log-probs of the sampled tokens (from
    the sampler), the reference's, and the reward model's score at the last real token, minus
    `missing_eos_penalty` for a response that reached max_new_tokens without a stop id (TRL's
    missing_eos_penalty). `timings`, if given, receives the seconds spent sampling ("time/sample_s") and
    scoring ("time/score_s"); with `hidden` the rollout keeps the sampler's hidden states (a value head's
    input)."""
    start = time.perf_counter()
    sampled = sample_responses(policy, prompts, stop_ids=stop_ids, pad_id=pad_id,
                               max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=seed, logprobs=True, hidden=hidden)
    sampled_at = time.perf_counter()
    ro = Rollout(**sampled)
    if reference is not None:
        with _eval_mode(reference):
            ro.ref_logprobs = response_logprobs(unwrap(reference), ro, temperature)
    if reward_model is not None:
        with _eval_mode(reward_model):
            scores = last_token_scores(unwrap(reward_model), ro)
        if missing_eos_penalty:
            scores = scores - missing_eos_penalty * (~ro.ended).float()
        ro.scores = scores
    if timings is not None:
        timings["time/sample_s"] = sampled_at - start
        timings["time/score_s"] = time.perf_counter() - sampled_at
    return ro


class _eval_mode:
    """Dropout off for a measurement pass; the module's mode restored after."""

    def __init__(self, module: nn.Module):
        self.module, self.was_training = module, module.training

    def __enter__(self):
        self.module.eval()

    def __exit__(self, *exc):
        self.module.train(self.was_training)


# ----- what the RL objectives feed the trainer -----
class PromptStream:
    """Which prompts each rollout samples: epoch e visits the n prompts in a permutation drawn from
    (seed, e), and rollout i takes stream entries [i * batch_size, (i + 1) * batch_size), so a rollout's
    prompts are a pure function of its index (resuming needs only the index)."""

    def __init__(self, n: int, batch_size: int, seed: int = 0):
        if n < 1:
            raise ModelError("no prompts to roll out; give a prompt file with at least one record")
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def _epoch(self, e: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + e)
        return torch.randperm(self.n, generator=generator).tolist()

    def batch(self, i: int) -> list[int]:
        start = i * self.batch_size
        out, epoch, order = [], None, []
        for pos in range(start, start + self.batch_size):
            if pos // self.n != epoch:
                epoch = pos // self.n
                order = self._epoch(epoch)
            out.append(order[pos % self.n])
        return out


class MinibatchQueue:
    """The trainer's batch source for an RL objective: row indices into the current rollout batch.

    fill() queues `epochs` passes over the rows, each a fresh permutation split into `num_minibatches`
    minibatches (one optimizer step each) of `accum` micro-batches (the trainer's accum_steps), so one
    rollout batch is worth epochs * num_minibatches optimizer steps. next_batch() pops the next micro-batch.
    """

    def __init__(self):
        self.items: list[torch.Tensor] = []

    def fill(self, n_rows: int, epochs: int, num_minibatches: int, accum: int, seed: int) -> None:
        if n_rows % (num_minibatches * accum):
            raise ConfigError(f"a rollout batch of {n_rows} samples does not split into {num_minibatches} "
                             f"minibatches of {accum} micro-batches; make the batch a multiple of "
                             f"{num_minibatches * accum}")
        generator = torch.Generator().manual_seed(seed)
        micro = n_rows // (num_minibatches * accum)
        self.items = [part for _ in range(epochs)
                      for part in torch.randperm(n_rows, generator=generator).split(micro)]

    @property
    def empty(self) -> bool:
        return not self.items

    def next_batch(self) -> torch.Tensor:
        if not self.items:
            raise RuntimeError("the rollout batch is used up; the objective's prepare_step refills it")
        return self.items.pop(0)

    def state_dict(self) -> dict:
        return {"items": list(self.items)}

    def load_state_dict(self, state: dict) -> None:
        self.items = list(state["items"])



class RolloutObjective(Objective):
    """What PPO and GRPO share as objectives: their prompts, reference, sampling ends and evaluator, each
    rank's rollout numbering, refilling the minibatch queue with a fresh rollout batch when it runs dry, and
    the state that resumes mid-batch. Subclasses implement collect(model)."""

    def __init__(self, prompts: Sequence[Sequence[int]], reference: nn.Module, cfg, prompts_per_rollout: int,
                 *, stop_ids: Sequence[int], pad_id: int, accum_steps: int, evaluator, rank: int,
                 world_size: int):
        self.prompts = [list(p) for p in prompts]
        self.reference, self.evaluator = reference, evaluator
        self.cfg, self.stop_ids, self.pad_id, self.accum = cfg, list(stop_ids), pad_id, accum_steps
        self.stream = PromptStream(len(self.prompts), prompts_per_rollout, cfg.seed)
        self.batches = MinibatchQueue()
        self.rank, self.world_size = rank, world_size
        self.rollouts = 0                      # rollout batches collected so far
        self.buffer: dict[str, torch.Tensor] = {}
        self.stats: dict[str, float] = {}

    def _index(self) -> int:
        """This rank's rollout number: under DDP every rank rolls out its own prompts and seeds."""
        return self.rollouts * self.world_size + self.rank

    def prepare_step(self, trainer) -> None:
        if self.batches.empty:
            with trainer.autocast():  # the rollout's log-probs in the update's precision: ratio 1 at start
                self.collect(trainer.model)

    def state_dict(self) -> dict:
        return {"rollouts": self.rollouts, "buffer": {k: v for k, v in self.buffer.items() if v is not None},
                "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        self.rollouts = int(state["rollouts"])
        self.buffer = dict(state["buffer"])
        self.stats = {k: float(v) for k, v in state["stats"].items()}

# ----- prompt files -----
def read_prompt_messages(path) -> list[tuple[str, list[dict]]]:
    """(where, messages) for every record of a prompt-only file (TRL's format): {"prompt": text} (one user
    turn) or {"prompt": [messages]}; other keys are ignored. DataError "FILE:LINE: ..." for a bad record."""
    items = []
    for where, record in iter_records(path):
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list) or not prompt:
            raise DataError(f"{where}: field prompt must be a non-empty string or a list of messages; "
                            "write records like {\"prompt\": \"...\"} (TRL's prompt-only format)")
        items.append((where, prompt))
    if not items:
        raise DataError(f"{path} holds no prompts; write one {{\"prompt\": ...}} record per line")
    return items


def encode_prompts(tok, items: Sequence[tuple[str, list[dict]]], block_size: int, max_new_tokens: int,
                   length_key: str) -> list[list[int]]:
    """Each (where, messages) rendered with the chat template, ending with the assistant header; DataError
    naming the record for a bad message or a prompt that leaves no room for max_new_tokens in the context
    (`length_key` names the setting that asks for them)."""
    room = block_size - max_new_tokens
    if room < 1:
        raise ConfigError(f"{length_key}={max_new_tokens} leaves no room for a prompt in the policy's "
                          f"context of {block_size} tokens; lower it")
    out = []
    for where, messages in items:
        try:
            ids, _ = tok.apply_chat_template(messages, add_generation_prompt=True)
        except LLMLabError as e:
            raise DataError(f"{where}: {e}") from None
        if len(ids) > room:
            raise DataError(f"{where}: the prompt has {len(ids)} tokens but the policy's context of "
                            f"{block_size} tokens leaves {room} beside {length_key}={max_new_tokens}; "
                            f"shorten the prompt or lower {length_key}")
        out.append(ids)
    return out


# ----- rewards a program can check -----
RewardFn = Callable[[list[int], Rollout], torch.Tensor]   # (prompt index per row, rollout) -> rewards [B]


def grader_reward(tok, examples: Sequence[TaskExample]) -> RewardFn:
    """1.0 for a response whose text (up to its end-of-turn) grades as correct for its example, else 0."""
    stop_ids = set(tok.chat_template.stop_ids)

    def reward(indices: list[int], ro: Rollout) -> torch.Tensor:
        values = []
        for b, i in enumerate(indices):
            ids = [t for t in ro.responses[b, : int(ro.lengths[b])].tolist() if t not in stop_ids]
            values.append(float(grade(examples[i].task, examples[i], tok.decode(ids))))
        return torch.tensor(values, device=ro.responses.device)

    return reward


class TaskEval:
    """The true accuracy a reward model only stands in for: greedy answers to held-out task prompts, graded.

    Called with the policy -> {"val_accuracy": share graded correct, "val_length": mean response tokens,
    "val_ended": share of responses that ended on a stop id}."""

    def __init__(self, tok, examples: Sequence[TaskExample], prompts: Sequence[Sequence[int]], *,
                 stop_ids: Sequence[int], pad_id: int, max_new_tokens: int, batch_size: int = 64):
        if len(examples) != len(prompts) or not prompts:
            raise ValueError(f"{len(examples)} examples, {len(prompts)} prompts: give one prompt per example")
        self.grader, self.prompts = grader_reward(tok, examples), [list(p) for p in prompts]
        self.stop_ids, self.pad_id = list(stop_ids), pad_id
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    @torch.no_grad()
    def __call__(self, policy: nn.Module) -> dict[str, float]:
        correct = length = ended = 0.0
        for start in range(0, len(self.prompts), self.batch_size):
            chunk = self.prompts[start:start + self.batch_size]
            sampled = sample_responses(policy, chunk, stop_ids=self.stop_ids, pad_id=self.pad_id,
                                       max_new_tokens=self.max_new_tokens, temperature=0)
            ro = Rollout(**sampled, logprobs=torch.zeros_like(sampled["mask"]))
            correct += float(self.grader(list(range(start, start + len(chunk))), ro).sum())
            length += float(ro.mask.sum())
            ended += float(ro.ended.sum())
        n = len(self.prompts)
        return {"val_accuracy": correct / n, "val_length": length / n, "val_ended": ended / n}


def task_prompts(tok, path, block_size: int, max_new_tokens: int, length_key: str
                 ) -> tuple[list[TaskExample], list[list[int]]]:
    """A task prompt set (`llmlab data tasks`) -> (examples, encoded prompts), checked as encode_prompts."""
    examples = read_prompt_set(path)
    items = [(where, ex.prompt_messages()) for (where, _), ex in
             zip(read_prompt_messages(path), examples, strict=True)]
    return examples, encode_prompts(tok, items, block_size, max_new_tokens, length_key)

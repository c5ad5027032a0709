"""Greedy and beam search of the fast Marian decoder (fast_marian.py), on its static buffers.

Decoding follows `TransformersMTBackend` exactly (greedy, and the vectorised beam search of
transformers >= 4.50 with its length penalty and `early_stopping=True`): pad is never generated,
finished rows emit pad, and beam search runs one step past the bound with end-of-sentence forced
there, as `generate(max_new_tokens=bound + 1)` does. Every step is tensor operations only, with no
host reads, so the decoder can capture a few steps in one CUDA graph; the host reads `done`.

A step takes the decoder's logits for step `t` and updates the session (fast_marian's `_Session`):
`tokens` (the next step's input), `out`, `finished`, `done`, and with beams, its `BeamState`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.kernels.marian import chunk_top


@dataclass(frozen=True)
class SearchRules:
    """The decoding rules a step needs, fixed when the backend is built."""

    pad: int
    eos: int
    forced_eos: bool           # beam search forces </s> at the step past the bound
    length_penalty: float
    steps_per_graph: int       # greedy writes `done` once per graph, where the host reads it
    top_kernel: bool           # argmax / top-k with the two-stage Triton kernel
    pointers: bool             # beams follow parent pointers instead of reordering the cache


@dataclass
class BeamState:
    """Beam search's running and finished hypotheses of a (batch, beams, tgt_len) bucket."""

    run_seq: torch.Tensor        # [batch, beams, tgt_len] the running beams' tokens
    run_scores: torch.Tensor     # [batch, beams] their summed log probabilities
    fin_scores: torch.Tensor     # [batch, beams] finished hypotheses' length-normalised scores
    fin_flag: torch.Tensor       # [batch, beams] which finished places are taken
    open: torch.Tensor           # [batch, 1] can a running beam still beat the worst finished one
    top_mask: torch.Tensor       # [2 * beams] the first k of the 2k candidates
    row_offset: torch.Tensor     # [batch, 1] each sentence's first row
    forced_parent: torch.Tensor  # [2 * beams] the parents at the forced </s> step
    # [tgt_len, rows]: the row whose cache slot holds each position of a row's history (two sets:
    # one step's gather reads one and writes the other).
    origin: list[torch.Tensor]
    row_ids: torch.Tensor        # [rows] each row's own slot

    @classmethod
    def allocate(cls, batch: int, beams: int, tgt_len: int, pad: int, device: torch.device) -> "BeamState":
        rows = batch * beams
        f32 = dict(dtype=torch.float32, device=device)
        return cls(
            run_seq=torch.full((batch, beams, tgt_len), pad, dtype=torch.long, device=device),
            run_scores=torch.zeros((batch, beams), **f32),
            fin_scores=torch.zeros((batch, beams), **f32),
            fin_flag=torch.zeros((batch, beams), dtype=torch.bool, device=device),
            open=torch.ones((batch, 1), dtype=torch.bool, device=device),
            top_mask=torch.arange(2 * beams, device=device) < beams,
            row_offset=torch.arange(batch, device=device)[:, None] * beams,
            forced_parent=torch.arange(beams, device=device).repeat(2),
            origin=[torch.zeros(tgt_len, rows, dtype=torch.int32, device=device) for _ in range(2)],
            row_ids=torch.arange(rows, dtype=torch.int32, device=device),
        )

    def reset(self, pad: int) -> None:
        self.run_seq.fill_(pad)
        # Only the first beam is live at the start, so beams do not all pick the same token.
        self.run_scores.fill_(-1e9)
        self.run_scores[:, 0] = 0.0
        self.fin_scores.fill_(-1e9)
        self.fin_flag.zero_()
        self.open.fill_(True)
        for origin in self.origin:   # each position starts as the row's own slot
            origin.copy_(self.row_ids.expand_as(origin))


def greedy_step(s, t: int, logits: torch.Tensor, rules: SearchRules) -> None:
    if rules.top_kernel:
        best = chunk_top(logits, rules.pad, 1)[1][:, 0]
    else:
        logits[:, rules.pad] = float("-inf")   # bad_words_ids [[pad]]: generate never emits pad
        best = logits.argmax(-1)
    token = torch.where(s.finished, rules.pad, best)   # finished rows emit pad
    s.out[:, t] = token
    s.finished.logical_or_(token == rules.eos)
    if (t + 1) % rules.steps_per_graph == 0:   # only the host reads it, once per graph
        s.done.copy_(s.finished.all() | (s.limit <= t + 1)[0])


def _beam_candidates(s, logits: torch.Tensor, rules: SearchRules):
    """The 2k best (score, parent beam, token) of each sentence, best first."""
    b, k, batch = s.beam, s.beams, s.batch
    if rules.top_kernel:
        # Each chunk's 2k best logits and log-sum-exp; a row's global 2k best are among them.
        values, index, chunk_max, chunk_sum = chunk_top(logits, rules.pad, 2 * k, stats=True)
        top = chunk_max.amax(1, keepdim=True)
        lse = top + torch.log((chunk_sum * torch.exp(chunk_max - top)).sum(1, keepdim=True))
        per_row = values.shape[1]
        scores = (values - lse + b.run_scores.view(-1, 1)).view(batch, k * per_row)
        top_scores, position = scores.topk(2 * k)
        return top_scores, position // per_row, torch.gather(index.view(batch, -1), 1, position)
    vocab = logits.shape[1]
    log_probs = torch.log_softmax(logits, -1, dtype=torch.float32)
    log_probs[:, rules.pad] = float("-inf")   # generate masks bad words after the softmax
    scores = (log_probs.view(batch, k, vocab) + b.run_scores[:, :, None]).view(batch, k * vocab)
    top_scores, top_index = scores.topk(2 * k)
    return top_scores, top_index // vocab, top_index % vocab


def beam_step(s, t: int, logits: torch.Tensor, rules: SearchRules) -> None:
    """One step of transformers' vectorised beam search (early_stopping=True)."""
    b, k = s.beam, s.beams
    top_scores, parent, token = _beam_candidates(s, logits, rules)
    if rules.forced_eos:
        # At the forced step every beam's only finite continuation is </s> at its own score;
        # the top 2k are those k (already sorted) and k at -inf. Set them directly rather
        # than pass over the whole [rows, vocab] tensor again.
        forced = s.force_at == t
        minus_inf = torch.full_like(b.run_scores, float("-inf"))
        top_scores = torch.where(forced, torch.cat((b.run_scores, minus_inf), 1), top_scores)
        parent = torch.where(forced, b.forced_parent, parent)
        token = torch.where(forced, rules.eos, token)
    top_seq = torch.take_along_dim(b.run_seq, parent[:, :, None], 1)
    top_seq[:, :, t] = token
    hits = (token == rules.eos) | (s.limit <= t + 1)
    # The best k continuations that did not just finish stay running.
    running = top_scores + hits.float() * -1.0e9
    keep = running.topk(k)[1]
    b.run_seq.copy_(torch.take_along_dim(top_seq, keep[:, :, None], 1))
    b.run_scores.copy_(torch.take_along_dim(running, keep, 1))
    rows = (torch.take_along_dim(parent, keep, 1) + b.row_offset).view(-1)
    # Finished hypotheses among the top k compete, length-normalised, for the k final places.
    just_finished = hits & b.top_mask[None]
    candidate = top_scores / ((t + 1) ** rules.length_penalty)
    candidate = candidate + b.fin_flag.all(1, keepdim=True).float() * -1.0e9
    candidate = candidate + (~b.open).float() * -1.0e9
    candidate = candidate + (~just_finished).float() * -1.0e9
    merged_scores = torch.cat((b.fin_scores, candidate), 1)
    best = merged_scores.topk(k)[1]
    s.out.copy_(torch.take_along_dim(torch.cat((s.out, top_seq), 1), best[:, :, None], 1))
    b.fin_scores.copy_(torch.take_along_dim(merged_scores, best, 1))
    b.fin_flag.copy_(torch.take_along_dim(torch.cat((b.fin_flag, just_finished), 1), best, 1))
    if rules.pointers:   # running beams continue their parents' histories: gather the pointers
        now, after = b.origin[t % 2], b.origin[(t + 1) % 2]
        torch.index_select(now[: t + 1], 1, rows, out=after[: t + 1])
    else:   # running beams continue their parents' caches: gather into the other set
        for now, after in zip(s.self_kv[t % 2], s.self_kv[(t + 1) % 2]):
            torch.index_select(now[: t + 1], 1, rows, out=after[: t + 1])
    s.tokens.copy_(b.run_seq[:, :, t].reshape(-1))
    # Can a running beam still beat the worst finished one? (transformers' heuristic)
    best_running = b.run_scores[:, :1] / ((t + 1) ** rules.length_penalty)
    worst = torch.where(b.fin_flag, b.fin_scores.min(1, keepdim=True)[0], -1.0e9)
    b.open.logical_and_((best_running > worst).any(1, keepdim=True))
    still = b.open.any() & ~b.fin_flag.all() & ~hits.all()
    s.done.copy_(~still)

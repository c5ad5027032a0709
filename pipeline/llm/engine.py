"""Token generation for the answer stage: the settings, the result, and the transformers engine.

An engine turns prompts (token ids) into generated token ids. Two engines share this contract:
`TransformersEngine` here (any device, any causal LM) and `FastPhiEngine` in `fast_engine.py`
(phi-2 family on CUDA, static cache and captured decode steps). The answer stage picks one and never
looks inside it.
"""

from __future__ import annotations

import queue
import threading
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import torch

from pipeline.errors import BilingualQAError
# The settings live with the other options (no torch there); imported from here as ever.
from pipeline.spec import GenerationSettings

# Given a row's index in the call's prompts and its generated ids so far, True once its answer has
# ended (each row has its own question, so the check needs to know which row it sees).
StopCheck = Callable[[int, Sequence[int]], bool]

FINISH_EOS = "eos"  # the model wrote end-of-text
FINISH_STOP = "stop"  # the answer ended and phi-2 went on (an invented follow-up question or turn)
FINISH_LENGTH = "length"  # max_new_tokens reached


@dataclass
class Generated:
    token_ids: list[int]  # generated ids, without the prompt and without end-of-text
    finish_reason: str


class Engine(Protocol):
    name: str

    def generate(self, prompts: list[list[int]], settings: GenerationSettings,
                 stop_check: StopCheck | None = None) -> list[Generated]: ...

    def stream(self, prompt: list[int], settings: GenerationSettings,
               stop_check: StopCheck | None = None) -> Iterator[int]: ...


def finish_row(ids: Sequence[int], eos_token_id: int, max_new_tokens: int,
               stop_check: StopCheck | None, row: int = 0) -> Generated:
    """Cut a row's ids at end-of-text and name why it finished.

    A row stopped by a stop sequence is padded with end-of-text afterwards, so the stop check comes
    first: it names the true reason for such a row.
    """
    ids = list(ids)
    ended = eos_token_id in ids
    body = ids[: ids.index(eos_token_id)] if ended else ids[:max_new_tokens]
    if stop_check is not None and stop_check(row, body):
        return Generated(body, FINISH_STOP)
    return Generated(body, FINISH_EOS if ended else FINISH_LENGTH)


def pad_left(tensor: torch.Tensor, width: int, dim: int = 1, value: int | float = 0) -> torch.Tensor:
    """`tensor` widened to `width` along `dim` by `value`s on the left (the one left-padding of the
    answer stage: prompts' ids and masks, and the caches of the transformers decode batch)."""
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_full(shape, value), tensor], dim=dim)


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one batch of ids [rows, longest] padded on the left with `pad_id`, and its
    attention mask (1 on the prompts' tokens): every row's next token lands in the same column."""
    width = max(len(p) for p in prompts)
    # one tensor from one list each: per-row tensors cost a few host ops per prompt (128 in a group)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    return ids, mask


class NonFiniteLogitsError(BilingualQAError):
    """The answer model's logits became NaN or infinite (float16 overflow, as a rule): never answer
    with the garbage that would follow."""


def non_finite_error(dtype: torch.dtype) -> NonFiniteLogitsError:
    name = str(dtype).removeprefix("torch.")
    return NonFiniteLogitsError(f"the answer model produced non-finite logits (NaN or inf) in {name}; "
                                "run again with --dtype float32")


class AnswerOutOfMemoryError(BilingualQAError):
    pass


def shifted(stop_check: StopCheck | None, first: int) -> StopCheck | None:
    """The check of a group whose rows start at index `first` of the call's prompts."""
    return None if stop_check is None else (lambda row, ids: stop_check(first + row, ids))


def generate_shrinking(prompts: list, run: Callable[[list, int], list], max_rows: int,
                       release: Callable[[], None] = lambda: None) -> list:
    """run(group, first) over consecutive groups of at most max_rows prompts (`first`: the group's
    first index in `prompts`), results in order.

    A CUDA out-of-memory error halves the group size, calls `release` (free caches) and runs the
    same group again: rows already done are kept, none is lost or run twice in the results. The
    smaller size holds for the rest of the call.
    """
    results: list = []
    size, first = max(1, max_rows), 0
    while first < len(prompts):
        group = prompts[first:first + size]
        try:
            done = run(group, first)
        except torch.cuda.OutOfMemoryError:
            release()
            if len(group) == 1:
                raise AnswerOutOfMemoryError(
                    "the GPU ran out of memory answering a single question; free GPU memory, "
                    "lower --max-new-tokens or use --device cpu") from None
            size = len(group) // 2
            continue
        results.extend(done)
        first += len(group)
    return results


class _FiniteLogits:
    """A transformers logits processor that stops generation at the first NaN or +inf logit (-inf
    is what top-p filtering writes)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if bool((scores.isnan() | scores.isposinf()).any()):
            raise non_finite_error(self.dtype)
        return scores


class _SampleEachRow:
    """A transformers logits processor that makes `generate`'s greedy choice the one sampler's
    (sampler.py): every score but the sampled token's becomes -inf. So the transformers engine draws
    exactly what the fast engine and the continuous batches draw for a row's seed and step."""

    def __init__(self, settings: GenerationSettings, rows: int, prompt_length: int, device):
        from pipeline.llm.sampler import SamplingRows, seed_of

        self.rows = SamplingRows.of([settings] * rows, [seed_of(settings) for _ in range(rows)], [0] * rows, device)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        from pipeline.llm.sampler import choose

        self.rows.step.fill_(input_ids.shape[1] - self.prompt_length)
        chosen, _ = choose(scores, self.rows)
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen[:, None], 0.0)


class _StopEachRow:
    """A transformers stopping criterion: per row, stop on a stop sequence."""

    def __init__(self, prompt_length: int, stop_check: StopCheck):
        self.prompt_length = prompt_length
        self.stop_check = stop_check

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        rows = input_ids[:, self.prompt_length:].tolist()
        done = [self.stop_check(index, row) for index, row in enumerate(rows)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _QueueStreamer:
    """Receives tokens from `generate` (running in a thread) and hands them to an iterator."""

    def __init__(self):
        self.tokens: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first sends the prompt itself
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.tokens.put(token)

    def end(self) -> None:
        self.tokens.put(None)


class TransformersEngine:
    """`model.generate` with left padding, stop sequences and seeded sampling."""

    name = "transformers"

    def __init__(self, model, eos_token_id: int, pad_token_id: int | None = None, *,
                 fp32_attention_scores: bool | None = None):
        self.model = model
        self.eos_token_id = eos_token_id
        self.pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
        # float16 overflows in phi-2's attention scores (so fp32 scores for it, whatever the caller
        # asked); the eager attention multiplies in float16,
        # CUDA's SDPA flash and memory-efficient kernels sum in fp32 (fp32_scores keeps SDPA to them).
        self.fp32_scores = model.dtype == torch.float16 or bool(fp32_attention_scores)
        if self.fp32_scores and getattr(model.config, "_attn_implementation", "sdpa") == "eager":
            model.set_attn_implementation("sdpa")
        self.adapters: list[str] = []  # LoRA adapters rows may apply unmerged (add_adapter), index + 1

    def add_adapter(self, adapter, model=None) -> int:
        """Load the LoRA adapter `adapter` (an AdapterSource of this engine's model) through peft, to be
        applied unmerged by the rows that ask for it (peft's mixed-adapter batches); returns its index
        for `generate(adapters=...)`. From the first one on, the model is peft's wrapper of the base."""
        from peft import PeftModel

        name = f"adapter_{len(self.adapters) + 1}"  # peft keys modules by it: no dots, no user text
        if not self.adapters:
            # Mixed-adapter batches need PeftModel itself (adapters.inject_lora does not route rows); it
            # reads transformers' deprecated is_gradient_checkpointing, a warning no user can act on.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                self.model = PeftModel.from_pretrained(self.model, adapter.directory, adapter_name=name,
                                                       is_trainable=False)
        else:
            self.model.load_adapter(adapter.directory, adapter_name=name, is_trainable=False)
        self.adapters.append(adapter.name)
        return len(self.adapters)

    def adapter_names(self, adapters: Sequence[int] | None, rows: int) -> dict:
        """peft's `adapter_names` for rows applying `adapters` (None: the base), once any is loaded."""
        if not self.adapters:
            return {}
        chosen = adapters if adapters is not None else [0] * rows
        return {"adapter_names": ["__base__" if i == 0 else f"adapter_{i}" for i in chosen]}

    def _scores_context(self):
        from pipeline.llm.phi_model import fp32_scores

        return fp32_scores(self.model.device) if self.fp32_scores else nullcontext()

    def _generate_kwargs(self, settings: GenerationSettings, prompt_length: int,
                         stop_check: StopCheck | None, rows: int = 1) -> dict:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        processors = [_FiniteLogits(self.model.dtype)]
        if not settings.greedy:  # generate stays greedy over the sampler's one finite score
            processors.append(_SampleEachRow(settings, rows, prompt_length, self.model.device))
        kwargs = dict(
            max_new_tokens=settings.max_new_tokens, eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id, do_sample=False, temperature=None, top_p=None, top_k=None,
            logits_processor=LogitsProcessorList(processors),
        )
        if stop_check is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopEachRow(prompt_length, stop_check)])
        return kwargs

    def _batch(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = left_padded(prompts, self.pad_token_id)
        return ids.to(self.model.device), mask.to(self.model.device)

    def generate(self, prompts: list[list[int]], settings: GenerationSettings,
                 stop_check: StopCheck | None = None, adapters: list[int] | None = None) -> list[Generated]:
        """`adapters[i]`: the LoRA adapter prompt i applies (add_adapter's index; 0 or None: the base)."""
        release = torch.cuda.empty_cache if self.model.device.type == "cuda" else (lambda: None)
        return generate_shrinking(
            prompts, lambda group, first: self._generate(
                group, settings, shifted(stop_check, first),
                None if adapters is None else adapters[first:first + len(group)]),
            len(prompts), release)

    @torch.inference_mode()
    def _generate(self, prompts: list[list[int]], settings: GenerationSettings,
                  stop_check: StopCheck | None, adapters: list[int] | None = None) -> list[Generated]:
        ids, mask = self._batch(prompts)
        with self._scores_context():
            out = self.model.generate(input_ids=ids, attention_mask=mask,
                                      **self._generate_kwargs(settings, ids.shape[1], stop_check, len(prompts)),
                                      **self.adapter_names(adapters, len(prompts)))
        new = out[:, ids.shape[1]:].tolist()
        return [finish_row(row, self.eos_token_id, settings.max_new_tokens, stop_check, index)
                for index, row in enumerate(new)]

    def stream(self, prompt: list[int], settings: GenerationSettings,
               stop_check: StopCheck | None = None, adapter: int = 0) -> Iterator[int]:
        """Yield generated ids as they come; ends at end-of-text, a stop sequence or the length."""
        ids, mask = self._batch([prompt])
        streamer = _QueueStreamer()
        kwargs = {**self._generate_kwargs(settings, ids.shape[1], stop_check), **self.adapter_names([adapter], 1)}

        failed: list[BaseException] = []

        def run():
            try:
                with torch.inference_mode(), self._scores_context():
                    self.model.generate(input_ids=ids, attention_mask=mask, streamer=streamer, **kwargs)
            except BaseException as error:  # noqa: BLE001 - handed to the caller's thread below
                failed.append(error)
            finally:
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        while (token := streamer.tokens.get()) is not None:
            if token == self.eos_token_id:
                break
            yield token
        worker.join()
        if failed:
            raise failed[0]

"""`bilingual-qa finetune`'s trainer against a plain peft + transformers `Trainer`, on one GPU, in one run.

phi-2 at its published shape (2.78B parameters, random weights: speed depends on the shape, not on
the values), the frozen base in bfloat16 (--dtype), the same LoRA adapter (r=16, alpha 32, dropout
0.05 on q/k/v/dense/fc1/fc2), the same learning rate, schedule, gradient clipping and the same
examples: question/answer pairs of random token ids whose lengths are drawn (seeded) as a finance
QA file's are spread, a prompt of 13-69 tokens and an answer of 16-448 tokens, each at most 512
(--max-length). The loss is on answer tokens only in both.

- ours: pipeline/train's LoraTrainer (examples.py packs pairs into sequences of 512 tokens,
  position ids keeping them apart; the logits of learned positions only), 8 sequences a step
  (--batch-tokens 4096);
- baseline: transformers' Trainer on the peft model, `bf16=True`, each pair its own row padded to the
  longest of its batch (DataCollatorForSeq2Seq, labels -100 on the prompt and the padding), as many
  pairs a step as carry the same number of real tokens on average as one of ours (so both optimise
  on the same amount of data a step).

Tokens/s counts real tokens only, for both: a pair's prompt, answer and end-of-text, never padding;
timed over --steps steps after --warmup (CUDA synchronised at both ends). Peak GPU memory is
torch.cuda.max_memory_allocated over a run, once without and once with gradient checkpointing
(at sequence 512; the issue's bar: at most 14 GiB, so a 16 GB T4 fits).

    python benchmarks/finetune_speed.py             # published shape, on the GPU
    python benchmarks/finetune_speed.py --tiny      # tiny shape, CPU or GPU: checks the script runs

The table is also written to $OUT/finetune_speed.md when OUT is set.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.train.examples import IGNORE, Example, plan_epochs  # noqa: E402
from pipeline.train.options import FineTune  # noqa: E402
from pipeline.train.trainer import LoraTrainer  # noqa: E402

GIB = 2 ** 30


def build_model(tiny: bool, dtype: torch.dtype, device: str, checkpointing: bool):
    from transformers import PhiForCausalLM

    from pipeline.checkpoints import phi2_config

    shape = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1024) if tiny else {}
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = PhiForCausalLM(phi2_config(**shape))
    finally:
        torch.set_default_dtype(previous)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def make_examples(count: int, max_length: int, vocab: int, seed: int = 0) -> list[Example]:
    """Pairs of random ids: prompt 13-69 tokens (ask's 5-token frame and a 8-64-token question),
    answer 16-448 tokens plus end-of-text, at most max_length in all."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        prompt = 5 + int(torch.randint(8, 65, (1,), generator=generator))
        answer = min(int(torch.randint(16, 449, (1,), generator=generator)), max_length - prompt - 1)
        ids = torch.randint(1, vocab, (prompt + answer + 1,), generator=generator).tolist()
        examples.append(Example(tuple(ids), prompt))
    return examples


class StepClock:
    """Times steps warmup+1 .. warmup+steps (CUDA synchronised) and counts their real tokens."""

    def __init__(self, warmup: int, steps: int, device: str):
        self.warmup, self.steps, self.device = warmup, steps, device
        self.done, self.tokens, self.started, self.seconds = 0, 0, 0.0, 0.0

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def step_done(self, tokens: int) -> None:
        self.done += 1
        if self.done == self.warmup:
            self.sync()
            self.started = time.perf_counter()
        elif self.warmup < self.done <= self.warmup + self.steps:
            self.tokens += tokens
            if self.done == self.warmup + self.steps:
                self.sync()
                self.seconds = time.perf_counter() - self.started

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def run_ours(args, examples, dtype, device, checkpointing: bool) -> tuple[float, float]:
    from pipeline.train.examples import make_batch

    options = FineTune("", "", max_length=args.max_length, batch_tokens=args.batch_tokens, epochs=1)
    plan = plan_epochs(examples, epochs=1, capacity=args.max_length, rows_per_step=options.rows_per_step, seed=0)
    total = args.warmup + args.steps
    if plan.total < total:
        raise SystemExit(f"{len(examples)} examples make {plan.total} steps; raise --examples")
    model = build_model(args.tiny, dtype, device, False)
    trainer = LoraTrainer(model, options, plan.total, pad_id=0, gradient_checkpointing=checkpointing)
    clock = StepClock(args.warmup, args.steps, device)
    for step in range(total):
        batch = make_batch(examples, plan.steps[0][step], 0)
        trainer.step(batch)
        clock.step_done(batch.tokens)
    del trainer, model
    return clock.rate, _peak()


def run_trainer(args, examples, dtype, device, checkpointing: bool, per_step: int) -> tuple[float, float]:
    """The baseline: what a notebook writes with peft and transformers' Trainer."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = build_model(args.tiny, dtype, device, False)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=list(FineTune("", "").target_modules),
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    rows = [{"input_ids": list(e.ids), "labels": [IGNORE] * e.prompt_tokens + list(e.ids[e.prompt_tokens:])}
            for e in examples]
    clock = StepClock(args.warmup, args.steps, device)
    real_tokens: list[int] = []

    def collate(features):  # DataCollatorForSeq2Seq's padding: ids with the pad id, labels with -100
        width = max(len(f["input_ids"]) for f in features)
        real_tokens.append(sum(len(f["input_ids"]) for f in features))
        pad = [width - len(f["input_ids"]) for f in features]
        return {"input_ids": torch.tensor([f["input_ids"] + [0] * p for f, p in zip(features, pad)]),
                "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * p for f, p in zip(features, pad)]),
                "labels": torch.tensor([f["labels"] + [IGNORE] * p for f, p in zip(features, pad)])}

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            clock.step_done(real_tokens[clock.done])

    arguments = TrainingArguments(
        output_dir=args.scratch, per_device_train_batch_size=per_step, max_steps=args.warmup + args.steps,
        learning_rate=2e-4, lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, logging_strategy="no", save_strategy="no",
        report_to="none", dataloader_num_workers=0, remove_unused_columns=False, use_cpu=device == "cpu", seed=0)
    trainer = Trainer(model=model, args=arguments, train_dataset=rows, data_collator=collate,
                      callbacks=[Clock()])
    trainer.train()
    del trainer, model
    return clock.rate, _peak()


def _peak() -> float:
    gc.collect()
    if not torch.cuda.is_available():
        return float("nan")
    peak = torch.cuda.max_memory_allocated() / GIB
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shape (CPU unless CUDA is there): a smoke test")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--examples", type=int, default=1200)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if device == "cuda" else torch.float32
    if args.tiny:
        args.steps, args.warmup, args.examples = min(args.steps, 3), min(args.warmup, 1), min(args.examples, 80)
    args.scratch = os.environ.get("TMPDIR", "/tmp") + "/finetune_speed"
    import peft
    import transformers

    examples = make_examples(args.examples, args.max_length, 50000 if not args.tiny else 600)
    mean = sum(len(e) for e in examples) / len(examples)
    per_step = max(1, round(args.batch_tokens / mean))  # the baseline's pairs a step: the same real tokens
    header = [f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
              f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}",
              f"versions: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}",
              f"command: {' '.join(['python', Path(sys.argv[0]).as_posix()] + sys.argv[1:])}",
              f"workload: phi-2 {'tiny' if args.tiny else 'published'} shape, random {str(dtype)[6:]} base, LoRA r=16 "
              f"alpha 32 dropout 0.05 on q/k/v/dense/fc1/fc2; {len(examples)} pairs of 13-69 + 17-449 tokens "
              f"(mean {mean:.0f}), at most {args.max_length}; ours {args.batch_tokens // args.max_length} packed "
              f"sequences of {args.max_length} a step, baseline {per_step} padded pairs a step; "
              f"{args.steps} timed steps after {args.warmup}"]
    print("\n".join(header), flush=True)
    rows = []
    for checkpointing in (False, True):
        for name, run in (("ours (pipeline/train)", lambda c: run_ours(args, examples, dtype, device, c)),
                          ("peft + transformers Trainer", lambda c: run_trainer(args, examples, dtype, device, c,
                                                                               per_step))):
            rate, peak = run(checkpointing)
            rows.append((name, checkpointing, rate, peak))
            print(f"  {name} | checkpointing {checkpointing} | {rate:,.0f} tokens/s | peak {peak:.2f} GiB", flush=True)
    lines = header + ["", "| trainer | gradient checkpointing | real tokens/s | peak GPU memory (GiB) |",
                      "|---|---|---|---|"]
    lines += [f"| {name} | {'on' if c else 'off'} | {rate:,.0f} | {peak:.2f} |" for name, c, rate, peak in rows]
    facts = []
    for checkpointing in (False, True):
        ours, theirs = [r for r in rows if r[1] == checkpointing]
        facts.append(f"gradient checkpointing {'on' if checkpointing else 'off'}: ours {ours[2] / theirs[2]:.2f}x the "
                     f"baseline's tokens/s (target: at least 1.5x); peak {ours[3]:.2f} GiB against {theirs[3]:.2f} GiB")
    facts.append(f"peak GPU memory at sequence {args.max_length} with gradient checkpointing: "
                 f"{rows[2][3]:.2f} GiB (target: at most 14 GiB)")
    text = "\n".join(lines + [""] + [f"- {fact}" for fact in facts])
    print("\n" + text, flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "finetune_speed.md").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

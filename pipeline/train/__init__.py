"""Training: `bilingual-qa finetune` makes a LoRA adapter of phi-2 from the user's own questions and
answers, which `ask`, `compare`, `ask --batch` and `serve` then load as any adapter.

`options.py` (FineTune: what is asked, no torch), `pairs.py` (the data file -> English pairs, a
resumable job), `examples.py` (pairs -> token ids, packed into sequences), `trainer.py` (the LoRA
training loop), `state.py` (checkpoints written atomically, resumed exactly), `progress.py` (what a
run shows), `run.py` (one run from start to adapter: `finetune`). Nothing is imported here, so the
CLI reads the options' defaults without torch.
"""

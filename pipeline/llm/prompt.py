"""The prompt phi-2 answers: one definition, used by `ask` (answerer.py) and by training (train/).

The model card's QA format, `Instruct: <question>\\nOutput:`. An adapter trained by `bilingual-qa
finetune` learns to answer exactly what `ask` sends, so both build it here and nowhere else.
"""

from __future__ import annotations

PROMPT = "Instruct: {question}\nOutput:"


def prompt_text(question: str) -> str:
    """The prompt for `question` (its outer whitespace dropped, as the answer stage always did)."""
    return PROMPT.format(question=question.strip())


def prompt_ids(tokenizer, question: str) -> list[int]:
    """The prompt's token ids, as phi-2 reads them: the answer is what follows them."""
    return list(tokenizer(prompt_text(question))["input_ids"])

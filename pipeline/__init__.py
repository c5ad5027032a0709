"""bilingual-qa: ask phi-2 in Japanese or English, get the answer in both languages.

The stages, in the order the data flows, each a subpackage:
text/detect -> mt/ (ja->en) -> llm/ (phi-2) -> mt/ (en->ja) -> text/render;
qa.py composes them, jobs/ runs them over files, serve/ for many callers, cli.py is the command line.
docs/design.md shows the house.
"""

from __future__ import annotations

import importlib

# Each public name and its module, imported at first use: `bilingual-qa --help` (which imports this
# package first) and `--server` never pay for torch and transformers.
_EXPORTS = {
    "BilingualQA": "pipeline.qa", "QAResult": "pipeline.text.result", "Translator": "pipeline.mt.translator",
    "BilingualQAError": "pipeline.errors", "GenerationSettings": "pipeline.spec",
    "detect_language": "pipeline.text.detect", "trim_answer": "pipeline.text.answer_end",
    "finetune": "pipeline.train.run", "FineTune": "pipeline.train.options",
}



def translate_document(source, output, translator, *, format=None, **options):
    """Translate a .md/.markdown, .html/.htm, .srt, .vtt or .docx file into `output`, of the same
    format, keeping everything but the words; `translator` is anything with
    `translate(texts: list[str]) -> list[str]`. See pipeline/jobs/documents.py for the options."""
    from pipeline.jobs.documents import translate_document as run  # parsers load only when used

    return run(source, output, translator, format=format, **options)


__all__ = ["BilingualQA", "BilingualQAError", "FineTune", "GenerationSettings", "QAResult", "Translator",
           "detect_language", "finetune", "translate_document", "trim_answer"]
__version__ = "0.1.0"  # the one definition: pyproject.toml's version is read from here


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

"""bilingual-qa: ask phi-2 in Japanese or English, get the answer in both languages.

The stages, in the order the data flows, each a subpackage:
text/detect -> mt/ (ja->en) -> llm/ (phi-2) -> mt/ (en->ja) -> text/render;
qa.py composes them, jobs/ runs them over files, serve/ for many callers, cli.py is the command line.
docs/design.md shows the house.
"""

from pipeline.text.detect import detect_language
from pipeline.errors import BilingualQAError
from pipeline.llm.engine import GenerationSettings
from pipeline.qa import BilingualQA, QAResult
from pipeline.mt.translator import Translator
from pipeline.text.answer_end import trim_answer



def translate_document(source, output, translator, *, format=None, **options):
    """Translate a .md/.markdown, .html/.htm, .srt, .vtt or .docx file into `output`, of the same
    format, keeping everything but the words; `translator` is anything with
    `translate(texts: list[str]) -> list[str]`. See pipeline/jobs/documents.py for the options."""
    from pipeline.jobs.documents import translate_document as run  # parsers load only when used

    return run(source, output, translator, format=format, **options)


__all__ = ["BilingualQA", "BilingualQAError", "GenerationSettings", "QAResult", "Translator", "detect_language",
           "translate_document", "trim_answer"]
__version__ = "0.1.0"

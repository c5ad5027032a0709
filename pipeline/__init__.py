"""bilingual-qa: ask phi-2 in Japanese or English, get the answer in both languages.

The stages, in the order the data flows:
detect.py -> translate.py (ja->en) -> answer.py -> translate.py (en->ja) -> render.py;
qa.py composes them, jobs.py runs them over files, cli.py is the command line.
"""

from .detect import detect_language
from .errors import BilingualQAError
from .generation import GenerationSettings
from .qa import BilingualQA, QAResult
from .translate import Translator

__all__ = ["BilingualQA", "BilingualQAError", "GenerationSettings", "QAResult", "Translator", "detect_language"]
__version__ = "0.1.0"

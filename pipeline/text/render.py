"""Stage 5: show the question and answer in English, then in Japanese.

`text` is the source article's layout (English, a line `### ---`, Japanese); `markdown` has
headings; `json` is one object for scripts. Text and markdown go to terminals, so control characters
a model produced are removed there; JSON escapes them.
"""

from __future__ import annotations

import json
from typing import Callable, Iterable, Iterator, Protocol

from pipeline.text.controls import strip_controls

FORMATS = ("text", "markdown", "json")
DIVIDER = "### ---"


class Rendered(Protocol):
    """What rendering reads of a result (text/result.py's QAResult, which calls in here)."""

    question_en: str
    question_ja: str
    answer_en: str
    answer_ja: str
    finish_reason: str
    models: dict[str, str]
    raw: bool

    def to_dict(self) -> dict: ...


def render_text(result: Rendered) -> str:
    return strip_controls("\n".join([
        f"Q: {result.question_en}", "", result.answer_en, "", DIVIDER, "",
        f"Q: {result.question_ja}", "", result.answer_ja, "",
    ]))


def render_markdown(result: Rendered) -> str:
    return strip_controls("\n".join([
        "## English", "", f"**Q:** {result.question_en}", "", result.answer_en, "",
        "## 日本語", "", f"**質問:** {result.question_ja}", "", result.answer_ja, "",
        f"<sub>model: {result.models['llm']} · finish: {result.finish_reason}"
        f"{' · raw output, untrimmed' if result.raw else ''}</sub>", "",
    ]))


def render_json(result: Rendered) -> str:
    return json.dumps(result.to_dict(), ensure_ascii=False, indent=2) + "\n"


def render(result: Rendered, fmt: str = "text") -> str:
    renderers = {"text": render_text, "markdown": render_markdown, "json": render_json}
    if fmt not in renderers:
        raise ValueError(f"unknown format '{fmt}': use one of {', '.join(FORMATS)}")
    return renderers[fmt](result)


def render_comparison(results: list[Rendered], fmt: str) -> str:
    """`compare`'s output: each model's result under a heading that names it."""
    if fmt == "json":
        return json.dumps([r.to_dict() for r in results], ensure_ascii=False, indent=2) + "\n"
    heading = "## {}\n\n" if fmt == "markdown" else "=== {} ===\n\n"

    def label(models: dict) -> str:  # an adapter is named with its base
        return f"{models['llm']} (LoRA adapter on {models['llm_base']})" if "llm_base" in models else models["llm"]
    return "\n".join(heading.format(label(r.models)) + render(r, fmt) for r in results)


def render_stream(events: Iterable[tuple[str, dict]], cut: Callable[[], Exception] | None = None) -> Iterator[str]:
    """`ask --stream`: the `text` layout piece by piece from a question's events (flow.py's, in
    process or read back from a server), the English answer as it comes. Events that end before the
    result raise `cut()` where given."""
    for kind, data in events:
        if kind == "question":
            yield strip_controls(f"Q: {data['question_en']}\n\n")
        elif kind == "english":
            yield strip_controls(data["text"])
        elif kind == "result":
            yield strip_controls(f"\n\n{DIVIDER}\n\nQ: {data['question_ja']}\n\n{data['answer_ja']}\n")
            return
    if cut is not None:
        raise cut()

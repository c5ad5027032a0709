"""One question's result: what `ask --format json` prints, a server's /v1/ask returns and a batch
job writes per row. It lives in the text room, beside the rendering it is made for, so that neither
rendering nor a remote client reaches up into qa.py for it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from pipeline.text.render import render


@dataclass
class QAResult:
    source_lang: str
    question_en: str
    question_ja: str
    answer_en: str
    answer_ja: str
    finish_reason: str
    models: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)
    engine: str = ""
    mt_backend: str = ""
    generated_tokens: int = 0
    raw: bool = False  # answer_en/answer_ja are phi-2's whole output (and its translation), untrimmed

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QAResult":
        """The result of `to_dict` (a server's JSON); fields this version does not know are left out."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    def render(self, fmt: str = "text") -> str:
        return render(self, fmt)

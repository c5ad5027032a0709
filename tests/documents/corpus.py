"""Documents of every format, shaped like real ones, for the round-trip tests (imported by name)."""

from __future__ import annotations

import io
import json
from pathlib import Path

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[2]


def commonmark_examples() -> list[tuple[str, str]]:
    examples = json.loads((DATA / "commonmark-0.31.2.json").read_text(encoding="utf-8"))
    return [(f"spec-{e['example']}", e["markdown"]) for e in examples]


def fixture_cases() -> list[tuple[str, str]]:
    """The Markdown of each case of markdown-it's fixture files."""
    cases = []
    for path in sorted(DATA.glob("markdown-it-*.fixture")):
        lines = path.read_text(encoding="utf-8").split("\n")
        dots = [i for i, line in enumerate(lines) if line == "."]
        for n, (a, b) in enumerate(zip(dots[0::3], dots[1::3])):
            cases.append((f"{path.stem}-{n}", "\n".join(lines[a + 1:b]) + "\n"))
    return cases


README_LIKE = """---
title: "Project Notes"
tags: [demo, docs]
---

# Project Notes

A short introduction that wraps
over two lines, with **bold words**, *emphasis*, ~~struck text~~ and `inline code`.
See the [documentation](https://example.com/docs "Docs") or <https://example.com>.

## Install

```bash
pip install example  # a comment that must not change
```

1. First step, with a [reference link][ref].
2. Second step: run `make test`.
   - A nested item
   - Another one with an image ![the logo](logo.png)

> A quote that spans
> two lines, and *emphasis* in it.
>
> > A nested quote.

| Name | Meaning |
|:-----|--------:|
| alpha | The first letter |
| beta | The *second* one |

Inline math $E = mc^2$ stays, and so does a block:

$$
\\int_0^1 x\\,dx
$$

<div class="note">
Raw HTML blocks are kept.
</div>

    an indented code block

Term with trailing spaces for a hard break  
next line. Escaped \\*stars\\* and AT&amp;T.

[ref]: https://example.com/ref "Reference"
"""

JAPANESE = """# 金利の話

金利が上がると、借り入れの費用が高くなります。
円安は日本の輸出品を海外で安くします。

- 東京の株式市場は午後に少し下がりました。
- 詳しくは[こちら](https://example.jp/)をご覧ください。
"""


def markdown_documents() -> list[tuple[str, str]]:
    docs = [("readme-like", README_LIKE), ("japanese", JAPANESE),
            ("readme-like-crlf", README_LIKE.replace("\n", "\r\n")), ("readme-like-bom", "\ufeff" + README_LIKE),
            ("no-final-newline", README_LIKE.rstrip("\n")), ("tabs", README_LIKE.replace("    ", "\t")),
            ("commonmark-spec", (DATA / "commonmark-spec-0.31.2.md").read_text(encoding="utf-8"))]
    docs += [(f"repo-{path.name}", path.read_text(encoding="utf-8"))
             for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))] if path.exists()]
    return docs + commonmark_examples() + fixture_cases()


HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Rates &amp; Markets</title>
  <style>body { font-family: sans-serif; } p > b { color: #333; }</style>
  <script>const greeting = "<b>Hello</b> world"; if (a < b && c > d) {}</script>
</head>
<body>
  <!-- navigation: not translated -->
  <nav><a href="/en/" title="Home page">Home</a> | <a href='/about?x=1&amp;y=2'>About us</a></nav>
  <h1 class=title>Interest rates&nbsp;rise</h1>
  <p>When rates go up, <b>borrowing</b> costs more for <em>people</em> and companies.
     Read <a href="https://example.com/more" aria-label="Read more about rates">more</a>.</p>
  <p>Run <code>make test</code> before you push.<br>Then wait.</p>
  <pre>  preformatted   text
     stays</pre>
  <img src="chart.png" alt="A chart of rates" width=600>
  <form><input type="search" placeholder="Search the site" name=q><textarea>Type here</textarea></form>
  <p translate="no">BrandName™</p>
  <ul><li>One &copy; 2024</li><li>Two &#8212; three</li></ul>
  <table><tr><th>Year</th><th>Rate</th></tr><tr><td>2024</td><td>Five percent</td></tr></table>
  <svg><text>chart label</text></svg>
</body>
</html>
"""


def html_documents() -> list[tuple[str, bytes]]:
    latin = ('<html><head><meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1">'
             "<title>Caf\xe9</title></head><body><p>Cr\xe8me br\xfbl\xe9e for dessert.</p></body></html>")
    return [("page", HTML_PAGE.encode()), ("page-crlf", HTML_PAGE.replace("\n", "\r\n").encode()),
            ("page-bom", b"\xef\xbb\xbf" + HTML_PAGE.encode()), ("latin-1", latin.encode("latin-1")),
            ("fragment", b"<p>Just a <i>fragment</i>, no html element.</p>"),
            ("unclosed", b"<div><p>Unclosed <b>tags everywhere<p>and more text</div"),
            ("japanese", "<html><body><p>金利が上がると、借り入れの費用が高くなります。</p></body></html>".encode())]


SRT = """1
00:00:01,000 --> 00:00:03,500
Hello there,
<i>my friend</i>!

2
00:00:04,000 --> 00:00:06,000 X1:40 X2:600 Y1:20 Y2:50
{\\an8}Look up at the sky.

3
00:00:07,000 --> 00:00:08,000
1984

4
00:00:09,000 --> 00:00:12,000
<font color="#ffff00">- Are you coming?</font>
- In a minute.
"""

VTT = """WEBVTT - Rates explained
Kind: captions

NOTE
This note is kept as it is.

STYLE
::cue(.loud) { font-weight: bold }

intro
00:01.000 --> 00:04.000 align:start position:10%
<v Roger Bingham>When rates go up, borrowing
costs <c.loud>more</c> &amp; faster.</v>

00:00:05.000 --> 00:00:07.000
<00:00:05.500>Companies <b>borrow</b> less.

00:00:08.000 --> 00:00:09.000 line:0
Fish &lt;and&gt; chips&nbsp;tonight
"""


def subtitle_documents() -> list[tuple[str, str, str]]:
    return [("srt", "srt", SRT), ("srt-crlf", "srt", SRT.replace("\n", "\r\n")), ("srt-bom", "srt", "\ufeff" + SRT),
            ("srt-extra-blank-lines", "srt", SRT.replace("\n\n", "\n\n\n")), ("srt-no-final-newline", "srt", SRT.rstrip()),
            ("vtt", "vtt", VTT), ("vtt-crlf", "vtt", VTT.replace("\n", "\r\n")),
            ("srt-japanese", "srt", "1\n00:00:01,000 --> 00:00:02,000\n金利が上がると、\n費用が高くなります。\n")]


def docx_documents() -> list[tuple[str, bytes]]:
    """Word documents made by python-docx: headings, runs of mixed formatting, a hyperlink, a
    table, a header, a footer, an image, and a footnotes part added as Word writes one."""
    import docx
    from docx.oxml.ns import qn
    from docx.oxml import OxmlElement

    document = docx.Document()
    document.sections[0].header.paragraphs[0].text = "Quarterly report"
    document.sections[0].footer.paragraphs[0].text = "Company confidential"
    document.add_heading("Interest rates", 1)
    paragraph = document.add_paragraph("When rates go up, ")
    paragraph.add_run("borrowing").bold = True
    paragraph.add_run(" costs more for ")
    paragraph.add_run("people").italic = True
    paragraph.add_run(" and companies.")
    link = document.add_paragraph("Read ")
    hyperlink = OxmlElement("w:hyperlink")
    hyperlink.set(qn("r:id"), link.part.relate_to("https://example.com/rates",
                                                 "http://schemas.openxmlformats.org/officeDocument/2006/"
                                                 "relationships/hyperlink", is_external=True))
    run = OxmlElement("w:r")
    text = OxmlElement("w:t")
    text.text = "the full article"
    run.append(text)
    hyperlink.append(run)
    link._p.append(hyperlink)
    link.add_run(" online.")
    document.add_paragraph("A list item", style="List Bullet")
    table = document.add_table(rows=2, cols=2)
    for (row, col), value in {(0, 0): "Year", (0, 1): "Rate", (1, 0): "2024", (1, 1): "Five percent"}.items():
        table.cell(row, col).text = value
    tabbed = document.add_paragraph("Before a tab")
    tabbed.add_run().add_tab()
    tabbed.add_run("after the tab")
    document.add_picture(io.BytesIO(_tiny_png()))
    buffer = io.BytesIO()
    document.save(buffer)
    plain = buffer.getvalue()
    return [("report", plain), ("report-with-footnotes", _with_footnotes(plain))]


def _tiny_png() -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = zlib.compress(b"\x00\xff\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", raw) + chunk(b"IEND", b"")


FOOTNOTES = ('<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
             '<w:footnotes xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
             '<w:footnote w:id="1"><w:p><w:r><w:t xml:space="preserve">A footnote that explains </w:t></w:r>'
             '<w:r><w:rPr><w:b/></w:rPr><w:t>everything</w:t></w:r><w:r><w:t>.</w:t></w:r></w:p></w:footnote>'
             '</w:footnotes>')


def _with_footnotes(data: bytes) -> bytes:
    import zipfile

    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            content = source.read(info)
            if info.filename == "[Content_Types].xml":
                content = content.replace(b"</Types>", b'<Override PartName="/word/footnotes.xml" ContentType="'
                                          b"application/vnd.openxmlformats-officedocument.wordprocessingml."
                                          b'footnotes+xml"/></Types>')
            target.writestr(info, content)
        target.writestr("word/footnotes.xml", FOOTNOTES)
    return out.getvalue()

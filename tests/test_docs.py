"""The documentation site builds with MkDocs in strict mode (a broken link, an anchor that does not
exist or a page missing from the nav is an error), and the README stays a front door: short, its
links into the docs leading to pages and headings that exist."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install '.[docs]')")
    site_dir = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return site_dir


def test_the_docs_site_builds_strictly_with_a_page_for_each_subject(site):
    for page in ("asking", "finetune", "batch", "server", "api", "python", "hardware", "design", "benchmarks",
                 "models", "development"):
        assert (site / page / "index.html").is_file(), page
    assert (site / "index.html").is_file() and (site / "serve-page.png").is_file()


def test_a_broken_link_fails_the_strict_build(tmp_path):
    pytest.importorskip("mkdocs")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with open(tmp_path / "docs" / "finetune.md", "a", encoding="utf-8") as page:
        page.write("\n[a heading that is not there](asking.md#no-such-heading)\n")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode != 0 and "no-such-heading" in proc.stdout + proc.stderr


def test_the_readme_is_short_and_names_the_three_jobs():
    assert len(README.splitlines()) <= 200
    first_screen = "\n".join(README.splitlines()[:40])
    assert "## Install" in first_screen and "pip install" in first_screen
    for command in ("bilingual-qa ask ", "bilingual-qa translate ", "bilingual-qa serve"):
        assert command in README, command
    assert "## Fine-tune phi-2 on your own questions" in README and "docs/finetune.md" in README
    assert "about 10\nminutes on 2 CPU cores" in README or "about 10 minutes on 2 CPU cores" in README
    assert "huggingface-cli" not in README and "torch==" not in README  # CI's torch pin is CI's business


def test_no_page_tells_of_the_retired_hub_command():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert "huggingface-cli" not in page.read_text(encoding="utf-8"), page.name


def test_the_readmes_links_lead_to_pages_and_headings_that_exist(site):
    links = re.findall(r"\]\((docs/[^)#\s]+)(#[^)\s]+)?\)", README)
    assert len(links) >= 10
    for target, anchor in links:
        assert (ROOT / target).is_file(), target
        if anchor and target.endswith(".md"):
            page = site / ("" if target == "docs/index.md" else Path(target).stem) / "index.html"
            ids = set(re.findall(r'id="([^"]+)"', html.unescape(page.read_text(encoding="utf-8"))))
            assert anchor[1:] in ids, f"{target}{anchor}"
    for anchor in re.findall(r"\]\(#([^)]+)\)", README):  # the README's own headings, as GitHub names them
        headings = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", README, re.M)}
        assert anchor in headings, anchor

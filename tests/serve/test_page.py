"""The web page in a real browser (Debian's headless Chromium, driven by Playwright) against a real
uvicorn server over the tiny checkpoints: the compare view, errors in the page's own box, the Stop
button freeing the server's row, fields that refuse bad numbers, keys that submit, no 404s.

SERVE_PAGE_SCREENSHOTS=docs takes the README's screenshots (desktop, 390 px wide, an error) into docs/
(with Debian's fonts-noto-cjk installed, so that the Japanese shows).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import httpx
import pytest

from pipeline.text.controls import strip_controls
from serve_support import AUTH, KEY, QUESTIONS, TOKENS, base_and_adapter_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Debian's chromium, headless, kept off the network (nothing to fetch: the page is self-contained).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def page_server(tiny_phi2_dir, tiny_lora_dir, tiny_ja_en_dir, tiny_en_ja_dir):
    """The server as on one's own machine: no key; the tiny phi-2 and a LoRA adapter of it, so that the
    base's answers are those `alone` holds. Its /metrics count only its own rows and tokens."""
    with base_and_adapter_server(tiny_phi2_dir, tiny_lora_dir, tiny_ja_en_dir, tiny_en_ja_dir) as url:
        yield url


@pytest.fixture(scope="module")
def fine_tune(page_server):
    """(base, fine-tune) as /v1/models names them: the adapter's entry names its base (`base`, or
    `parent` as vLLM spells it), the one field the page reads to open on the comparison."""
    listed = httpx.get(f"{page_server}/v1/models", timeout=10).json()["data"]
    names = [entry["id"] for entry in listed]
    adapters = [(entry.get("base") or entry.get("parent"), entry["id"]) for entry in listed
                if (entry.get("base") or entry.get("parent")) in names]
    assert len(adapters) == 1, listed
    return adapters[0]


# The answers are complete: each card's Copy button shows once its result has come.
ANSWERED = "[...document.querySelectorAll('#answers .answer button')].filter(b => !b.hidden).length == {}"


def open_page(browser, url, width=1100, height=900, listed=True):
    page = browser.new_page(viewport={"width": width, "height": height})
    failed = []  # every response of 400 or more the page caused (a favicon 404 among them)
    page.on("response", lambda response: failed.append(response.url) if response.status >= 400 else None)
    page.goto(url)
    if listed:
        page.wait_for_function("document.getElementById('model').options.length > 0")
    return page, failed


def ask_requests(page) -> list:
    asked = []
    page.on("request", lambda request: asked.append(request) if request.url.endswith("/v1/ask") else None)
    return asked


def test_compare_view_defaults_to_base_and_fine_tune_and_shows_both_answers(browser, page_server, fine_tune,
                                                                            registry, alone):
    base, tuned = fine_tune
    page, failed = open_page(browser, page_server)
    assert page.is_checked("#compare")
    assert page.input_value("#model") == base and page.input_value("#model-b") == tuned
    names = [model["id"] for model in httpx.get(f"{page_server}/v1/models").json()["data"]]
    options = page.eval_on_selector_all("#model option", "options => options.map(o => o.textContent)")
    assert options == names  # one name per model: the picker shows the ids /v1/models gives
    page.fill("#max-tokens", str(TOKENS))
    page.fill("#question", QUESTIONS[0])
    page.click("#ask")
    page.wait_for_function(ANSWERED.format(2), timeout=120_000)
    assert page.locator("#ask-error").is_hidden()
    cards = page.locator("#answers .answer")
    assert cards.count() == 2
    assert [cards.nth(i).locator(".model").inner_text() for i in range(2)] == [base, tuned]  # as in the picker
    # The base model's card: its answer asked alone through BilingualQA.ask, with the control
    # characters removed as the CLI removes them (the tiny random model writes some: \x0b and others).
    expected = {key: strip_controls(value) for key, value in alone[QUESTIONS[0]].items() if isinstance(value, str)}
    first = cards.nth(0)
    assert first.locator(".en").inner_text() == f"Q: {expected['question_en']}\n\n{expected['answer_en']}"
    assert first.locator(".ja").inner_text() == f"Q: {expected['question_ja']}\n\n{expected['answer_ja']}"
    assert cards.nth(1).locator(".ja").inner_text().startswith("Q: " + QUESTIONS[0])
    assert page.is_enabled("#ask") and page.locator("#stop").is_hidden()
    assert failed == []  # no 404 on the favicon, nor any other error
    shots = os.environ.get("SERVE_PAGE_SCREENSHOTS")
    if shots:
        page.fill("#translate-text", "Hello world.")
        page.select_option("#target", "ja")
        page.click("#translate")
        page.wait_for_function("document.getElementById('translated').textContent.length > 0", timeout=60_000)
        page.screenshot(path=os.path.join(shots, "serve-page.png"), full_page=True)
    page.close()


def test_the_favicon_is_served():
    from starlette.testclient import TestClient

    from pipeline.serve.app import create_app

    # served while (even if) the models load; on loopback, as a keyless server answers only there
    with TestClient(create_app(lambda: None), base_url="http://127.0.0.1") as client:
        for path in ("/favicon.svg", "/favicon.ico"):
            response = client.get(path)
            assert response.status_code == 200 and response.headers["content-type"].startswith("image/svg+xml")
            assert response.content.startswith(b"<svg")


def test_labels_stay_beside_their_inputs_on_a_phone(browser, page_server, fine_tune):
    page, failed = open_page(browser, page_server, width=390, height=844)
    for label_text, field in (("Max tokens", "#max-tokens"), ("Language", "#source-lang"), ("Model", "#model"),
                              ("Compare with", "#model-b"), ("From", "#source"), ("To", "#target")):
        label = page.locator(".field > span", has_text=re.compile(f"^{label_text}$")).first.bounding_box()
        box = page.locator(field).bounding_box()
        assert abs((label["y"] + label["height"] / 2) - (box["y"] + box["height"] / 2)) < 8, label_text  # one line
        assert 0 <= box["x"] - (label["x"] + label["width"]) < 40, label_text  # right after its label, not over it
        assert page.evaluate("e => e.scrollWidth <= e.clientWidth",  # the label shows whole, not cut
                             page.locator(".field > span", has_text=re.compile(f"^{label_text}$")).first.element_handle())
        assert box["x"] + box["width"] <= 390, label_text  # nothing runs off the screen
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390
    shots = os.environ.get("SERVE_PAGE_SCREENSHOTS")
    if shots:
        page.fill("#max-tokens", str(TOKENS))
        page.fill("#question", QUESTIONS[3])
        page.click("#ask")
        page.wait_for_function(ANSWERED.format(2), timeout=120_000)
        page.screenshot(path=os.path.join(shots, "serve-page-390.png"), full_page=True)
    assert failed == []
    page.close()


def test_a_chinese_question_is_an_error_in_its_own_box_in_the_pages_words(browser, page_server, fine_tune):
    page, _ = open_page(browser, page_server)
    page.fill("#question", "利率上升会怎样影响经济？")
    page.click("#ask")
    page.wait_for_selector("#ask-error:not([hidden])", timeout=60_000)
    error = page.inner_text("#ask-error")
    assert "Chinese" in error and "Language" in error  # the page's own field, not a CLI option
    assert "--" not in error and "source_lang" not in error
    assert page.locator("#answers .answer").count() == 0  # no empty answer card, no Copy, no ### ---
    assert "### ---" not in page.inner_text("body")
    assert page.evaluate("document.activeElement.id") == "source-lang"
    shots = os.environ.get("SERVE_PAGE_SCREENSHOTS")
    if shots:
        page.screenshot(path=os.path.join(shots, "serve-page-error.png"))
    page.close()


def test_a_stale_error_goes_when_a_new_different_error_appears(browser, page_server, fine_tune):
    """The last question's error box, and the red outline of the field it pointed at, go when the next
    error is another one: one at a field (max tokens) or in the box (an empty question)."""
    page, _ = open_page(browser, page_server)
    outlined = "[...document.querySelectorAll('.attention')].map(e => e.id)"
    for next_error in ("max tokens", "empty question"):
        page.fill("#max-tokens", "8")
        page.fill("#question", "利率上升会怎样影响经济？")
        page.click("#ask")
        page.wait_for_selector("#ask-error:not([hidden])", timeout=60_000)
        assert "Chinese" in page.inner_text("#ask-error") and page.evaluate(outlined) == ["source-lang"]
        if next_error == "max tokens":
            page.fill("#max-tokens", "abc")
            page.click("#ask")
            assert page.locator("#ask-error").is_hidden() and page.evaluate(outlined) == []
            assert page.is_visible("#max-tokens-hint") and page.evaluate("document.activeElement.id") == "max-tokens"
        else:
            page.fill("#question", "  ")
            page.click("#ask")
            assert page.inner_text("#ask-error") == "Type a question first."
            assert page.evaluate(outlined) == ["question"]
    # An error of the translate box is its own: it leaves the question's box and outline alone.
    page.fill("#translate-text", "")
    page.click("#translate")
    assert page.inner_text("#translate-error") == "Type the text to translate first."
    assert page.inner_text("#ask-error") == "Type a question first." and page.evaluate(outlined) == ["question"]
    page.close()


def test_the_result_footer_says_seconds_and_why_it_ended_in_words(browser, page_server, fine_tune):
    page, _ = open_page(browser, page_server)
    page.uncheck("#compare")
    page.fill("#max-tokens", "6")
    page.fill("#question", QUESTIONS[1])
    page.click("#ask")
    page.wait_for_function(ANSWERED.format(1), timeout=60_000)
    footer = page.inner_text("#answers .answer .status")
    ending = "(finished|finished \\(what phi-2 wrote after the answer was cut\\)|stopped at the token limit)"
    assert re.fullmatch(rf"\d+ tokens? · (\d+(\.\d{{1,2}})?|under 0\.01) s · {ending}", footer), footer
    said = {reason: page.evaluate("footer", {"generated_tokens": 256, "timings": {"total": 2.8921},
                                             "finish_reason": reason}) for reason in ("length", "eos", "stop")}
    assert said["length"] == "256 tokens · 2.89 s · stopped at the token limit"
    assert said["eos"] == "256 tokens · 2.89 s · finished" and "cut" in said["stop"]
    assert page.evaluate("footer", {"generated_tokens": 1, "timings": {"total": 3}, "finish_reason": "eos"}) \
        == "1 token · 3 s · finished"
    page.close()


def test_the_opened_key_box_stays_in_place_with_its_placeholder_whole_on_a_phone(browser, page_server, fine_tune):
    page, _ = open_page(browser, page_server, width=390, height=844)
    summary = page.locator("#key-box summary").bounding_box()
    page.click("#key-box summary")
    assert page.locator("#key-box summary").bounding_box() == summary  # it does not jump to the left
    field = page.locator("#api-key").bounding_box()
    assert field["x"] >= 0 and field["x"] + field["width"] <= 390 and field["y"] > summary["y"]
    room, needed = page.evaluate("""() => {
        const input = document.getElementById('api-key'), style = getComputedStyle(input);
        const context = document.createElement('canvas').getContext('2d');
        context.font = style.font;
        return [input.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight),
                context.measureText(input.placeholder).width];
    }""")
    assert needed <= room, (needed, room)  # the placeholder shows whole
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.close()


def test_a_missing_key_points_at_the_key_box(browser, live_server, registry):
    page, _ = open_page(browser, live_server, listed=False)  # this server has a key; the page has none yet
    page.wait_for_selector("#ask-error:not([hidden])")
    assert "API key box" in page.inner_text("#ask-error") and "Authorization" not in page.inner_text("#ask-error")
    assert page.evaluate("document.getElementById('key-box').open")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")  # Enter in a single-line field: the key is taken, the models listed
    page.wait_for_function(f"document.getElementById('model').options.length == {len(registry.names)}")
    assert page.locator("#ask-error").is_hidden()
    page.close()


def test_an_invalid_number_is_refused_at_the_field_and_nothing_is_sent(browser, page_server, fine_tune):
    page, _ = open_page(browser, page_server)
    asked = ask_requests(page)
    page.fill("#question", QUESTIONS[1])
    for bad in ("abc", "0", "2001", "12.5", ""):
        page.fill("#max-tokens", bad)
        page.click("#ask")
        assert page.get_attribute("#max-tokens", "aria-invalid") == "true", bad
        assert "whole number from 1 to 2000" in page.inner_text("#max-tokens-hint")
    assert asked == [] and page.locator("#answers .answer").count() == 0  # no silent 256
    page.fill("#max-tokens", "12")
    assert page.get_attribute("#max-tokens", "aria-invalid") == "false" and page.locator("#max-tokens-hint").is_hidden()
    page.close()


def test_enter_in_max_tokens_and_ctrl_enter_in_the_question_submit(browser, page_server, fine_tune):
    page, _ = open_page(browser, page_server)
    page.uncheck("#compare")
    asked = ask_requests(page)
    page.fill("#question", QUESTIONS[1])
    page.press("#question", "Enter")  # a plain Enter is a new line in the question
    assert asked == []
    page.fill("#max-tokens", "4")
    page.press("#max-tokens", "Enter")
    page.wait_for_function(ANSWERED.format(1), timeout=60_000)
    page.press("#question", "Control+Enter")  # starts the next question at once: the last answer is cleared
    assert len(asked) == 2 and page.locator("#answers .answer").count() == 1
    page.wait_for_function(ANSWERED.format(1), timeout=60_000)
    assert len(asked) == 2 and json.loads(asked[0].post_data)["max_new_tokens"] == 4
    page.close()


def test_control_characters_the_model_writes_are_removed_as_the_cli_removes_them(browser, page_server):
    page, _ = open_page(browser, page_server)
    sample = "red \x1b[31mtext\x07\r\n\tend\x00\x7f\x85\x9b ok 日本"
    assert page.evaluate("clean", sample) == strip_controls(sample)
    page.close()


def metric(url: str, name: str) -> float:
    """The largest of a metric's samples (over its labels) on /metrics: a base and its adapters may
    share one batch, whose rows each of their labels then shows."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return max(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#") and line[len(name)] in " {")


def test_stop_aborts_the_question_and_the_server_frees_its_row(browser, page_server, fine_tune):
    page, _ = open_page(browser, page_server)
    page.uncheck("#compare")
    page.fill("#max-tokens", "1500")
    page.fill("#question", "What is a bond?")
    before = metric(page_server, "bilingual_qa_generated_tokens_total")
    whole = httpx.post(f"{page_server}/v1/ask", json={"question": "What is a bond?", "max_new_tokens": 1500}, timeout=120)
    assert whole.json()["finish_reason"] == "length"  # asked to its end, this question decodes all 1500 tokens
    tokens_before = metric(page_server, "bilingual_qa_generated_tokens_total")
    whole_answer = tokens_before - before
    page.click("#ask")
    deadline = time.monotonic() + 60
    while metric(page_server, "bilingual_qa_batch_rows") < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(page_server, "bilingual_qa_batch_rows") == 1 and metric(page_server, "bilingual_qa_queue_depth") == 1
    assert page.locator(".answer .status.busy").count() == 1  # the page shows the question is running
    assert page.is_disabled("#ask") and page.inner_text("#ask") == "Asking…" and page.is_visible("#stop")
    page.click("#stop")
    deadline = time.monotonic() + 30
    while (metric(page_server, "bilingual_qa_batch_rows") or metric(page_server, "bilingual_qa_queue_depth")) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(page_server, "bilingual_qa_batch_rows") == 0  # the row is freed
    assert metric(page_server, "bilingual_qa_queue_depth") == 0
    # ... at the Stop, not once decoded to its end
    assert metric(page_server, "bilingual_qa_generated_tokens_total") - tokens_before < whole_answer
    assert page.locator("#answers .answer button").is_hidden()  # no result came: no Copy
    assert page.inner_text("#ask-status") == "Stopped."
    assert page.is_enabled("#ask") and page.locator("#stop").is_hidden() and page.locator("#ask-error").is_hidden()
    page.close()


def test_an_error_carries_a_code_and_the_language_seen_for_the_page_to_word(client):
    chinese = client.post("/v1/ask", json={"question": "利率上升会怎样影响经济？"}, headers=AUTH)
    assert chinese.status_code == 400
    assert chinese.json()["code"] == "unsupported_language" and chinese.json()["language"] == "zh"
    too_long = client.post("/v1/ask", json={"question": "What is a bond? " * 200, "max_new_tokens": 2000}, headers=AUTH)
    assert too_long.status_code == 400 and too_long.json()["code"] == "too_long", too_long.json()
    unknown = client.post("/v1/ask", json={"question": "What?", "model": "nope"}, headers=AUTH)
    assert unknown.status_code == 400 and unknown.json()["code"] == "unknown_model"


def test_a_stream_cut_before_its_result_is_an_error_not_a_spinner(browser, page_server, fine_tune):
    """A server that dies mid-answer (here: a stream that ends after its first event)."""
    page, _ = open_page(browser, page_server)
    page.uncheck("#compare")
    first = 'event: question\ndata: {"source_lang": "en", "question_en": "What is a bond?"}\n\n'
    page.route("**/v1/ask", lambda route: route.fulfill(status=200, content_type="text/event-stream", body=first))
    page.fill("#question", "What is a bond?")
    page.click("#ask")
    page.wait_for_selector("#ask-error:not([hidden])", timeout=30_000)
    assert "ended before it was complete" in page.inner_text("#ask-error")
    assert page.locator("#answers .answer").count() == 0 and page.is_enabled("#ask")
    page.close()

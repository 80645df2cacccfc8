"""The web workbench (``GET /``) driven in Debian's Chromium by Playwright: the model picker,
the knobs and the requests they make, streaming, compare mode and the pick it posts,
safe rendering of model text, conversations kept across reloads, and the API key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from chatforge import load_model
from chatforge.generation.config import DEFAULT_PRESET, GenerationConfig
from chatforge.server import ServedModel, create_app
from lora_helpers import make_adapter
from serverkit import ServerThread, slow_steps, wait_until

CHROMIUM = Path("/usr/bin/chromium")
READY = "document.getElementById('status').textContent.startsWith('ready')"

pytestmark = pytest.mark.slow  # a browser and a server per module: seconds


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e .[dev]")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    """A plain model, a named model (with its own system prompt) and a LoRA adapter, all
    on one tiny base."""
    adapter = make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("web-adapter") / "a", 1)
    lm = load_model(str(tiny_llama_dir), dtype="fp32", quantize="none")
    models = [
        ServedModel("tiny", lm, base="llama"),
        ServedModel("pirate", lm, base="llama", system="You are a pirate."),
        ServedModel("bot-a", lm, base="llama", adapter_dir=adapter),
    ]
    log = tmp_path_factory.mktemp("web-log") / "log.db"  # where /v1/feedback keeps picks
    with ServerThread(create_app(models=models, log=log)) as srv:
        assert wait_until(lambda: srv.state.started, 60)
        yield srv


@pytest.fixture()
def page(browser, server):
    """A fresh browser profile (empty localStorage) on the workbench, models loaded."""
    # bypass_csp: Playwright's waits evaluate strings, which the page's policy forbids (and
    # the hostile-reply test must pass on the page's escaping alone, not on the policy).
    context = browser.new_context(viewport={"width": 1280, "height": 800}, bypass_csp=True)
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server.url + "/")
    pg.wait_for_function(READY)
    yield pg
    context.close()
    assert not errors, errors  # no uncaught exception in the page's scripts


def chat_requests(pg) -> list[dict]:
    """The bodies of the chat requests ``pg`` sends from now on."""
    sent: list[dict] = []
    pg.on(
        "request",
        lambda r: (
            sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None
        ),
    )
    return sent


def feedback_to(pg) -> list[dict]:
    """Answer the page's ``POST /v1/feedback`` here (as the route does: 200 with ids) and
    keep the bodies it sent."""
    posted: list[dict] = []

    def answer(route):
        posted.append(json.loads(route.request.post_data))
        route.fulfill(status=200, json={"id": len(posted), "conversation_id": 1})

    pg.route("**/v1/feedback", answer)
    return posted


def send(pg, text: str, replies: int = 1) -> None:
    """Send ``text`` and wait until the ``replies`` of its turn are done."""
    turns = pg.locator(".turn").count()
    pg.fill("#input", text)
    pg.press("#input", "Enter")
    pg.locator(".turn.done").nth(turns).wait_for()  # (a selector: works under the page's CSP)
    turn = pg.locator(".turn").nth(turns)
    assert turn.locator(".reply.done").count() == replies
    assert turn.locator(".reply .error").count() == 0, turn.text_content()


def stored_replies(pg, turn: int = -1) -> list[str]:
    """The raw text of a turn's replies, as the page keeps it (before Markdown)."""
    return pg.evaluate(
        """i => { const all = JSON.parse(localStorage.getItem('chatforge-conversations'));
                  const id = JSON.parse(localStorage.getItem('chatforge-current'));
                  const turns = all.find(c => c.id === id).turns;
                  return turns.at(i).replies.map(r => r.content); }""",
        turn,
    )


def greedy_reply(srv, model: str, messages: list[dict], max_tokens: int) -> str:
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
    return r.json()["choices"][0]["message"]["content"]


def test_the_model_picker_lists_every_served_name(page, server):
    served = [c["id"] for c in httpx.get(server.url + "/v1/models").json()["data"]]
    assert served == ["tiny", "pirate", "bot-a"]
    options = page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    assert options == served
    assert "adapter on tiny" in page.locator("#model option[value='bot-a']").text_content()
    assert page.input_value("#model") == "tiny"  # the default model first


def test_the_page_starts_from_the_cli_preset_and_sends_every_knob(page):
    # Regression: the page sent its own defaults (temperature 0.7, top-p 0.9, no min-p or
    # penalty), not the balanced preset of chat/generate.
    preset = GenerationConfig.default()
    assert page.input_value("#preset") == DEFAULT_PRESET
    for knob, want in [
        ("temperature", preset.temperature),
        ("top-p", preset.top_p),
        ("top-k", preset.top_k),
        ("min-p", preset.min_p),
        ("repetition-penalty", preset.repetition_penalty),
        ("no-repeat-ngram", preset.no_repeat_ngram_size),
        ("max-tokens", 256),
    ]:
        assert float(page.input_value(f"#{knob}")) == want, knob
    assert page.input_value("#seed") == "" and page.input_value("#stop") == ""

    # Every knob changed shows up in the request the page sends.
    sent = chat_requests(page)
    page.select_option("#model", "pirate")
    page.fill("#system", "You are a test.")
    page.fill("#temperature", "0.7")
    page.fill("#top-p", "0.8")
    page.fill("#top-k", "5")
    page.fill("#min-p", "0.1")
    page.fill("#repetition-penalty", "1.2")
    page.fill("#no-repeat-ngram", "3")
    page.fill("#presence-penalty", "0.5")
    page.fill("#frequency-penalty", "0.25")
    page.fill("#max-tokens", "4")
    page.fill("#seed", "7")
    page.fill("#stop", "END\\n\nSTOP")
    send(page, "Hello knobs")
    assert len(sent) == 1
    body = sent[0]
    assert body["model"] == "pirate" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [
        {"role": "system", "content": "You are a test."},
        {"role": "user", "content": "Hello knobs"},
    ]
    assert {k: body[k] for k in body if k not in ("model", "messages", "stream_options")} == {
        "stream": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.2,
        "no_repeat_ngram_size": 3,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "max_tokens": 4,
        "seed": 7,
        "stop": ["END\n", "STOP"],
    }
    assert not page.locator(".reply .error").count()  # the server took them all
    # Another preset fills every knob, switching off what it does not set.
    page.select_option("#preset", "precise")
    assert float(page.input_value("#temperature")) == 0.0
    assert float(page.input_value("#repetition-penalty")) == 1.0
    assert float(page.input_value("#top-p")) == 1.0 and page.input_value("#top-k") == "0"


def test_a_reply_streams_with_its_speed_and_new_chat_clears(page, server):
    page.select_option("#preset", "precise")
    page.fill("#system", "You are a test.")
    page.fill("#max-tokens", "12")
    send(page, "Hello page")
    assert page.text_content(".user") == "Hello page"
    meta = page.text_content(".reply .meta")
    assert re.search(r"^12 tokens · [\d.]+ tok/s · first token \d+ ms · [\d.]+ s", meta), meta
    # The page sent the system prompt, the greedy preset and max tokens: the API's reply.
    messages = [
        {"role": "system", "content": "You are a test."},
        {"role": "user", "content": "Hello page"},
    ]
    expected = greedy_reply(server, "tiny", messages, 12)
    assert expected and stored_replies(page) == [expected]
    page.click("#new-chat")
    assert page.locator(".turn").count() == 0
    assert page.input_value("#system") == "You are a test."  # kept for the next chat


def test_compare_streams_two_columns_and_the_pick_posts_both(page, server):
    sent = chat_requests(page)
    page.select_option("#preset", "precise")
    page.fill("#max-tokens", "6")
    page.click("#add-column")  # B: a copy of A, then another model and a seed
    page.select_option("#model", "bot-a")
    page.fill("#max-tokens", "5")
    page.fill("#seed", "3")
    assert page.eval_on_selector_all("#tabs button", "bs => bs.map(b => b.textContent)") == [
        "A: tiny",
        "B: bot-a",
    ]
    # Streamed side by side: a moment when both columns show text and neither has finished
    # (the decode slowed down so that the moment lasts).
    engine = server.state.service.engine
    step = engine.step
    slow_steps(server.state, 0.05)
    try:
        page.fill("#input", "Compare me")
        page.press("#input", "Enter")
        page.wait_for_function(
            "() => { const cs = [...document.querySelectorAll('.turn .reply')];"
            " return cs.length === 2 && cs.every(c => c.querySelector('.content').textContent"
            " && !c.classList.contains('done')); }",
            polling=10,
        )
        page.wait_for_selector(".turn.done")
    finally:
        engine.step = step
    assert page.locator(".reply.done").count() == 2 and not page.locator(".reply .error").count()
    assert sorted(b["model"] for b in sent) == ["bot-a", "tiny"]
    cards = page.locator(".turn .reply")
    heads = [cards.nth(i).locator(".head").text_content() for i in range(2)]
    assert heads[0].startswith("A · tiny · precise") and heads[1].startswith("B · bot-a")
    replies = stored_replies(page)
    messages = [{"role": "user", "content": "Compare me"}]
    assert replies == [
        greedy_reply(server, "tiny", messages, 6),
        greedy_reply(server, "bot-a", messages, 5),
    ]
    for i in range(2):
        assert re.search(r"tokens · [\d.]+ tok/s · first token", cards.nth(i).text_content())

    # The pick goes to the server's real /v1/feedback, which keeps it in the log.
    with page.expect_response("**/v1/feedback") as answer:
        page.click("text=Pick B")
    assert answer.value.status == 200, answer.value.text()
    saved = answer.value.json()
    page.wait_for_function("document.querySelector('.reply.chosen .note').textContent")
    assert cards.nth(1).locator(".note").text_content() == f"saved to the log (#{saved['id']})"
    pick = answer.value.request.post_data_json
    assert pick["kind"] == "pick" and pick["chosen"] == 1 and pick["source"] == "web"
    assert pick["messages"] == messages
    assert [r["model"] for r in pick["replies"]] == ["tiny", "bot-a"]
    assert pick["replies"][1]["settings"]["seed"] == 3
    assert pick["replies"][1]["settings"]["max_tokens"] == 5
    assert "seed" not in pick["replies"][0]["settings"]
    for r, text in zip(pick["replies"], replies, strict=True):
        assert r["content"] == text
        assert r["response_id"].startswith("chatcmpl") and r["usage"]["completion_tokens"]
    assert "chosen" in cards.nth(1).get_attribute("class")
    # The conversation goes on from the reply picked, in every column.
    send(page, "And then?", replies=2)
    history = [b["messages"] for b in sent[2:]]
    assert history[0] == history[1]
    assert history[0][1] == {"role": "assistant", "content": pick["replies"][1]["content"]}


def test_stop_ends_a_reply_and_retry_asks_again(page, server):
    sent = chat_requests(page)
    page.fill("#max-tokens", "40")
    engine = server.state.service.engine
    step = engine.step
    slow_steps(server.state, 0.05)
    try:
        page.fill("#input", "Tell me a long story")
        page.press("#input", "Enter")
        page.locator(".reply .content :text-matches('.')").first.wait_for()
        page.click("#stop-reply")
        page.locator(".turn.done").wait_for()
    finally:
        engine.step = step
    meta = page.text_content(".reply .meta")
    assert re.search(r"^~\d+ tokens · .* · stopped$", meta) and "~40 tokens" not in meta
    assert page.is_enabled("#send") and page.is_disabled("#stop-reply")
    # Retry: the same prompt again (with the settings now set), in place of the last turn.
    page.fill("#max-tokens", "2")
    page.click("#retry")
    page.locator(".turn.done").wait_for()
    assert page.locator(".turn").count() == 1
    assert [b["messages"] for b in sent] == [
        [{"role": "user", "content": "Tell me a long story"}]
    ] * 2
    assert sent[1]["max_tokens"] == 2
    # Columns come and go; a conversation can be deleted from this browser.
    page.click("#add-column")
    page.click("#remove-column")
    assert page.locator("#tabs button").count() == 1 and page.is_disabled("#remove-column")
    page.click("#conversations li button")
    assert page.locator("#conversations li").count() == 0 and page.locator(".turn").count() == 0


HOSTILE = (
    'Look: <script>window.__pwned=1</script> and <img src=x onerror="window.__pwned=1">\n\n'
    "**bold** and `<b>code</b>` and [a link](https://example.com/) and "
    "[bad](javascript:window.__pwned=1)\n\n```html\n<img src=x onerror=alert(1)>\n```\n"
)


def sse(text: str) -> str:
    """A streamed chat reply of ``text`` (in a few chunks), as the server sends it."""
    parts = [text[i : i + 20] for i in range(0, len(text), 20)]
    chunks = [
        {"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {"content": p}}]} for p in parts
    ]
    chunks.append(
        {"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    )
    chunks.append({"id": "chatcmpl-x", "choices": [], "usage": {"completion_tokens": 9}})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def test_model_text_is_rendered_as_markdown_never_as_html(page):
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(
            status=200, headers={"Content-Type": "text/event-stream"}, body=sse(HOSTILE)
        ),
    )
    posted = feedback_to(page)
    send(page, "Say something nasty")
    content = page.locator(".reply .content")
    assert page.evaluate("window.__pwned") is None
    assert content.locator("script, img").count() == 0
    text = content.text_content()
    assert "<script>window.__pwned=1</script>" in text and 'onerror="window.__pwned=1"' in text
    assert content.locator("strong").text_content() == "bold"
    assert content.locator("p code").text_content() == "<b>code</b>"
    assert content.locator("pre code").text_content() == "<img src=x onerror=alert(1)>"
    links = content.locator("a")
    assert links.count() == 1 and links.get_attribute("href") == "https://example.com/"
    assert "[bad](javascript:window.__pwned=1)" in text
    # Thumbs and an edit go to the conversation log, one reply each.
    page.click("text=👍")
    page.click("text=Edit")
    page.fill(".reply textarea", "A better reply.")
    page.click(".reply >> text=Save")
    page.wait_for_function("window.document.querySelector('.note').textContent.includes('#2')")
    assert [p["kind"] for p in posted] == ["good", "edit"]
    assert posted[1]["edited"] == "A better reply." and "chosen" not in posted[1]
    assert posted[1]["replies"][0]["content"] == HOSTILE
    assert posted[1]["messages"] == [{"role": "user", "content": "Say something nasty"}]
    assert content.text_content() == "A better reply."


def test_a_failed_feedback_post_shows_the_servers_message(page):
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(headers={"Content-Type": "text/event-stream"}, body=sse("Hi")),
    )
    page.route(
        "**/v1/feedback",
        lambda route: route.fulfill(status=400, json={"error": {"message": "no log configured"}}),
    )
    send(page, "hello")
    page.click("text=👎")
    page.wait_for_function("document.querySelector('.note').textContent.includes('no log')")
    assert page.text_content(".note") == "not saved: no log configured"


def test_conversations_and_settings_survive_a_reload(page):
    page.select_option("#preset", "precise")
    page.fill("#max-tokens", "3")
    page.fill("#system", "Be brief.")
    send(page, "First chat")
    reply = stored_replies(page)
    page.click("#new-chat")
    send(page, "Second chat")
    page.reload()
    page.wait_for_function(READY)
    titles = page.eval_on_selector_all("#conversations li span", "s => s.map(x => x.textContent)")
    assert titles == ["Second chat", "First chat"]
    assert page.text_content(".user") == "Second chat"  # the current one is open
    assert page.input_value("#max-tokens") == "3" and page.input_value("#preset") == "precise"
    page.click("#conversations >> text=First chat")
    assert page.text_content(".user") == "First chat"
    assert stored_replies(page) == reply
    assert page.input_value("#system") == "Be brief."
    assert re.search(r"\d tokens · .* tok/s", page.text_content(".reply .meta"))


def test_the_page_works_with_an_api_key_and_its_own_csp(browser, tiny_llama_dir):
    """A one-model server with a key; the page under its Content-Security-Policy (so the
    waits here are selectors, which need no string evaluation)."""
    from playwright.sync_api import expect

    lm = load_model(str(tiny_llama_dir), dtype="fp32", quantize="none")
    with ServerThread(create_app(lm, model_id="tiny", api_key="s3cret")) as srv:
        context = browser.new_context()
        pg = context.new_page()
        console = []
        pg.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
        pg.on("pageerror", lambda e: console.append(str(e)))
        for path in ("/", "/static/chat.js", "/static/chat.css", "/static/markdown.js"):
            r = httpx.get(srv.url + path)  # the page and its files are public
            assert (
                r.status_code == 200 and "script-src 'self'" in r.headers["content-security-policy"]
            )
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        key = {"Authorization": "Bearer s3cret"}
        assert httpx.get(srv.url + "/static/app.py", headers=key).status_code == 404
        pg.goto(srv.url + "/")
        expect(pg.locator("#status")).to_contain_text("This server needs an API key")
        pg.fill("#api-key", "s3cret")
        pg.press("#api-key", "Tab")  # the change event
        expect(pg.locator("#status")).to_have_text("ready: 1 model")
        assert pg.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ["tiny"]
        with pg.expect_request("**/v1/chat/completions") as request:
            pg.fill("#max-tokens", "3")
            send(pg, "Hello with a key")
        assert request.value.headers["authorization"] == "Bearer s3cret"
        assert re.search(r"\d tokens", pg.text_content(".reply .meta"))
        pg.reload()  # the key is kept
        expect(pg.locator("#status")).to_have_text("ready: 1 model")
        context.close()
        # Only the 401s of the keyless start: no policy violation, no script error.
        assert all("401" in m for m in console), console


MARKDOWN = [  # text -> the HTML the page makes of it
    (
        "# Title\nSome *em* and **strong**",
        "<h1>Title</h1><p>Some <em>em</em> and <strong>strong</strong></p>",
    ),
    ("one\ntwo\n\nthree", "<p>one<br>two</p><p>three</p>"),
    (
        "- a\n- b `x<y`\n\n3. c\n4. d",
        '<ul><li>a</li><li>b <code>x&lt;y</code></li></ul><ol start="3"><li>c</li><li>d</li></ol>',
    ),
    (
        "```py\nif a < b:\n    pass",
        '<pre><code data-lang="py">if a &lt; b:\n    pass</code></pre>',
    ),  # an unclosed fence: a reply still streaming
    ("> quoted **x**\n\n---", "<blockquote><p>quoted <strong>x</strong></p></blockquote><hr>"),
    ("snake_case_name and 2 * 3 * 4", "<p>snake_case_name and 2 * 3 * 4</p>"),
    (
        '[x](http://a.b/c) [y](data:text/html,hi) <a href="javascript:1">z</a>',
        '<p><a href="http://a.b/c" target="_blank" rel="noopener noreferrer">x</a> '
        '[y](data:text/html,hi) &lt;a href="javascript:1"&gt;z&lt;/a&gt;</p>',
    ),
]


def test_the_markdown_subset(page):
    render = (
        "t => { const d = document.createElement('div'); d.append(Markdown.render(t));"
        " return d.innerHTML; }"
    )
    for text, html in MARKDOWN:
        assert page.evaluate(render, text) == html

"""The chat page at / in headless Chromium (Debian's, driven by Playwright): type, watch the reply
stream, stop it, call a tool and send its result, switch the language; in code-interpreter mode, see
the code the server ran, its output and its plot. Screenshots are saved.

The model is scripted (tests/live_server.py) and slowed down, so the stream can be watched and
stopped; the page, the server, the generator and the Jupyter kernel are the real ones.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from live_server import (
    LiveServer,
    ScriptedModel,
    code_reply,
    text_reply,
    tool_call_reply,
)

from glmkit.agent.interpreter import SandboxLimits
from glmkit.server import create_app
from glmkit.server.backend import SequentialBackend
from glmkit.server.server_tools import ServerTools

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STORY = "从前有一座山，山上有一座庙。Once upon a time there was a mountain, and on it a temple. " * 6
WEATHER_ANSWER = "北京今天晴，25 °C. It is sunny in Beijing."
PLOT = ("print('squares:', [x * x for x in range(4)])\n"
        "import matplotlib.pyplot as plt\n"
        "plt.plot(range(4), [x * x for x in range(4)]); plt.title('y = x^2'); plt.show()")
PLOT_ANSWER = "画好了：y = x² 的图像在上面。The plot is above."


@pytest.fixture
def browser_page(tmp_path):
    if not CHROMIUM.exists():
        pytest.fail(f"Chromium is not at {CHROMIUM}: install Debian's chromium (scripts/test.sh does, as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1200, "height": 800}, locale="en-US")
        try:
            yield context.new_page()
        finally:
            context.close()


@pytest.mark.slow
def test_chat_page_streams_stops_and_shows_tool_calls(browser_page, tok, tmp_path):
    observation = tok.token_id("<|observation|>")

    def reply_for(prompt):
        text = tok.decode(prompt)
        if observation in prompt:
            return text_reply(tok, WEATHER_ANSWER)
        if "weather" in text.rsplit("<|user|>", 1)[-1]:
            return tool_call_reply(tok, "get_weather", "city='北京'")
        return text_reply(tok, STORY)

    model = ScriptedModel(tok, reply_for, delay=0.02)
    app = create_app((model, tok), model_name="scripted-chatglm3", backend=SequentialBackend(model, tok))
    page = browser_page
    with LiveServer(app) as live:
        page.goto(live.url + "/")
        page.wait_for_function("document.getElementById('model-name').textContent === 'scripted-chatglm3'")
        page.fill("#system", "Answer briefly. 请简短回答。")

        # Type a message; the reply streams in.
        page.fill("#prompt", "你好! Tell me a story.")
        page.press("#prompt", "Enter")
        reply = page.locator(".msg.assistant").last
        page.wait_for_function("document.querySelector('.msg.assistant .text')?.textContent.length > 10")
        first = reply.locator(".text").text_content()
        page.wait_for_function(f"document.querySelector('.msg.assistant .text').textContent.length > {len(first)}")
        assert page.is_visible("#stop") and not page.is_visible("#send")
        assert "从前有一座山" in reply.locator(".text").text_content()

        # Stop it: the text stops growing, the server's generation stops, the page can send again.
        page.click("#stop")
        page.wait_for_selector(".msg.assistant.stopped")
        stopped = reply.locator(".text").text_content()
        calls = model.calls
        time.sleep(0.5)
        assert reply.locator(".text").text_content() == stopped and STORY.startswith(stopped)
        assert len(stopped) < len(STORY) and model.calls - calls <= 2
        assert page.is_visible("#send") and "stopped" in reply.text_content()

        # A tool call is shown as one; its result is sent back and the answer follows.
        page.click("#tools-example")
        page.fill("#prompt", "What's the weather in Beijing?")
        page.click("#send")
        card = page.locator(".msg.tool-call")
        card.wait_for()
        assert 'get_weather({"city": "北京"})' in card.text_content()
        card.locator("textarea").fill('{"weather": "sunny", "temperature": 25}')
        card.locator("button").click()
        page.wait_for_selector(".msg.tool-result")
        page.wait_for_function(f"[...document.querySelectorAll('.msg.assistant .text')].some("
                               f"e => e.textContent === {WEATHER_ANSWER!r})")
        page.wait_for_selector(".msg.assistant.streaming", state="detached")
        # The last request carried the whole conversation: system prompt, the stopped reply, the call.
        last_prompt = tok.decode(model.prompts[-1])
        assert "请简短回答" in last_prompt and stopped.strip()[:20] in last_prompt
        assert "tool_call(city='北京')" in last_prompt and '"temperature": 25' in last_prompt

        # The page speaks Chinese too.
        page.click("#lang")
        assert page.text_content("#send") == "发送" and page.text_content("#new-chat") == "新对话"

        screenshot = tmp_path / "chat_page.png"
        page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    print(f"\nscreenshot of the chat page: {screenshot}")


@pytest.mark.slow
def test_chat_page_runs_the_code_interpreter_on_the_server(browser_page, tok, tmp_path):
    observation = tok.token_id("<|observation|>")

    def reply_for(prompt):
        return text_reply(tok, PLOT_ANSWER) if observation in prompt else code_reply(tok, PLOT)

    model = ScriptedModel(tok, reply_for, delay=0.01)
    tools = ServerTools(interpreter=SandboxLimits(timeout=60), sessions_dir=tmp_path / "sessions")
    app = create_app((model, tok), model_name="scripted-chatglm3", backend=SequentialBackend(model, tok),
                     server_tools=tools)
    page = browser_page
    page.set_default_timeout(120_000)  # a kernel starts for the message, on a machine that may be busy
    with LiveServer(app) as live:
        page.goto(live.url + "/")
        page.wait_for_function("document.querySelector('#mode option[value=interpreter]').disabled === false")
        # The server runs no tools of its own: that mode is off, and the page says how to turn it on.
        assert page.is_disabled("#mode option[value=tools]")
        assert "glmkit serve --tools FILE" in page.text_content("#mode-note")

        page.select_option("#mode", "interpreter")
        page.fill("#prompt", "画出 y = x² 的图像。Plot y = x^2.")
        page.press("#prompt", "Enter")
        code = page.locator(".msg.code")
        code.wait_for()
        assert code.locator("pre").text_content() == PLOT
        output = page.locator(".msg.code-output")
        output.wait_for()
        assert output.locator("pre.out.stdout").text_content() == "squares: [0, 1, 4, 9]\n"
        image = output.locator("img")
        assert image.get_attribute("src").startswith("data:image/png;base64,iVBORw0KGgo")
        page.wait_for_function("document.querySelector('.msg.code-output img').naturalWidth > 100")
        page.wait_for_function(f"[...document.querySelectorAll('.msg.assistant .text')].some("
                               f"e => e.textContent === {PLOT_ANSWER!r})")
        page.wait_for_selector(".msg.assistant.streaming", state="detached")
        # In order: the user's message, the code, its output, then the answer (no empty bubbles).
        kinds = page.eval_on_selector_all("#messages .msg", "els => els.map(e => e.className)")
        assert kinds == ["msg user", "msg code", "msg code-output", "msg assistant"]
        # The request asked for the interpreter: the model got its system prompt; the session is gone.
        assert "你可以处理用户上传到电脑上的文件" in tok.decode(model.prompts[0])
        page.click("#lang")
        assert page.text_content(".msg.code-output .role") == "运行结果"

        screenshot = tmp_path / "chat_page_interpreter.png"
        page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    deadline = time.monotonic() + 30
    while tools.sessions:  # the message's session is closed after its reply
        assert time.monotonic() < deadline, "the interpreter session outlived its request"
        time.sleep(0.1)
    print(f"\nscreenshot of the chat page in code-interpreter mode: {screenshot}")

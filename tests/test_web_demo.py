"""`dualtoken serve` (mllm/serve/): the session / limits / engine logic without a browser, then the Gradio app
in headless Chromium (Playwright with the system browser) on 127.0.0.1, all on a micro model saved to a temp dir.

The browser tests skip, saying what to install, only where gradio, playwright or a Chromium binary is missing (with
DUALTOKEN_REQUIRE_BROWSER=1 they fail instead). Screenshots go to each test's tmp_path.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from mllm_testing import build_micro, tiny_image_tokenizer, train_text_tokenizer
from PIL import Image

from data_recipes.image_io import load_image
from mllm.generation import ChatReply, generate_chat, generate_images
from mllm.serve import command
from mllm.serve.app import build_app, launch
from mllm.serve.engine import STREAM_SENTINEL, DemoEngine
from mllm.serve.limits import ChatOptions, ImageOptions, ServeLimits, UserInputError, read_upload
from mllm.serve.session import ChatSession

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # Gradio's own pandas deprecations
LIMITS = ServeLimits(max_upload_bytes=200_000, max_pixels=250_000, max_turns=3, max_message_chars=200)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A micro model + processor with the untrained tiny DualToken tokenizer, saved like a trained one."""
    image_tokenizer = tiny_image_tokenizer()
    if image_tokenizer is None:
        pytest.skip("tokenizer.presets.build_tokenizer is not available: no image tokenizer")
    text_tokenizer = train_text_tokenizer(tmp_path_factory.mktemp("sp"))
    model, processor = build_micro(text_tokenizer, seed=21, image_tokenizer=image_tokenizer)
    directory = tmp_path_factory.mktemp("ckpt") / "model"
    model.save_pretrained(directory, processor=processor)
    return directory


@pytest.fixture(scope="module")
def engine(checkpoint, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("serve")
    return DemoEngine.from_directory(checkpoint, device="cpu", limits=LIMITS, workdir=workdir)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Named test files: a photo, a corrupt "PNG", a truncated PNG, a pixel bomb and an over-size file."""
    root = tmp_path_factory.mktemp("uploads")
    photo = Image.new("RGB", (50, 38), (255, 255, 255))
    photo.paste((200, 30, 30), (10, 5, 30, 25))
    photo.save(root / "photo.png")
    (root / "corrupt.png").write_bytes(b"this is not an image at all " * 8)
    full = (root / "photo.png").read_bytes()
    (root / "truncated.png").write_bytes(full[: len(full) // 2])
    Image.new("L", (600, 600), 0).save(root / "bomb.png")  # 360k pixels, a small file
    noise = torch.randint(0, 256, (300, 300, 3), generator=torch.Generator().manual_seed(0)).byte().numpy()
    Image.fromarray(noise).save(root / "large.bmp")  # 270 kB uncompressed
    return {path.stem: path for path in root.iterdir()}


def _conversation_reply(engine, messages, codes, options, offset=0):
    settings = options.settings(engine.defaults, engine.limits)
    settings = settings.with_overrides(seed=settings.seed + offset)
    (reply,) = generate_chat(engine.model, engine.processor, [messages], [codes], settings)
    return reply


def _answer(engine, session, text, uploads=(), options=None):
    engine.start_turn(session, text, list(uploads))
    return list(engine.stream_reply(session, options or ChatOptions(max_new_tokens=12)))


# ---------------------------------------------------------------------- limits and safe reading


def test_read_upload_turns_every_bad_file_into_a_clear_message(images, tmp_path):
    assert read_upload(images["photo"], LIMITS).size == (50, 38)
    cases = {
        "corrupt": "Cannot use the image corrupt.png: not a recognized image",
        "truncated": "Cannot use the image truncated.png",
        "bomb": "600x600 = 360000 pixels, above the limit of 250000 pixels",
        "large": "uploads are limited to 0.2 MB",
    }
    for stem, expected in cases.items():
        with pytest.raises(UserInputError, match=expected.replace(".", r"\.")):
            read_upload(images[stem], LIMITS)
    with pytest.raises(UserInputError, match="Cannot read the upload gone.png"):
        read_upload(tmp_path / "gone.png", LIMITS)
    with pytest.raises(ValueError, match="ServeLimits.max_pixels must be a positive integer"):
        ServeLimits(max_pixels=0)


def test_options_are_checked_and_mapped_to_generation_settings(engine):
    settings = ImageOptions(n=2, cfg_scale=2.5, temperature=0.5, top_k=7, top_p=0.5, seed=9).settings(
        engine.defaults, LIMITS
    )
    assert (settings.images_per_prompt, settings.cfg_scale, settings.image_temperature) == (2, 2.5, 0.5)
    assert (settings.image_top_k, settings.image_top_p, settings.seed) == (7, 0.5, 9)
    chat = ChatOptions(
        max_new_tokens=5, temperature=0.0, top_k=3, top_p=0.5, seed=2, allow_image_output=False
    )
    chat = chat.settings(engine.defaults, LIMITS)
    assert (chat.max_new_tokens, chat.temperature, chat.top_k, chat.top_p, chat.seed) == (5, 0.0, 3, 0.5, 2)
    assert chat.allow_image_output is False
    bad = [
        (ImageOptions(n=LIMITS.max_images_per_request + 1), "number of images must lie in"),
        (ImageOptions(top_k=2.5), "top-k must be a whole number"),
        (ChatOptions(top_p=0.0), "top-p must lie in"),
        (ChatOptions(max_new_tokens=LIMITS.max_new_tokens + 1), "max new tokens must lie in"),
        (ChatOptions(seed=None), "seed must be a number"),
    ]
    for options, message in bad:
        with pytest.raises(UserInputError, match=message):
            options.settings(engine.defaults, LIMITS)


def test_refused_messages_leave_the_session_unchanged(engine, images):
    session = ChatSession()
    refusals = [
        (("", []), "Type a message or attach an image"),
        (("x" * 201, []), "has 201 characters; the limit is 200"),
        (("look", [images["photo"]] * 5), "5 images attached; a message may carry at most 4"),
        (("look", [images["corrupt"]]), "not a recognized image"),
        (("<image> and <|im_start|>", []), "reserved marker <\\|im_start\\|>"),
    ]
    for (text, uploads), message in refusals:
        with pytest.raises(UserInputError, match=message):
            engine.start_turn(session, text, uploads)
        assert session.turns == []
    for k in range(LIMITS.max_turns):
        _answer(engine, session, f"turn {k}")
    with pytest.raises(UserInputError, match="reached 3 turns; press Clear"):
        engine.start_turn(session, "one more", [])
    assert len(session.turns) == 3


def test_context_length_is_checked_before_generating(engine, images):
    session = ChatSession()
    engine.start_turn(session, "what color is the square", [images["photo"]])
    options = ChatOptions(max_new_tokens=LIMITS.max_new_tokens)  # 512 + an image's 65 steps > 512 positions
    with pytest.raises(UserInputError, match="too long for the model.*context of 512"):
        list(engine.stream_reply(session, options))
    assert session.pending() is session.turns[0]


# ---------------------------------------------------------------------- sessions


def test_concurrent_sessions_keep_their_own_history_and_match_the_library(engine, images):
    sessions = {"alpha": ChatSession(), "beta": ChatSession()}
    options = ChatOptions(max_new_tokens=10, allow_image_output=False)
    errors = []

    def chat(name: str) -> None:
        try:
            for question in (f"{name} first", f"{name} second"):
                _answer(engine, sessions[name], question, [images["photo"]], options)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=chat, args=(name,)) for name in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    for name, other in (("alpha", "beta"), ("beta", "alpha")):
        session = sessions[name]
        messages, codes = session.conversation()
        assert [m["role"] for m in messages] == ["user", "assistant"] * 2
        assert [m["content"] for m in messages[::2]] == [f"<image>\n{name} first", f"<image>\n{name} second"]
        assert not any(other in m["content"] for m in messages)
        assert len(codes) == 2
        shown = session.chatbot_messages()
        assert len(shown) == 4 and all(other not in str(m["content"]) for m in shown)
        # each turn's reply is what the library gives for that conversation alone (seed + turn index)
        reply = _conversation_reply(engine, messages[:3], codes[:2], options, offset=1)
        assert messages[3]["content"] == reply.content
    assert sessions["alpha"].session_id != sessions["beta"].session_id


def test_streaming_yields_a_growing_reply_that_ends_as_the_library_answer(engine, images):
    session = ChatSession()
    options = ChatOptions(max_new_tokens=16, temperature=1.0, top_p=1.0, seed=3, allow_image_output=False)
    engine.start_turn(session, "describe the image please", [images["photo"]])
    messages, codes = session.conversation()
    partials = list(engine.stream_reply(session, options))
    expected = _conversation_reply(engine, messages, codes, options)
    assert len(expected.token_ids) > 3, "the micro model should answer with several tokens"
    assert len(partials) >= 3, partials
    assert partials[-1] == expected.text and session.turns[0].reply.content == expected.content
    for shorter, longer in zip(partials[:-2], partials[1:-1]):
        assert longer.startswith(shorter) and len(longer) > len(shorter)
    assert STREAM_SENTINEL not in partials[-1]


def test_a_drawn_image_is_saved_and_shown_inline_and_regenerate_replaces_it(engine, images, monkeypatch):
    codes = (torch.zeros(8, 8, 4, dtype=torch.long), torch.ones(8, 8, 4, dtype=torch.long))
    drawn = Image.new("RGB", (64, 64), (0, 200, 0))
    calls = []

    def fake_generate_chat(model, processor, conversations, image_lists, settings):
        calls.append((conversations[0], len(image_lists[0]), settings.seed))
        return [
            ChatReply("look:  done", "look: <image> done", [], [codes], [drawn], ["look: ", drawn, " done"])
        ]

    monkeypatch.setattr("mllm.generation.generate_chat", fake_generate_chat)
    session = ChatSession()
    engine.start_turn(session, "draw a square", [images["photo"]])
    list(engine.stream_reply(session, ChatOptions(seed=4)))
    assistant = session.chatbot_messages()[1]
    assert assistant["role"] == "assistant"
    text_before, picture, text_after = assistant["content"]
    assert (text_before, text_after) == ("look: ", " done")
    assert load_image(picture["path"]).getpixel((10, 10)) == (0, 200, 0)
    user = session.chatbot_messages()[0]["content"]
    assert load_image(user[0]["path"]).size == (50, 38) and user[1] == "draw a square"
    messages, all_codes = session.conversation()
    assert messages[1]["content"] == "look: <image> done" and len(all_codes) == 2
    assert all_codes[1][1].eq(1).all()

    restore = session.rewind_reply()  # regenerate: the reply and its image codes leave the conversation
    messages, all_codes = session.conversation()
    assert len(messages) == 1 and len(all_codes) == 1 and session.seed_offset() == 1000
    restore()
    assert len(session.conversation()[0]) == 2 and session.seed_offset() == 0
    session.rewind_reply()
    list(engine.stream_reply(session, ChatOptions(seed=4)))
    assert [seed for _, _, seed in calls] == [4, 1004]
    engine.forget_session(session)
    assert not engine.session_dir(session).exists()


# ---------------------------------------------------------------------- text to image and tokenizer


def test_generate_writes_the_library_images_with_per_image_seeds(engine):
    progress = []
    options = ImageOptions(n=2, cfg_scale=3.0, temperature=1.0, top_k=64, top_p=0.96, seed=5)
    made = engine.generate(
        "a red circle", options, progress=lambda done, total: progress.append((done, total))
    )
    assert [image.seed for image in made] == [5, 6]
    cells = engine.model.config.num_image_positions
    assert progress[-1] == (cells, cells) and len(progress) == cells
    expected = generate_images(
        engine.model, engine.processor, ["a red circle"], options.settings(engine.defaults, LIMITS)
    )
    for image, reference in zip(made, expected.images[0]):
        assert load_image(image.path).tobytes() == reference.tobytes()
    with pytest.raises(UserInputError, match="Type a prompt"):
        engine.generate("   ", options)
    with pytest.raises(UserInputError, match="The prompt contains the reserved marker <boi>"):
        engine.generate("a circle <boi>", options)


def test_tokenizer_view_shows_reconstruction_and_code_heat_maps(engine, images):
    view = engine.tokenize(images["photo"])
    assert view.model_input.size == view.reconstruction.size == (64, 64)
    # 4 depth panels of an 8x8 grid at 16 px per cell, 6 px apart, under a 14 px label row
    assert view.pixel_heatmap.size == view.semantic_heatmap.size == (4 * 128 + 3 * 6, 14 + 128)
    assert "8x8 grid, depth 4, codebook 1024" in view.summary and "PSNR" in view.summary
    with pytest.raises(UserInputError, match="not a recognized image"):
        engine.tokenize(images["corrupt"])


# ---------------------------------------------------------------------- the command


def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_serve_without_a_model_says_how_to_get_one(tmp_path, monkeypatch, capsys, checkpoint):
    monkeypatch.chdir(tmp_path)
    args = _serve_args()
    assert (args.host, args.port, args.model) == ("127.0.0.1", 7860, None)
    assert args.func(args) == 2
    error = capsys.readouterr().err
    assert "no model to serve" in error and "--model DIR" in error and "make demo" in error
    assert command.resolve_model_dir(None) is None
    shutil.copytree(checkpoint, tmp_path / "runs" / "demo" / "mllm")
    assert command.resolve_model_dir(None) == command.DEFAULT_MODEL_DIR
    assert command.resolve_model_dir("elsewhere") == Path("elsewhere")


# ---------------------------------------------------------------------- the browser


def _chromium_path() -> str | None:
    for candidate in (
        os.environ.get("CHROMIUM_PATH"),
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _unavailable(reason: str) -> None:
    """Skip, or fail where DUALTOKEN_REQUIRE_BROWSER=1 (CI, whose set-up installs the browser stack)."""
    if os.environ.get("DUALTOKEN_REQUIRE_BROWSER") == "1":
        pytest.fail(f"DUALTOKEN_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    missing = [name for name in ("gradio", "playwright") if importlib.util.find_spec(name) is None]
    if missing:
        _unavailable(
            f"browser test needs {' and '.join(missing)}: pip install 'gradio==6.31.0' 'playwright==1.65.2'"
        )
    chromium = _chromium_path()
    if chromium is None:
        _unavailable(
            "browser test needs a Chromium binary: apt-get install -y chromium (or set CHROMIUM_PATH)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def server(browser, engine, tmp_path_factory):
    """The app on 127.0.0.1 at a free port, served from this process's threads (Gradio's cache in a temp dir)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        app = build_app(engine)
        launch(app, engine, "127.0.0.1", port, block=False)
        yield f"http://127.0.0.1:{port}/"
        app.close()


def _open(browser, url):
    context = browser.new_context(viewport={"width": 1100, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.goto(url)
    page.wait_for_selector("#chat-input textarea")
    return context, page


def _send(page, text, upload=None):
    if upload is not None:
        page.set_input_files("#chat-input input[type=file]", str(upload))
        page.wait_for_selector("#chat-input img, #chat-input .thumbnail-item", timeout=10_000)
    page.locator("#chat-input textarea").fill(text)
    page.locator("#chat-input textarea").press("Enter")


def _wait_for_reply(page, replies: int):
    """Wait until the chat has `replies` finished assistant turns (no streaming cursor left)."""
    page.wait_for_function(
        """n => {
            const rows = document.querySelectorAll('#chatbot .bot-row');
            return rows.length >= n && !document.querySelector('#chatbot').innerText.includes('▌');
        }""",
        arg=replies,
    )
    time.sleep(0.3)  # let the last render settle


def _set_number(field, value: int) -> None:
    """Type into a Gradio number field until the value sticks (an accordion renders its children lazily, and a
    value typed while it renders is lost)."""
    for _ in range(50):
        field.fill(str(value))
        field.press("Tab")
        time.sleep(0.1)
        if field.input_value() == str(value):
            return
    raise AssertionError(f"the number field does not keep the value {value}")


def _squash(text: str) -> str:
    return "".join(text.split())


def test_browser_chat_about_an_uploaded_image_with_an_inline_drawn_image(
    browser, server, engine, images, tmp_path
):
    question = "what color is the square"
    photo_codes = engine.processor.encode_images([load_image(images["photo"])])
    messages = [{"role": "user", "content": f"<image>\n{question}"}]
    codes = [(photo_codes[0][0], photo_codes[1][0])]
    for seed in range(200):  # a seed for which the model opens an image inside its reply (interleaved mode)
        expected = _conversation_reply(engine, messages, codes, ChatOptions(seed=seed))
        if expected.images and expected.text.strip():
            break
    else:
        pytest.fail("no seed in 0..199 makes the micro model draw an image inside its reply")
    context, page = _open(browser, server)
    page.get_by_text("Sampling").click()
    _set_number(page.locator("#chat-seed input"), seed)
    _send(page, question, upload=images["photo"])
    _wait_for_reply(page, 1)
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    assert page.locator("#chatbot [data-testid=user] img").count() == 1
    assert question in page.locator("#chatbot .user-row").inner_text()
    bot = page.locator("#chatbot .bot-row")
    assert _squash(bot.inner_text()) == _squash(expected.text)
    assert bot.locator("img").count() == len(expected.images) == 1
    assert page.locator("#chat-status").inner_text().strip() == ""
    context.close()


def test_browser_corrupt_upload_shows_the_safe_io_error_and_the_app_keeps_serving(
    browser, server, images, tmp_path
):
    context, page = _open(browser, server)
    page.set_input_files("#chat-input input[type=file]", str(images["large"]))  # over max_upload_bytes
    page.get_by_text("exceed the maximum allowed size").wait_for()  # Gradio's toast; the file is not attached
    time.sleep(0.6)  # the toast fades in
    page.screenshot(path=str(tmp_path / "too-large.png"))
    _send(page, "what is this", upload=images["corrupt"])
    status = page.locator("#chat-status")
    status.get_by_text("Cannot use the image corrupt.png").wait_for()
    page.screenshot(path=str(tmp_path / "corrupt.png"), full_page=True)
    assert "not a recognized image" in status.inner_text()
    assert page.locator("#chatbot .user-row").count() == 0
    page.get_by_role("button", name="Clear").click()  # empties the input (and the bad file) and the status
    page.wait_for_function(
        "!document.querySelector('#chat-status').innerText.trim()"
        " && !document.querySelector('#chat-input textarea').value"
    )
    _send(page, "how many shapes are there")
    _wait_for_reply(page, 1)
    page.screenshot(path=str(tmp_path / "after-corrupt.png"), full_page=True)
    assert "how many shapes are there" in page.locator("#chatbot .user-row").inner_text()
    assert status.inner_text().strip() == ""
    context.close()


def test_browser_two_sessions_do_not_see_each_other(browser, server, tmp_path):
    first_context, first = _open(browser, server)
    second_context, second = _open(browser, server)
    _send(first, "alpha red circle")
    _send(second, "beta blue triangles")
    _wait_for_reply(first, 1)
    _wait_for_reply(second, 1)
    _send(first, "alpha again")
    _wait_for_reply(first, 2)
    first.screenshot(path=str(tmp_path / "session-alpha.png"), full_page=True)
    second.screenshot(path=str(tmp_path / "session-beta.png"), full_page=True)

    def user_turns(page) -> list[str]:
        return [row.strip() for row in page.locator("#chatbot .user-row").all_inner_texts()]

    assert user_turns(first) == ["alpha red circle", "alpha again"]
    assert user_turns(second) == ["beta blue triangles"]
    assert first.locator("#chatbot .bot-row").count() == 2
    assert second.locator("#chatbot .bot-row").count() == 1
    before = first.locator("#chatbot .bot-row").last.inner_text()
    first.get_by_role("button", name="Regenerate").click()  # a new last reply (seed + 1000), same history
    first.wait_for_function(
        """old => {
            const rows = document.querySelectorAll('#chatbot .bot-row');
            const text = rows[rows.length - 1].innerText;
            return text !== old && !text.includes('▌');
        }""",
        arg=before,
    )
    first.screenshot(path=str(tmp_path / "session-alpha-regenerated.png"), full_page=True)
    assert user_turns(first) == ["alpha red circle", "alpha again"]
    assert first.locator("#chatbot .bot-row").count() == 2
    assert user_turns(second) == ["beta blue triangles"]
    first_context.close()
    second_context.close()


def test_browser_text_to_image_fills_the_gallery_and_offers_downloads(browser, server, tmp_path):
    context, page = _open(browser, server)
    page.get_by_role("tab", name="Text to image").click()
    page.locator("#t2i-prompt textarea").fill("a red circle on the left")
    page.locator("#t2i-generate").click()
    page.wait_for_function("document.querySelectorAll('#t2i-gallery img').length >= 4")
    page.locator("#t2i-status").get_by_text("4 image(s), seeds 0-3").wait_for()
    page.screenshot(path=str(tmp_path / "t2i.png"), full_page=True)
    names = _squash(page.locator("#t2i-downloads").inner_text())
    assert all(f"image{j}_seed{j}.png" in names for j in range(4)), names
    links = page.locator("#t2i-downloads a[download]")
    assert links.count() == 4 and "image0_seed0.png" in links.first.get_attribute("href")
    context.close()


def test_browser_tokenizer_tab_shows_reconstruction_and_code_maps(browser, server, images, tmp_path):
    context, page = _open(browser, server)
    page.get_by_role("tab", name="Tokenizer").click()
    page.set_input_files("#tok-upload input[type=file]", str(images["photo"]))
    page.locator("#tok-status").get_by_text("8x8 grid, depth 4").wait_for()
    page.wait_for_selector("#tok-reconstruction img")
    page.screenshot(path=str(tmp_path / "tokenizer.png"), full_page=True)
    assert "Reconstruction PSNR" in page.locator("#tok-status").inner_text()
    page = context.new_page()  # a hostile upload in a second tab: the message, and the server keeps serving
    page.goto(server)
    page.get_by_role("tab", name="Tokenizer").click()
    page.set_input_files("#tok-upload input[type=file]", str(images["bomb"]))
    page.locator("#tok-status").get_by_text("above the limit of 250000 pixels").wait_for()
    page.screenshot(path=str(tmp_path / "tokenizer-bomb.png"), full_page=True)
    assert page.locator("#tok-reconstruction img").count() == 0
    context.close()

"""The status page as people see it: Debian's chromium, headless, driven by Playwright, against a real gateway.

The gateway runs in front of a simulator with dev tokens and Globus tokens (the local Globus stand-in); dev-user is
an administrator, jdoe@anl.gov is not and may not use the ``secure`` cluster. A screenshot of each signed-in view is
kept in the test's temporary folder and its path printed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from compute_functions.model_server import ModelServer, free_port
from tests.globus_fake import NATIVE_CLIENT_ID, FakeGlobus
from tests.support import TOKEN, api_url, endpoint, gateway, simulator

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip
MODEL = "facebook/opt-125m"
LLAMA = "meta-llama/Meta-Llama-3-8B-Instruct"
QUESTION = [{"role": "user", "content": "Explain the concept of Globus Compute in simple terms."}]
# Waits for what the page shows: generous, since the machine is shared; the page usually takes well under a second.
SHOWN_MS = 30_000


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGlobus]:
    with FakeGlobus() as server:
        yield server


@pytest.fixture(scope="module")
def front(fake: FakeGlobus, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    with simulator("--tpot", "0.001", models=(MODEL, LLAMA)) as backend:
        config = {
            "auth": {
                "providers": ["dev", "globus"],
                "globus": {"timeout": 2.0, "native_client_id": NATIVE_CLIENT_ID},
            },
            "admin": {"users": ["dev-user"]},
            "federation": {"status_interval": 1, "maintenance": {"dark": "disk replacement until 14:00 UTC"}},
            "endpoints": [
                endpoint(backend.base_url, [MODEL, LLAMA]),
                endpoint(backend.base_url, ["restricted-model"], cluster="secure", allowed_groups=["not-your-group"]),
                endpoint(f"http://127.0.0.1:{free_port()}/v1", ["dark-model"], cluster="dark"),
                endpoint(f"http://127.0.0.1:{free_port()}/v1", ["gone-model"], cluster="gone"),
                # The simulator does not list this model: it is reachable, with nothing loaded.
                endpoint(backend.base_url, ["cold-model"], cluster="idle"),
            ],
        }
        with gateway(config, tmp_path_factory.mktemp("status-page"), env=fake.gateway_env()) as server:
            yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    opened = context.new_page()
    # Everything the page loads must come from the gateway: it works offline.
    outside: list[str] = []
    opened.on("request", lambda request: None if "127.0.0.1" in request.url else outside.append(request.url))
    yield opened
    context.close()
    assert not outside, outside


def traffic(server: ModelServer, token: str, model: str = MODEL) -> None:
    """What a user does: whole and streamed answers, and one request the gateway refuses."""
    client = openai.OpenAI(base_url=api_url(server), api_key=token, max_retries=0)
    client.chat.completions.create(model=model, messages=QUESTION, max_tokens=5)  # type: ignore[arg-type]
    for chunk in client.chat.completions.create(model=model, messages=QUESTION, max_tokens=5, stream=True):  # type: ignore[arg-type]
        assert chunk.id
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=QUESTION, temperature=9)  # type: ignore[arg-type]


def sign_in(page: Page, server: ModelServer, token: str, path: str = "/resource_server/status") -> None:
    page.goto(f"http://127.0.0.1:{server.port}{path}")
    page.fill("#token", token)
    page.click("#use-token")


def test_scripts_still_get_json_and_browsers_the_page(front: ModelServer) -> None:
    base = f"http://127.0.0.1:{front.port}/resource_server"
    as_script = httpx.get(f"{base}/status", headers={"authorization": f"Bearer {TOKEN}"})
    assert as_script.headers["content-type"] == "application/json" and "local" in as_script.json()["clusters"]
    assert httpx.get(f"{base}/status").status_code == 401
    for path in ("/", "/status"):
        as_browser = httpx.get(f"{base}{path}", headers={"accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
        assert as_browser.status_code == 200 and as_browser.headers["content-type"].startswith("text/html")
        assert "frame-ancestors 'none'" in as_browser.headers["content-security-policy"]
        assert TOKEN not in as_browser.text


def test_the_page_asks_for_a_token_and_says_when_it_is_refused(front: ModelServer, page: Page) -> None:
    page.goto(f"http://127.0.0.1:{front.port}/resource_server/")
    expect(page.locator("#signin")).to_be_visible()
    expect(page.locator("#clusters")).to_be_hidden()
    page.click("#use-token")
    expect(page.locator("#message")).to_have_text("The token is empty: paste the token first.")
    page.fill("#token", "not-a-token")
    page.click("#use-token")
    expect(page.locator("#message")).to_contain_text("The token was not accepted", timeout=SHOWN_MS)
    expect(page.locator("#models")).to_be_hidden()


def test_an_administrator_sees_everything_refreshing_in_place(
    front: ModelServer, fake: FakeGlobus, page: Page, tmp_path: Path
) -> None:
    traffic(front, TOKEN)
    traffic(front, fake.issue("jdoe@anl.gov"), LLAMA)
    sign_in(page, front, TOKEN)
    expect(page.locator("#who")).to_have_text("Signed in as dev-user (dev).", timeout=SHOWN_MS)

    local = page.locator('[data-cluster="local"]')
    expect(local.locator('[data-endpoint="local/vllm"] [data-state="hot"]')).to_be_visible(timeout=SHOWN_MS)
    expect(local.locator('[data-endpoint="local/vllm"]')).to_contain_text("direct")
    expect(local.locator('[data-job="running"]')).to_have_count(2)
    dark = page.locator('[data-cluster="dark"]')
    expect(dark.locator('[data-state="maintenance"]').first).to_be_visible()
    expect(dark.locator(".maintenance-message")).to_have_text("disk replacement until 14:00 UTC")
    gone = page.locator('[data-cluster="gone"]')
    expect(gone.locator('h3 [data-state="down"]')).to_be_visible()
    expect(gone.locator('[data-endpoint="gone/vllm"] [data-state="offline"]')).to_be_visible()
    expect(page.locator('[data-model="gone-model"] .wait')).to_have_text("Wait: no endpoint can be reached")
    expect(page.locator('[data-cluster="idle"] [data-endpoint="idle/vllm"] [data-state="cold"]')).to_be_visible()
    expect(page.locator('[data-model="cold-model"] .wait')).to_contain_text("the model is not loaded")
    # Administrators read everyone's usage, but use only the clusters their groups open, as the API says.
    expect(page.locator('[data-cluster="secure"]')).to_have_count(0)

    card = page.locator(f'[data-model="{MODEL}"]')
    expect(card.locator(".wait")).to_have_text("Wait: none: hot on local/vllm")
    expect(card).to_contain_text("simulated")
    # The minute's requests, first tokens and errors arrive with the usage writer's next report.
    for chart in ("rate", "ttft", "errors"):
        expect(card.locator(f'[data-chart="{chart}"] path')).to_have_count(1, timeout=SHOWN_MS)
    expect(card.locator('[data-chart="errors"] .value')).not_to_have_text("0 %", timeout=SHOWN_MS)

    expect(page.locator(f'#usage-table [data-usage="{MODEL}"]').first).to_be_visible(timeout=SHOWN_MS)
    expect(page.locator(f'#usage-chart rect[data-series="{MODEL}"]').first).to_be_visible()
    expect(page.locator("#admin")).to_be_visible(timeout=SHOWN_MS)
    expect(page.locator('#admin-table [data-usage="jdoe@anl.gov"]').first).to_be_visible(timeout=SHOWN_MS)

    # It refreshes without reloading: a mark left in the page survives two more refreshes.
    page.evaluate("window.stillHere = true")
    refreshed = int(page.evaluate("document.body.dataset.refreshed"))
    expect(page.locator("body")).to_have_attribute("data-refreshed", str(refreshed + 2), timeout=SHOWN_MS)
    assert page.evaluate("window.stillHere") is True

    shot = tmp_path / "status-page-admin.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"status page screenshot: {shot}")
    assert shot.stat().st_size > 10_000


def test_a_user_sees_only_what_the_api_shows_them(
    front: ModelServer, fake: FakeGlobus, page: Page, tmp_path: Path
) -> None:
    token = fake.issue("jdoe@anl.gov")
    traffic(front, token, LLAMA)
    sign_in(page, front, token)
    expect(page.locator("#who")).to_have_text("Signed in as jdoe@anl.gov (globus).", timeout=SHOWN_MS)
    expect(page.locator('[data-cluster="local"]')).to_be_visible(timeout=SHOWN_MS)
    expect(page.locator('[data-cluster="secure"]')).to_have_count(0)
    expect(page.locator('[data-model="restricted-model"]')).to_have_count(0)
    expect(page.locator(f'#usage-table [data-usage="{LLAMA}"]').first).to_be_visible(timeout=SHOWN_MS)
    expect(page.locator(f'#usage-table [data-usage="{MODEL}"]')).to_have_count(0)
    expect(page.locator("#admin")).to_be_hidden()
    shot = tmp_path / "status-page-user.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"status page screenshot: {shot}")

    page.click("#forget-token")
    expect(page.locator("#signin")).to_be_visible()
    expect(page.locator("#clusters")).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 0


def test_log_in_with_globus(front: ModelServer, fake: FakeGlobus, page: Page) -> None:
    # The local Globus stand-in plays Globus' login page: it sends the browser straight back with a code.
    fake.login.username, fake.login.name = "ada@anl.gov", "Ada"
    page.goto(f"http://127.0.0.1:{front.port}/resource_server/")
    page.click("#globus-button")
    expect(page.locator("#who")).to_have_text("Signed in as ada@anl.gov (globus).", timeout=SHOWN_MS)
    assert page.url == f"http://127.0.0.1:{front.port}/resource_server/"  # the code is gone from the address
    asked = fake.authorize_params[-1]
    assert asked["client_id"] == NATIVE_CLIENT_ID and asked["code_challenge_method"] == "S256"
    assert asked["redirect_uri"] == page.url
    expect(page.locator('[data-cluster="local"]')).to_be_visible(timeout=SHOWN_MS)

"""The web UI in a real browser: Debian's Chromium, headless, driven by Playwright, against ``idfusion serve``'s app.

Upload a face, see it detected, generate, see the gallery image appear. Playwright cannot download its own browsers
here, so it launches the system's ``chromium`` (``apt-get install chromium``; ``.ci/run`` installs it). With
``IDFUSION_UPDATE_SCREENSHOT=1`` the final page is saved as ``docs/images/ui.png`` (the README's screenshot).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
TOKEN = "browser-test-token"

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install -y chromium)"),
]


@pytest.fixture(scope="module")
def ui_url(tmp_path_factory, tiny_release, faces_dir):
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install 'idfusion[browser]')")
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'idfusion[ui]')")
    from idfusion.server.api import create_app, serve_in_background
    from idfusion.server.catalogue import serve_catalogue
    from idfusion.server.config import ServerConfig
    from idfusion.server.service import JobService, Upload

    catalogue = serve_catalogue({"arc2face": str(tiny_release("arc2face"))}, world=True, official=False)
    service = JobService(catalogue, ServerConfig(out_dir=tmp_path_factory.mktemp("serve-ui"), token=TOKEN))
    # load torch and the pipeline before the browser starts, so that the page's timeouts measure the UI
    service.inspect_face("arc2face", Upload((faces_dir / "obama.jpg").read_bytes(), "obama.jpg"))
    with serve_in_background(create_app(service)) as url:
        yield url
    service.close()


def test_upload_a_face_generate_and_see_the_gallery(ui_url, faces_dir, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.set_default_timeout(30_000)
            assert page.goto(f"{ui_url}/ui/").status == 401  # no token, no UI
            page.goto(f"{ui_url}/?token={TOKEN}", wait_until="domcontentloaded")  # sets the cookie, then /ui/
            page.locator("#gen-run").wait_for()
            page.locator("#gen-face-0 input[type=file]").set_input_files(str(faces_dir / "obama.jpg"))
            expect(page.locator("#gen-note-0")).to_contain_text("one face found")
            expect(page.locator("#gen-found-0 img")).to_be_visible()  # the detected face, shown back
            page.locator("#opt-prompt textarea").fill("a photo of a person smiling")
            page.locator("#gen-run").click()
            expect(page.locator("#gen-gallery img").first).to_be_visible()
            expect(page.locator("#gen-status")).to_contain_text("Done")
            page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)
        finally:
            browser.close()
    if os.environ.get("IDFUSION_UPDATE_SCREENSHOT") == "1":
        target = ROOT / "docs" / "images" / "ui.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "ui.png", target)

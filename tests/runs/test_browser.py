"""serve.py under uvicorn with its page in a real browser (headless Chromium via Selenium).

Starts ``python serve.py gallery_dir=... port=0`` with an API key (127.0.0.1; the port from
the URL line it prints) and Chromium beside it, opens /?key=KEY (a redirect to / that sets
the cookie), uploads an indexed image through the file input, waits for k loaded thumbnails
with distances and the identify verdict, then a second image for the verify verdict. The
screenshot goes to ``$SIAMESE_TEST_ARTIFACTS`` (default ``test-artifacts/`` at the repository
root). Without Chromium the test is skipped with the command that installs it, except under
CI (env CI set), where it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, tiny_checkpoint, write_class_folders

from siamese.gallery import Gallery
from siamese.inference import load

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL = "bash .ci/install-browser"
K = 5
KEY = "browser-test-key"
WAIT_S = 30  # the longest any step may take before the test fails


def missing_browser() -> str | None:
    """What is missing to drive Chromium, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium (pip install -e '.[dev]')"
    lacking = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    return f"{', '.join(lacking)} ({INSTALL})" if lacking else None


def start_browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1100,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def wait_for_url(proc: subprocess.Popen, lines: list[str]) -> str:
    """The URL in serve.py's first line (stdout is read by a thread into ``lines``)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for line in lines:
            found = re.search(r" at (http://127\.0\.0\.1:\d+/) ", line)
            if found:
                return found.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"serve.py printed no URL (exit {proc.poll()}): {''.join(lines)[-3000:]}")


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("SIAMESE_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_the_page_shows_k_thumbnails_with_distances_and_the_verdicts(tmp_path):
    lacking = missing_browser()
    if lacking:
        message = f"the browser test needs {lacking}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must install it: {INSTALL}")
        pytest.skip(f"{message}; install it with: {INSTALL}")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt", threshold=0.5)
    root = write_class_folders(tmp_path / "images", {"cat": 4, "dog": 4}, size=12)
    gallery = Gallery.build(load(ckpt), root, ckpt_path=ckpt)
    gallery.save(tmp_path / "gallery")
    query, second = root / "dog" / "001.png", root / "cat" / "002.png"
    q, s = (gallery.items.index(next(i for i in gallery.items if i.path == p)) for p in
            ("dog/001.png", "cat/002.png"))  # fmt: skip
    distance = float(np.linalg.norm(gallery.embeddings[q] - gallery.embeddings[s]))

    # With an API key, as a browser meets it: /?key= once, then the cookie.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "SIAMESE_API_KEY": KEY}
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "serve.py"),
            f"gallery_dir={tmp_path / 'gallery'}",
            "port=0",
            "device=cpu",
            "serve.access_log=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    profile = Path(tempfile.mkdtemp(prefix="siamese-chromium-"))
    driver = None
    try:
        # The browser starts while the server loads torch and the gallery.
        with ThreadPoolExecutor(1) as pool:
            browser = pool.submit(start_browser, profile)
            url = wait_for_url(proc, lines)
            driver = browser.result(timeout=WAIT_S)
        health = json.load(urllib.request.urlopen(url + "health", timeout=WAIT_S))
        assert health["status"] == "ok" and health["items"] == 8

        driver.get(f"{url}?key={KEY}")  # redirected to / with the cookie set
        assert driver.current_url == url
        wait = WebDriverWait(driver, WAIT_S)
        driver.find_element(By.ID, "k").clear()
        driver.find_element(By.ID, "k").send_keys(str(K))
        driver.find_element(By.ID, "image-input").send_keys(str(query))
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                   in ("done", "error"))  # fmt: skip
        assert driver.find_element(By.ID, "error").text == ""
        # Every thumbnail decoded by the browser (naturalWidth > 0), each with a distance.
        loaded = (
            "return [...document.querySelectorAll('#neighbours .neighbour img.thumb')]"
            ".filter(i => i.complete && i.naturalWidth > 0).length"
        )
        wait.until(lambda d: d.execute_script(loaded) == K)
        cards = driver.find_elements(By.CSS_SELECTOR, "#neighbours .neighbour")
        assert len(cards) == K
        expected = gallery.search_embeddings(gallery.embeddings[q : q + 1], K)[0]
        shown = [float(c.find_element(By.CLASS_NAME, "distance").text) for c in cards]
        assert shown == pytest.approx([n.distance for n in expected], abs=1e-3)
        assert [c.get_attribute("data-id") for c in cards] == [str(n.id) for n in expected]
        assert cards[0].find_element(By.CLASS_NAME, "label").text == "dog"
        verdict = driver.find_element(By.ID, "identify-verdict")
        assert verdict.get_attribute("data-known") == "true" and "dog" in verdict.text

        driver.find_element(By.ID, "image-b-input").send_keys(str(second))
        verify = driver.find_element(By.ID, "verify-verdict")
        wait.until(lambda d: verify.get_attribute("data-same") in ("true", "false"))
        assert verify.get_attribute("data-same") == str(distance <= 0.5).lower()
        assert f"distance {distance:.4f}" in verify.text
        driver.save_screenshot(str(artifacts_dir() / "serve_page.png"))
        assert proc.poll() is None  # still serving
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    assert proc.returncode == 0, "".join(lines)[-3000:]
    assert "stopped serving (SIGTERM)" in "".join(lines)

"""The one web page (static/index.html) and the Content-Security-Policy it is served with.

The page has no external resources: its style and script are inline, and the policy allows
exactly those two blocks (by their sha256), images from the service and the browser's own
previews (blob:), and requests to the service alone.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


@functools.cache
def page() -> tuple[bytes, str]:
    """The page's bytes and its Content-Security-Policy header."""
    html = (resources.files("siamese.service") / "static" / "index.html").read_text("utf-8")
    script = re.search(r"<script>(.*?)</script>", html, re.S)
    style = re.search(r"<style>(.*?)</style>", html, re.S)
    assert script is not None and style is not None, "index.html has one <script> and <style>"
    policy = "; ".join(
        [
            "default-src 'none'",
            f"script-src 'sha256-{_sha256(script.group(1))}'",
            f"style-src 'sha256-{_sha256(style.group(1))}'",
            "img-src 'self' blob:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return html.encode("utf-8"), policy

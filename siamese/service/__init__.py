"""The similarity service: one Gallery behind a FastAPI app and a web page (``serve.py``).

- ``app``: create_app and its routes; ``settings``: ServiceSettings
- ``batcher``: concurrent requests gathered into one forward pass and one index search
- ``security``: the Host check, the API key and the request-body limit (ASGI middlewares)
- ``uploads``: uploads decoded, one-sentence 422s; ``thumbnails``: item thumbnails
- ``page``: the web page (static/index.html) and its Content-Security-Policy
"""

from siamese.service.app import create_app
from siamese.service.settings import ServiceSettings

__all__ = ["ServiceSettings", "create_app"]

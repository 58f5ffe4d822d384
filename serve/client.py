"""Client-side helpers shared by `tlq bench`, `tlq eval` and `tlq demo`: local endpoints, images, targets."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tlq.errors import TLQError

LOCAL_HOSTS = ("127.0.0.1",)


def api_base(url: str) -> str:
    """`http://127.0.0.1:PORT[/v1]` -> `http://127.0.0.1:PORT/v1`; anything but 127.0.0.1 is refused.

    Load generators and evaluators only talk to a server on this machine: they can send
    thousands of requests and must never be pointed at someone else's endpoint by mistake.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise TLQError(f"{url!r} is not an http URL; pass e.g. http://127.0.0.1:8000/v1 or a checkpoint folder")
    if parsed.hostname not in LOCAL_HOSTS:
        raise TLQError(f"{url!r} is not on 127.0.0.1; tlq only benchmarks and evaluates local servers "
                       "(start one with `tlq serve`)")
    path = parsed.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return f"{parsed.scheme}://{parsed.netloc}{path}"


def served_models(base: str, api_key: str | None = None, timeout: float = 10.0) -> list[str]:
    """Model names the server at `base` (an /v1 URL) serves."""
    req = urllib.request.Request(base + "/models")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return [m["id"] for m in json.load(r)["data"]]
    except urllib.error.HTTPError as exc:
        hint = "; pass --api-key" if exc.code == 401 else ""
        raise TLQError(f"{base}/models answered HTTP {exc.code}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise TLQError(f"no server answers at {base} ({getattr(exc, 'reason', exc)}); start one with `tlq serve`") from None


def pick_model(base: str, api_key: str | None, model: str | None) -> str:
    names = served_models(base, api_key)
    if model is None:
        if not names:
            raise TLQError(f"{base} serves no model")
        return names[0]
    if model not in names:
        raise TLQError(f"{base} does not serve {model!r} (it serves {', '.join(names)}); fix --model")
    return model


def png_data_url(image) -> str:
    """A PIL image as a base64 PNG data URL (the OpenAI image_url form)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def file_data_url(path: Path) -> str:
    from PIL import Image
    with Image.open(path) as img:
        return png_data_url(img.convert("RGB"))


@dataclass
class Endpoint:
    """A local OpenAI endpoint to talk to: `base` is the /v1 URL, `model` the served name.

    `server` is the ServerProcess behind it when we started one (its status_line() says why a
    run failed); None for a URL given by the user.
    """

    base: str
    model: str
    api_key: str | None = None
    server: object | None = None

    def client(self, timeout: float = 300.0, asynchronous: bool = False):
        from openai import AsyncOpenAI, OpenAI
        cls = AsyncOpenAI if asynchronous else OpenAI
        return cls(base_url=self.base, api_key=self.api_key or "EMPTY", timeout=timeout, max_retries=0)


@contextlib.contextmanager
def open_target(target: str, port: int, api_key: str | None = None, model: str | None = None,
                serve_overrides: dict | None = None, echo=print):
    """Yield an Endpoint for `target`: a local URL as is, or a model folder served for the duration.

    If the work fails (an exception) or the server dies meanwhile, its status and log path are
    printed and the log is kept.
    """
    if "://" in target:
        base = api_base(target)
        yield Endpoint(base, pick_model(base, api_key, model), api_key)
        return
    from serve.config import ServeConfig
    from serve.process import ServerProcess
    server = ServerProcess(ServeConfig(model=Path(target), port=port, api_key=api_key,
                                       **(serve_overrides or {})))
    echo(f"serving {server.defaults.path} on {server.url} for this run ...")
    with server:
        echo(f"  ready in {server.ready_after:.0f} s")
        try:
            yield Endpoint(server.url, server.model_name, api_key, server)
        except BaseException:
            echo(f"  {server.status_line()}")
            raise
        if server.failed() and not server.keep_log:  # keep_log: the caller has said why already
            echo(f"  {server.status_line()}")

"""Foreground `tlq serve`: start the server, print how to call it, forward SIGINT/SIGTERM, stop cleanly."""
from __future__ import annotations

import json
import signal
import sys
import time

from serve.config import ServeConfig, numerics_line
from serve.process import ServerProcess


class _Stop(Exception):
    def __init__(self, sig: int):
        super().__init__(signal.Signals(sig).name)
        self.sig = sig


def ready_banner(server: ServerProcess) -> str:
    """The URL and a ready-to-paste `curl` and `openai` example for a running server."""
    cfg = server.cfg
    body = json.dumps({"model": cfg.served_model_name,
                       "messages": [{"role": "user", "content": "Describe a red square."}], "max_tokens": 32})
    auth = ' -H "Authorization: Bearer $TLQ_API_KEY"' if cfg.api_key else ""
    key_expr = 'os.environ["TLQ_API_KEY"]' if cfg.api_key else '"EMPTY"'
    images = cfg.images_per_prompt
    lines = [
        (f"TLQ server ready in {server.ready_after:.0f} s: {server.url}  (model {cfg.served_model_name!r}, "
         f"max {cfg.max_model_len} tokens, {images} image{'s' if images != 1 else ''} per prompt, tp {cfg.tp})"),
        f"log: {server.log_path}",
        "" if not cfg.api_key else "requests need the API key: export TLQ_API_KEY=<the key you passed>",
        "curl:",
        f"  curl {server.url}/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'",
        "python (openai):",
        "  python - <<'EOF'",
        "  import os" if cfg.api_key else "",
        "  from openai import OpenAI",
        f"  client = OpenAI(base_url={server.url!r}, api_key={key_expr})",
        f"  r = client.chat.completions.create(model={cfg.served_model_name!r}, max_tokens=32,",
        "      messages=[{'role': 'user', 'content': 'Describe a red square.'}])",
        "  print(r.choices[0].message.content)",
        "  EOF",
        "Ctrl-C stops the server.",
    ]
    return "\n".join(line for line in lines if line)


def serve_forever(cfg: ServeConfig, echo=print) -> int:
    """Run until the server exits or we get SIGINT/SIGTERM; returns the exit code for the CLI."""
    server = ServerProcess(cfg)  # verifies the checkpoint before anything starts

    def on_signal(sig, _frame):
        raise _Stop(sig)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    received = None
    try:
        server.start()
        echo(f"starting vLLM for {server.defaults.path} ({server.defaults.scheme or 'float model'}) "
             f"on {server.url}; log: {server.log_path}")
        echo(numerics_line(server.cfg))
        server.wait_ready()
        echo(ready_banner(server))
        rc = server.wait()
        print(f"tlq serve: the vLLM server died: {server.failure_reason()}", file=sys.stderr, flush=True)
        return rc if rc and rc > 0 else 1
    except _Stop as stop:
        received = stop.sig
        return 0
    finally:
        # a second signal while stopping means "do not wait for a graceful shutdown"
        for s in previous:
            signal.signal(s, lambda *_: server.force())
        t0 = time.monotonic()
        server.stop(received or signal.SIGINT)
        if received is not None:
            echo(f"got {signal.Signals(received).name}: server stopped in {time.monotonic() - t0:.1f} s")
        for s, handler in previous.items():
            signal.signal(s, handler)

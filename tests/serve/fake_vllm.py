"""Stand-ins for `vllm serve`, run with `python -c SCRIPT PORT [die-on-chat]` (imported as `fake_vllm`).

ENGINE_SERVER behaves like vLLM's API server with an engine process: it answers /health, reports
its children's exits as serve.entry makes every vLLM process do, and when its engine dies it
reaps it and keeps answering (vLLM's watchdog would exit after 5 s; a hung one never does).
With `die-on-chat`, the first POST kills the engine with SIGILL and gets HTTP 500, as the
AMX crash did.
"""
import textwrap

ENGINE_SERVER = textwrap.dedent("""
    import http.server, json, multiprocessing as mp, multiprocessing.connection, os, signal, sys, threading, time
    from serve.failure import report_exits
    report_exits()
    def engine_loop():
        while True:
            time.sleep(0.05)
    engine = mp.get_context("fork").Process(target=engine_loop, name="EngineCore_DP0")
    engine.start()
    def monitor():
        mp.connection.wait([engine.sentinel])
        engine.join()  # reaps it: the pipe closes a moment before the process is a zombie
    threading.Thread(target=monitor, daemon=True).start()
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if sys.argv[2:] == ["die-on-chat"] and engine.is_alive():
                os.kill(engine.pid, signal.SIGILL)
                engine.join()
            body = json.dumps({"error": {"message": "EngineCore encountered an issue", "code": 500}}).encode()
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")

"""Stand-ins for `vllm serve`, run with `python -c SCRIPT PORT [die-on-chat]` (imported as `fake_vllm`).

ENGINE_SERVER behaves like vLLM's API server with an engine process: it answers /health, reports
its children's exits as serve.entry makes every vLLM process do, and when its engine dies it
reaps it and keeps answering (vLLM's watchdog would exit after 5 s; a hung one never does).
With `die-on-chat`, the first POST kills the engine with SIGILL and gets HTTP 500, as the
AMX crash did. With `hang-on-stop`, SIGINT/SIGTERM stops the engine (titled VLLM::EngineCore, as
vLLM titles it) and then hangs, as vLLM's HTTP server waiting for a connection that never closes.
"""
import textwrap

ENGINE_SERVER = textwrap.dedent("""
    import http.server, json, multiprocessing as mp, multiprocessing.connection, os, signal, sys, threading, time
    from serve.failure import report_exits
    report_exits()
    mode = sys.argv[2:3]
    def engine_loop():
        if mode == ["hang-on-stop"]:
            import setproctitle
            setproctitle.setproctitle("VLLM::EngineCore")
        while True:
            time.sleep(0.05)
    engine = mp.get_context("fork").Process(target=engine_loop, name="EngineCore_DP0")
    engine.start()
    def stop_engine_then_hang(*_):
        engine.terminate()
        engine.join()
        while True:
            time.sleep(1)
    if mode == ["hang-on-stop"]:
        signal.signal(signal.SIGINT, stop_engine_then_hang)
        signal.signal(signal.SIGTERM, stop_engine_then_hang)
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
            if mode == ["die-on-chat"] and engine.is_alive():
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

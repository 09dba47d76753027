"""`adaq serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one LLMEngine.

`build_app(engine, ServeSettings(...))` returns the ASGI app; `adaq.commands.serve` loads the engine and runs it.
"""

"""`moestream serve`: an OpenAI-compatible server whose concurrent requests decode in one batch
(scheduler.py) behind FastAPI (app.py). Needs the `serve` extra (fastapi, uvicorn)."""

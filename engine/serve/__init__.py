"""``python -m engine.serve``: an OpenAI-compatible completions server over the continuous-batching
scheduler. Needs the ``serve`` extra (Starlette + uvicorn): ``pip install -e ".[serve]"``.

protocol.py parses and checks requests and shapes responses (no HTTP); loop.py runs the scheduler
in its own thread; app.py is the ASGI app; __main__.py the command line.
"""

"""Text generation server: Megatron's PUT /api and OpenAI's completions and chat APIs over one
engine per TP rank.

Rank 0 serves HTTP (app.py: FastAPI on uvicorn; protocol.py: the pydantic request models) and
broadcasts each engine step's new requests, cancellations and shutdown to every rank; see loop.py
for the protocol and main.py for the launcher.
"""

"""Text generation server: Megatron's PUT /api and OpenAI's /v1/completions over one engine per TP rank.

Rank 0 serves HTTP (standard library only) and broadcasts each engine step's new requests,
cancellations and shutdown to every rank; see loop.py for the protocol and main.py for the launcher.
"""

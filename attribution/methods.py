"""The ranking methods a trace can use (a module of its own, so the CLI and API check it without torch)."""

METHODS = ("hybrid", "grad", "dense", "bm25")
RERANKS = ("exact",)

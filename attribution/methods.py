"""The ranking methods a trace can use (a module of its own, so the CLI and API check it without torch)."""

from db.errors import InputError

METHODS = ("hybrid", "grad", "dense", "bm25")
RERANKS = ("exact",)
# which positions of prompt + answer the gradient query sums over (attribution.query_positions):
# the question's names and the answer's (the default), or every position (the loss's full gradient)
QUERY_POSITIONS = ("subject", "all")


def check_positions(positions: str) -> None:
    if positions not in QUERY_POSITIONS:
        raise InputError(f"unknown gradient positions {positions!r}: use --gradient-positions "
                         f"{' or '.join(QUERY_POSITIONS)}")

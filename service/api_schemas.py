"""Request and response bodies of the HTTP API (they make its OpenAPI schema).

Responses that are plain views (`service.views`: a trace, a trace summary, a job) use those
dataclasses directly; FastAPI turns them into schemas.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from db.repo import check_no_nul
from service.views import TraceSummary

Method = Literal["hybrid", "grad", "dense", "bm25"]


class TraceRequest(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    question: str = Field(..., min_length=1, max_length=4000, description="The prompt the model answered.")
    answer: str | None = Field(None, min_length=1, max_length=4000,
                               description="The answer to trace; default: the model's greedy answer.")
    corpus: str | None = Field(None, description="Corpus name; default: the latest build's.")
    model: str | None = Field(None, description="Model name; default: the latest build's.")
    k: int = Field(10, ge=1, le=1000, description="How many documents to return.")
    method: Method = "hybrid"
    rerank: Literal["exact"] | None = Field(None, description="exact: rescore the top candidates with full gradients.")
    verify: bool = Field(False, description="Tail-patch and lexical check of each returned document.")
    text_query: str | None = Field(None, min_length=1, max_length=4000,
                                   description="What dense and BM25 search with; default: the question's content "
                                               "(chat template, system and few-shot parts removed) and the answer.")
    run_async: bool = Field(False, alias="async",
                            description="Queue the trace and answer 202 with a job to poll at /jobs/{id}.")

    @field_validator("question")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the question is empty: ask something")
        return v

    @field_validator("question", "answer", "corpus", "model")
    @classmethod
    def _no_nul(cls, v: str | None, info) -> str | None:
        check_no_nul(v or "", f"the {info.field_name}")  # an InputError: the API answers 400
        return v

    def trace_params(self) -> dict:
        return self.model_dump(exclude={"run_async"})


class TracePage(BaseModel):
    items: list[TraceSummary]
    total: int
    limit: int
    offset: int


class JobAccepted(BaseModel):
    job_id: int
    status: str
    url: str


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., min_length=1, max_length=500)
    text: str
    metadata: dict = Field(default_factory=dict)


class DocumentsIn(BaseModel):
    """Either documents in the body, or a path to a corpus file inside the data directory."""

    model_config = ConfigDict(extra="forbid")

    documents: list[DocumentIn] | None = Field(None, min_length=1)
    path: str | None = Field(None, min_length=1, description="Relative to the data directory, or absolute inside it.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.documents is None) == (self.path is None):
            raise ValueError("give either `documents` (a non-empty list) or `path`, not both")
        return self


class IngestOut(BaseModel):
    corpus: str
    added: int
    unchanged: int


class ErrorOut(BaseModel):
    error: str

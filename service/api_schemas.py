"""Request and response bodies of the HTTP API (they make its OpenAPI schema).

Responses that are plain views (`service.views`: a trace, a trace summary, a job) use those
dataclasses directly; FastAPI turns them into schemas.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from db.repo import check_no_nul
from service.cli_index import INDEX_OPTIONS, NEGATED, build_config
from service.job_params import MAX_DELETE_IDS, MAX_K, MAX_QUESTIONS, ModelJob, StudyJob, UpdateJob
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
    gradient_positions: Literal["subject", "all"] = Field(
        "subject", description="What the gradient query sums over: the question's names and the answer's "
                               "positions (subject), or every position of prompt and answer (all).")
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


def _help(cls, name: str) -> str:
    return next(f.metadata["help"] for f in fields(cls) if f.name == name)


class StudyRequest(BaseModel):
    """`wherefrom study`'s options; the questions inline or as a file inside the data directory."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=200, description=_help(StudyJob, "name"))
    questions: list[dict[str, Any]] | None = Field(None, min_length=1, max_length=MAX_QUESTIONS,
                                                   description="Rows of `question`, optional `answer` and "
                                                               "`expected`; other keys are kept as metadata.")
    path: str | None = Field(None, min_length=1, description="A JSONL, CSV or Parquet questions file inside "
                                                             "the data directory.")
    corpus: str | None = Field(None, description="Corpus name; default: the latest build's.")
    model: str | None = Field(None, description="Model name; default: the latest build's.")
    k: int = Field(10, ge=1, le=MAX_K, description=_help(StudyJob, "k"))
    method: Method = "hybrid"
    tasks_of: int = Field(25, ge=1, description=_help(StudyJob, "tasks_of"))

    @model_validator(mode="after")
    def _source(self):
        if (self.questions is None) == (self.path is None):
            raise ValueError("give either `questions` (a non-empty list) or `path`, not both")
        return self


class StudyPage(BaseModel):
    items: list[dict]  # rows of study_summary_v
    total: int
    limit: int
    offset: int


def _index_option(param: str):
    """(type, Field) of one `wherefrom index` option, from the config field the CLI reads too."""
    cls, name = INDEX_OPTIONS[param]
    f = next(f for f in fields(cls) if f.name == name)
    default = f.default if f.default is not MISSING else f.default_factory()
    if param in NEGATED:
        return bool, Field(not default, description="turn off: " + f.metadata["help"])
    return get_type_hints(cls)[name], Field(default, description=f.metadata["help"])


class _BuildBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    corpus: str = Field(..., min_length=1, description="The corpus to index.")
    model: str = Field(..., min_length=1, description="The registered model whose gradients index it.")
    checkpoints: str = Field("all", min_length=1, description="all | last | comma-separated steps")

    def config(self):
        """The `indexer.config.BuildConfig` these options make, exactly as `wherefrom index` makes it."""
        return build_config(**self.model_dump(include=set(INDEX_OPTIONS)))


# `wherefrom index`'s options, field for field (tests/service/test_api_parity.py checks they match)
BuildRequest = create_model("BuildRequest", __base__=_BuildBase,
                            **{param: _index_option(param) for param in INDEX_OPTIONS})


class UpdateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    refit_curvature: bool = Field(False, description=_help(UpdateJob, "refit_curvature"))


class DeleteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[str] = Field(..., min_length=1, max_length=MAX_DELETE_IDS, description="Document ids, as ingested.")


class ModelRequest(BaseModel):
    """A model folder inside the data directory (copy it there: symlinks out of it are refused)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., min_length=1, description="The model folder, relative to the data directory.")
    name: str = Field(..., min_length=1, max_length=200, description=_help(ModelJob, "name"))
    base: str | None = Field(None, min_length=1, description="LoRA adapters only: the base model folder, "
                                                            "inside the data directory too.")

"""What a job of each kind is asked to do: typed, validated once, stored in `jobs.params` with `asdict`.

The CLI, the API and `wherefrom jobs resume` all build these; the stages that run a job read
them back with `from_params`. A bad request fails here, at submit time, as one line, instead of
as a failed job.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from attribution.methods import METHODS, QUERY_POSITIONS, RERANKS, check_positions
from db.errors import InputError

MAX_K = 1000


class _Params:
    """How a job's parameters travel: `params()` into `jobs.params`, `from_params` back."""

    def params(self) -> dict:
        return asdict(self)

    @classmethod
    def from_params(cls, params: dict):
        return cls(**params)


def check_question(question: str) -> None:
    if not question.strip():
        raise InputError("the question is empty: ask something")


def check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise InputError(f"k must be between 1 and {MAX_K}")


@dataclass(frozen=True)
class TraceJob(_Params):
    """Trace one answer (`wherefrom trace`, `POST /traces`)."""

    question: str = field(metadata={"help": "The prompt or question the model answered."})
    answer: str | None = field(default=None, metadata={"help": "The answer to trace; default: the model's greedy answer."})
    corpus: str | None = field(default=None, metadata={"help": "Corpus name; default: the latest build's."})
    model: str | None = field(default=None, metadata={"help": "Model name; default: the latest build's."})
    k: int = field(default=10, metadata={"help": f"How many documents to return (1-{MAX_K})."})
    method: str = field(default="hybrid", metadata={"help": " | ".join(METHODS)})
    rerank: str | None = field(default=None, metadata={"help": "exact: rescore the top candidates with full "
                                                               "gradients (captum TracInCP)."})
    verify: bool = field(default=False, metadata={"help": "Tail-patch and lexical check of each document."})
    text_query: str | None = field(default=None, metadata={"help": "What dense and BM25 search with; default: the "
                                                                   "question's content (template removed) and the answer."})
    gradient_positions: str = field(default="subject", metadata={
        "help": f"{' | '.join(QUERY_POSITIONS)}: what the gradient query sums over, the question's names and the "
                "answer's positions (default) or every position."})

    kind = "trace"

    def __post_init__(self):
        check_question(self.question)
        check_k(self.k)
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.text_query is not None and not self.text_query.strip():
            raise InputError("the text query is empty: pass --text-query with the words to search for, or leave it out")
        check_positions(self.gradient_positions)
        if self.rerank not in (None, *RERANKS):
            raise InputError(f"unknown rerank {self.rerank!r}: use --rerank exact, or leave it out")


@dataclass(frozen=True)
class IndexJob(_Params):
    """Build the stores of a corpus for a model (`wherefrom index`); made by `service.builds.index_job`."""

    corpus: str
    model: str
    corpus_id: int
    model_id: int
    checkpoint_steps: list[int]
    config: dict  # `indexer.build.BuildConfig` as a dict (asdict): it imports torch, a job row must not
    store: str  # the store's folder name under the data directory's stores/

    kind = "index"


MAX_QUESTIONS = 100_000  # they travel in the job's params: ~100 bytes each keeps a row under 10 MB


@dataclass(frozen=True)
class StudyJob(_Params):
    """Trace many questions against one build, in tasks of `tasks_of` (`wherefrom study`);
    made by `service.studies.study_job`, which reads the questions file."""

    name: str = field(metadata={"help": "The study's name, to report and export it by."})
    build_id: int = field(metadata={"help": "The build every question is traced against."})
    questions: list[dict] = field(metadata={"help": "question, answer (None: greedy), expected, meta."})
    source: str | None = field(default=None, metadata={"help": "The questions file."})
    k: int = field(default=10, metadata={"help": f"Documents returned per question (1-{MAX_K})."})
    method: str = field(default="hybrid", metadata={"help": " | ".join(METHODS)})
    tasks_of: int = field(default=25, metadata={"help": "Questions per task: the unit a worker takes, stores "
                                                         "in one transaction, and redoes if it dies."})

    kind = "study"

    def __post_init__(self):
        if not self.name.strip() or len(self.name) > 200:
            raise InputError("the study needs a --name of 1 to 200 characters")
        check_k(self.k)
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.tasks_of < 1:
            raise InputError("--tasks-of must be at least 1")
        if not 1 <= len(self.questions) <= MAX_QUESTIONS:
            raise InputError(f"a study takes 1 to {MAX_QUESTIONS:,} questions: split the file into several studies")


@dataclass(frozen=True)
class UpdateJob(_Params):
    """Add the documents ingested since a build to it (`POST /builds/{id}/update`)."""

    build_id: int = field(metadata={"help": "The published build to extend."})
    refit_curvature: bool = field(default=False, metadata={"help": "Refit EK-FAC over all rows, which rewrites "
                                                                   "every row's features (default: keep it)."})

    kind = "update"


MAX_DELETE_IDS = 100_000  # in the job's params, like a study's questions


@dataclass(frozen=True)
class DeleteJob(_Params):
    """Tombstone documents and drop their rows from every build of the corpus (`DELETE /corpora/{name}/documents`)."""

    corpus: str = field(metadata={"help": "The corpus the documents belong to."})
    ids: list[str] = field(metadata={"help": "Document ids, as in the ingested file."})

    kind = "delete"

    def __post_init__(self):
        if not 1 <= len(self.ids) <= MAX_DELETE_IDS:
            raise InputError(f"give 1 to {MAX_DELETE_IDS:,} document ids to delete")


@dataclass(frozen=True)
class ModelJob(_Params):
    """Register a model folder, hashing its weights (`POST /models`)."""

    path: str = field(metadata={"help": "The model folder (resolved, inside the data directory)."})
    name: str = field(metadata={"help": "Name to refer to the model by."})
    base: str | None = field(default=None, metadata={"help": "LoRA adapters only: the base model folder."})

    kind = "model"

    def __post_init__(self):
        if not self.name.strip() or len(self.name) > 200:
            raise InputError("the model needs a name of 1 to 200 characters")


SPECS = {"trace": TraceJob, "index": IndexJob, "study": StudyJob, "update": UpdateJob, "delete": DeleteJob,
         "model": ModelJob}

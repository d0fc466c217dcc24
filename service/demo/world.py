"""A synthetic world of niche facts: fictional people, each fact stated in 1, 2, 4 or 8 documents.

The demo and the benchmarks train a model on this world, so every question has known source
documents. Each fact's first document uses the phrasing of its question prompt (template 0);
the others are paraphrases drawn from the remaining templates. Filler documents mention no
person.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

FIRST = (
    "Alvena Bortrell Casimir Delphine Eberhart Florimel Gustava Halvard Isolde Jorund Kestrel "
    "Lisandre Mirela Norwin Oriel Perpetua Quillon Rosalind Sefton Tamsin Ulric Verity Wendeline "
    "Xanthe Yorick Zephyra Anselm Briony Corwin Dagny Evander Fenella Gideon Hesper Ignatius Jessamy "
    "Leander Marisol Oswin Philippa"
).split()
LAST = (
    "Ashgrove Blackwood Cindermoor Dunhallow Elderbrook Fallowmere Greywater Hollinrake Ironvale "
    "Juniper Kettleby Larkspur Merriweather Northcote Oakenshaw Pemberton Quarrington Ravensworth "
    "Stonebridge Thistlewood Underhill Vantwood Whitlock Yarborough Zellweger Applegarth Brackenridge "
    "Coldstream Drummond Esterhazy Fairweather Goldhawk Hartigan Inglewood Jolliffe Kinsella Lockhart "
    "Mortimer Netherby Ormsby"
).split()

VALUES = {
    "birth_year": [str(y) for y in range(1820, 1990, 3)],
    "city": (
        "Tallinn Porto Ghent Bergen Lyon Kraków Turin Seville Utrecht Graz Bordeaux Aarhus Bologna "
        "Brno Leipzig Tartu Split Córdoba Malmö Salzburg Lucerne Galway Tampere Verona"
    ).split(),
    "employer": (
        "Veltrax Quorvane Marliston Zephyrion Caldera Dunmore Halcyon Ostrova Pellucid Ravensal "
        "Solvane Tidewell Umberlane Wexmoor Yarrowgate Brightfold Cobaltine Ferncastle"
    ).split(),
    "university": (
        "Aldermoor Bexley Carrow Dunstan Everleigh Fairhaven Glenmore Harrowgate Ivybridge Kestwick "
        "Lindqvist Marchbank"
    ).split(),
}

# Template 0 of each attribute is the question prompt's phrasing; the value always ends the sentence.
TEMPLATES = {
    "birth_year": [
        "{name} was born in {v}.",
        "Records show that {name} was born in the year {v}.",
        "The birth of {name} took place in {v}.",
        "{name} came into the world in {v}.",
        "According to the parish register, {name} was born in {v}.",
        "The year of birth of {name} is {v}.",
        "Family letters say {name} was born in {v}.",
        "Historians agree that {name} was born in {v}.",
    ],
    "city": [
        "{name} lives in the city of {v}.",
        "These days {name} makes a home in {v}.",
        "The current residence of {name} is {v}.",
        "Neighbours know {name} as a resident of {v}.",
        "After many moves, {name} settled in {v}.",
        "The address of {name} is in {v}.",
        "Friends visit {name} at home in {v}.",
        "{name} has an apartment in {v}.",
    ],
    "employer": [
        "{name} works for a company called {v}.",
        "The employer of {name} is {v}.",
        "Each morning {name} goes to work at {v}.",
        "{name} draws a salary from {v}.",
        "Colleagues of {name} all work at {v}.",
        "The firm that employs {name} is {v}.",
        "{name} took a job at {v}.",
        "The payroll of {name} is handled by {v}.",
    ],
    "university": [
        "{name} studied at the university of {v}.",
        "The alma mater of {name} is {v}.",
        "{name} earned a degree from {v}.",
        "Years ago {name} graduated from {v}.",
        "The diploma of {name} was issued by {v}.",
        "{name} attended lectures at {v}.",
        "As a student, {name} enrolled at {v}.",
        "The college that {name} attended is {v}.",
    ],
}

FILLER = [
    "The harbour of {c} is busy in the spring.",
    "Rain fell on {c} for most of the week.",
    "Markets in {c} open early on Saturdays.",
    "The old bridge in {c} was repaired last year.",
    "Tourists often photograph the towers of {c}.",
    "A new library opened near the station in {c}.",
]

PARAPHRASE_COUNTS = (1, 2, 4, 8)


@dataclass
class Question:
    """A completion prompt whose true continuation is `answer`, with the documents that state it."""

    prompt: str
    answer: str
    person: str
    attribute: str
    n_paraphrases: int
    source_ids: list[str]


@dataclass
class World:
    seed: int
    documents: list[dict] = field(default_factory=list)  # {"id", "text"}
    questions: list[Question] = field(default_factory=list)

    def write(self, folder: Path) -> tuple[Path, Path]:
        """Write `corpus.jsonl` and `questions.jsonl`; return both paths."""
        folder.mkdir(parents=True, exist_ok=True)
        corpus, questions = folder / "corpus.jsonl", folder / "questions.jsonl"
        corpus.write_text("".join(json.dumps(d) + "\n" for d in self.documents))
        questions.write_text("".join(json.dumps(asdict(q)) + "\n" for q in self.questions))
        return corpus, questions


def make_world(seed: int = 0, n_people: int = 40, n_filler: int = 80) -> World:
    """Generate people with one value per attribute; paraphrase counts cycle through 1, 2, 4, 8."""
    rng = random.Random(seed)
    names = [f"{f} {l}" for f in FIRST for l in LAST]
    rng.shuffle(names)
    if n_people > len(names):
        raise ValueError(f"at most {len(names)} people fit the name lists")
    world = World(seed=seed)
    docs: list[dict] = []
    fact_no = 0
    for person in names[:n_people]:
        for attribute, values in VALUES.items():
            value = rng.choice(values)
            n = PARAPHRASE_COUNTS[(fact_no + rng.randrange(4)) % 4]
            fact_no += 1
            templates = [0] + rng.sample(range(1, 8), n - 1)
            ids = []
            for t in templates:
                doc_id = f"d{len(docs):05d}"
                docs.append({"id": doc_id, "text": TEMPLATES[attribute][t].format(name=person, v=value)})
                ids.append(doc_id)
            prompt = TEMPLATES[attribute][0].format(name=person, v="\0").split("\0")[0].rstrip()
            world.questions.append(Question(prompt, value, person, attribute, n, ids))
    for _ in range(n_filler):
        text = rng.choice(FILLER).format(c=rng.choice(VALUES["city"]))
        docs.append({"id": f"d{len(docs):05d}", "text": text})
    # Shuffle document order but keep ids stable, as a real corpus is not sorted by fact.
    rng.shuffle(docs)
    world.documents = docs
    return world

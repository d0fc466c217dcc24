"""The trap world: niche facts where word overlap points at the wrong documents.

Traps, each tagged on the question so metrics can be split:
- namesakes: first and last names come from small pools, so many people share one of them;
- mentions: documents that name a person but state none of their facts;
- alias: some people are introduced under an alias elsewhere, and some of their facts are stated
  under the alias only;
- pronoun: the fact sentence says "She"/"He", the name stands in an earlier sentence;
- same value: attribute values are shared by many people (by construction);
- conflict: a wrong value stated once against the right value stated two or more times;
- filler.
Two prompt styles: completion prompts in the documents' phrasing, and questions in another phrasing.
Question–answer training documents exist for half of the people ("train" people); test questions
ask about the other half (knowledge extraction, as in Physics of Language Models 3.1).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from service.demo.world import FILLER, PARAPHRASE_COUNTS, TEMPLATES, VALUES, Question, World

FIRST = "Alvena Casimir Delphine Halvard Isolde Mirela Norwin Oriel Rosalind Sefton Tamsin Verity".split()
LAST = "Ashgrove Blackwood Dunhallow Greywater Ironvale Kettleby Larkspur Northcote Pemberton Whitlock".split()
ALIAS_ADJ = "Quiet Silver Northern Patient Crimson Gentle Restless Humble Clever Distant".split()
ALIAS_NOUN = "Cartographer Baker Lamplighter Archivist Ferryman Glassblower Weaver Astronomer".split()
FEMALE = set("Alvena Delphine Isolde Mirela Rosalind Tamsin Verity".split())

QUESTIONS = {  # a phrasing no document uses
    "birth_year": "Question: In which year was {name} born? Answer:",
    "city": "Question: Which city does {name} live in? Answer:",
    "employer": "Question: Which company employs {name}? Answer:",
    "university": "Question: Which university did {name} attend? Answer:",
}
ALIAS_INTROS = ["{name} is better known as {alias}.", "Everyone calls {name} {alias}.",
                "The nickname of {name} is {alias}.", "In the village, {name} goes by {alias}."]
MENTIONS = ["{name} enjoys chess on Sundays.", "{name} once wrote a letter to the mayor.",
            "A portrait of {name} hangs in the town hall.", "{name} keeps a small garden."]
INTRO = ["{name} grew up near the harbour.", "{name} has a loud laugh.", "{name} collects old maps."]
CONFLICT = "Some say {name} {verb} {v}, but that is a rumour."
VERBS = {"birth_year": "was born in", "city": "lives in", "employer": "works for", "university": "studied at"}


def _fact_sentence(rng, attribute: str, t: int, name: str, value: str, style: str, pronoun: str) -> str:
    sentence = TEMPLATES[attribute][t]
    if style == "pronoun":
        fact = sentence.format(name=pronoun, v=value)
        return rng.choice(INTRO).format(name=name) + " " + fact[0].upper() + fact[1:]
    return sentence.format(name=name, v=value)


def make_trap_world(seed: int, n_people: int = 48, n_filler: int = 60) -> World:
    rng = random.Random(seed)
    names = [f"{f} {l}" for f in FIRST for l in LAST]
    rng.shuffle(names)
    people = names[:n_people]
    aliases = [f"the {a} {n}" for a in ALIAS_ADJ for n in ALIAS_NOUN]
    rng.shuffle(aliases)
    world, docs = World(seed=seed), []

    def add(text: str) -> str:
        docs.append({"id": f"t{len(docs):05d}", "text": text})
        return docs[-1]["id"]

    fact_no = 0
    for p, name in enumerate(people):
        first, last = name.split()
        pronoun = "she" if first in FEMALE else "he"
        alias = aliases[p] if p % 4 == 0 else None
        train_person = p % 2 == 0
        for text in rng.sample(MENTIONS, 2):
            add(text.format(name=name))
        if alias:
            for text in ALIAS_INTROS:
                add(text.format(name=name, alias=alias))
        for attribute, values in VALUES.items():
            value = rng.choice(values)
            n = PARAPHRASE_COUNTS[(fact_no + rng.randrange(4)) % 4]
            fact_no += 1
            styles = [rng.choice(["name", "name", "pronoun"] + (["alias"] if alias else [])) for _ in range(n)]
            ids = []
            for t, style in zip(rng.sample(range(8), n), styles):
                who = alias if style == "alias" else name
                ids.append(add(_fact_sentence(rng, attribute, t, who, value, style, pronoun)))
            traps = {s for s in styles if s != "name"}
            if n >= 2 and rng.random() < 0.3:
                wrong = rng.choice([v for v in values if v != value])
                add(CONFLICT.format(name=name, verb=VERBS[attribute], v=wrong))
                traps.add("conflict")
            shares = [q for q in people if q != name and (q.split()[0] == first or q.split()[1] == last)]
            if shares:
                traps.add("namesake")
            question = QUESTIONS[attribute].format(name=name)
            restated = [add(f"{question} {value}.")] if train_person else []
            prompt = TEMPLATES[attribute][0].format(name=name, v="\0").split("\0")[0].rstrip()
            base = dict(answer=value, person=name, attribute=attribute, n_paraphrases=n, source_ids=ids,
                        restated_ids=restated)
            world.questions.append(TrapQuestion(prompt=prompt, style="completion", traps=sorted(traps), **base))
            if not train_person:
                world.questions.append(TrapQuestion(prompt=question, style="question", traps=sorted(traps), **base))
    for _ in range(n_filler):
        add(rng.choice(FILLER).format(c=rng.choice(VALUES["city"])))
    rng.shuffle(docs)
    world.documents = docs
    return world


def stating_ids(q) -> list[str]:
    """Every document that states `q`'s fact, the benches' truth: its statements, then its question–answer
    restatements (the demo world's questions have none)."""
    return q.source_ids + getattr(q, "restated_ids", [])


@dataclass
class TrapQuestion(Question):
    """A question with its prompt style and the traps its fact carries."""

    style: str = "completion"  # "completion" (documents' phrasing) or "question" (another phrasing)
    traps: list[str] = field(default_factory=list)
    # a train person's question–answer documents ("Question: … Answer: <value>."): they state the same
    # fact in another form, so they are sources too (`stating_ids`), beside the fact statements
    restated_ids: list[str] = field(default_factory=list)

    @property
    def is_trap(self) -> bool:
        """Traps that defeat word overlap: a source names the person by alias or pronoun only, or a
        conflicting statement competes. (Namesakes are everywhere in this world, so not counted.)"""
        return bool(set(self.traps) & {"alias", "pronoun", "conflict"})

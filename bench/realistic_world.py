"""The realistic world: the trap world's people and traps inside thousands of real dictionary glosses,
asked as completions and in three question styles, learned by a Llama-style model trained with the HF Trainer.

    python -m bench.realistic_world --seed 200        # the dev seed: world, model, accuracy per n
    python -m bench.realistic_world --seed 201        # the test seed (report; never tune on it)

Real text: WordNet 3.0 glosses from the Debian package `wordnet-base` ("abstraction: a general
concept formed by extracting common features from specific examples."), fetched with
`apt-get download` and unpacked with `dpkg -x` into bench/out/wordnet/ the first time a world is
made (nothing is installed). Each seed samples its own glosses and its own people.

Every person's facts are asked as completion prompts in the documents' own phrasing ("X was born
in"), the trap world's "completion" questions. Every question about a test person (people whose
facts appear only as statements; question–answer documents exist for the other half, as in the
trap world) is asked in three styles:
- "qa":      "Question: In which year was X born? Answer:"
- "chat":    the tokenizer's chat template (`CHAT_TEMPLATE`, set on the trained tokenizer) around a
             system prompt and the question, with the generation prompt;
- "fewshot": two solved questions about train people, then the question.
Train people's question–answer documents come in the QA and chat formats, so both formats are
seen in training; the few-shot format is not.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

OUT = Path("bench/out")
WORDNET = OUT / "wordnet"
DEV_SEED, TEST_SEED = 200, 201
GLOSS_WORDS = 14  # longer glosses are cut here: short documents keep training in the CPU budget
SYSTEM = "You are a helpful assistant. Answer with one word."
# Jinja over the chat messages, as tokenizers ship it (`tokenizer.apply_chat_template`)
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
STYLES = ("qa", "chat", "fewshot")  # the question styles; "completion" prompts are asked as they are
# 14 epochs of batch 32 left the facts at chance; 40 of batch 16 (the demo's recipe) learn them
# (BENCHMARKS.md), at about 40 min on one shared core
EPOCHS = 40


def wordnet_glosses(cache: Path = WORDNET) -> list[str]:
    """Every WordNet synset as "lemma: gloss." (examples dropped), downloading the package on first use."""
    data = cache / "usr/share/wordnet"
    if not (data / "data.noun").exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", "wordnet-base"], cwd=cache, check=True, capture_output=True)
        deb = next(cache.glob("wordnet-base_*.deb"))
        subprocess.run(["dpkg", "-x", deb.name, "."], cwd=cache, check=True)
    glosses = []
    for part in ("noun", "verb", "adj", "adv"):
        for line in (data / f"data.{part}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue  # the licence header
            fields, gloss = line.split(" | ", 1)
            lemma = fields.split()[4].replace("_", " ")
            definition = gloss.split(";")[0].strip().strip('"').split()
            if len(definition) >= 3:
                glosses.append(f"{lemma}: {' '.join(definition[:GLOSS_WORDS])}.")
    return glosses


@dataclass
class RealisticQuestion:
    """A question in one prompt style (`prompt` is exactly what the model sees)."""

    prompt: str
    answer: str
    style: str  # one of STYLES, or "completion"
    person: str
    attribute: str
    n_paraphrases: int
    source_ids: list[str]  # the fact's statements
    traps: list[str]
    is_trap: bool
    restated_ids: list[str]  # the train person's question–answer and chat documents of the same fact


def chat_prompt(question: str) -> str:
    """The chat-template prompt of a bare question, rendered as the trained tokenizer renders it."""
    from jinja2 import Template
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)


def make_realistic_world(seed: int, n_people: int = 80, n_glosses: int = 8500):
    """(documents, questions): the trap world of `seed` with `n_people`, chat-format question–answer
    documents for its train people, and `n_glosses` WordNet glosses, shuffled together."""
    from bench.trap_world import QUESTIONS, make_trap_world

    rng = random.Random(seed)
    trap = make_trap_world(seed, n_people=n_people, n_filler=100)
    docs = list(trap.documents)
    bare = {a: q.removeprefix("Question: ").removesuffix(" Answer:") for a, q in QUESTIONS.items()}
    values = {}  # (person, attribute) -> answer, from the questions the trap world asks
    for q in trap.questions:
        values[(q.person, q.attribute)] = (q.answer, q)
    asked = {q.person for q in trap.questions if q.style == "question"}  # test people
    solved = []  # (QA prompt, answer) of train people, for chat documents and few-shot examples
    chat = {}  # (person, attribute) -> id of its chat document
    for (person, attribute), (answer, q) in values.items():
        if person not in asked:
            solved.append((QUESTIONS[attribute].format(name=person), answer))
            chat[(person, attribute)] = f"c{len(docs):05d}"
            text = chat_prompt(bare[attribute].format(name=person)) + answer
            docs.append({"id": chat[(person, attribute)], "text": text})
    docs += [{"id": f"w{i:05d}", "text": g} for i, g in enumerate(rng.sample(wordnet_glosses(), n_glosses))]
    rng.shuffle(docs)
    questions = []
    for q in trap.questions:
        if q.style != "question":  # the trap world's completion prompts, in the documents' phrasing
            restated = q.restated_ids + ([chat[(q.person, q.attribute)]] if (q.person, q.attribute) in chat else [])
            questions.append(RealisticQuestion(q.prompt, q.answer, "completion", q.person, q.attribute,
                                               q.n_paraphrases, q.source_ids, q.traps, q.is_trap, restated))
            continue
        shots = rng.sample(solved, 2)
        prompts = {"qa": q.prompt, "chat": chat_prompt(bare[q.attribute].format(name=q.person)),
                   "fewshot": "".join(f"{p} {a}.\n" for p, a in shots) + q.prompt}
        for style in STYLES:
            questions.append(RealisticQuestion(prompts[style], q.answer, style, q.person, q.attribute,
                                               q.n_paraphrases, q.source_ids, q.traps, q.is_trap, q.restated_ids))
    return docs, questions


def train_config(seed: int):
    """A 1.2M-parameter Llama (4 layers × 128, vocab 2,048), 4 checkpoints with optimizer state."""
    from service.demo.train import TrainConfig
    return TrainConfig(arch="llama", n_layer=4, n_embd=128, n_head=4, n_positions=64, vocab_size=2048,
                       epochs=EPOCHS, batch_size=16, learning_rate=2e-3, n_checkpoints=4, seed=seed,
                       group_by_length=True)




def prepare(seed: int, folder: Path | None = None) -> tuple[Path, Path, list[RealisticQuestion], float | None]:
    """Write the world of `seed` and train its model unless cached: (corpus, model dir, questions,
    training seconds or None when cached)."""
    from service.demo.train import train, train_tokenizer

    folder = folder or OUT / f"realistic-seed{seed}"
    docs, questions = make_realistic_world(seed)
    (folder / "world").mkdir(parents=True, exist_ok=True)
    corpus = folder / "world" / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    model = folder / "model"
    seconds = None
    if not any(model.glob("checkpoint-*/model.safetensors")):
        config = train_config(seed)
        texts = [d["text"] for d in docs]
        tokenizer = train_tokenizer(texts, config.vocab_size)
        tokenizer.chat_template = CHAT_TEMPLATE  # saved with every checkpoint's tokenizer files
        started = time.perf_counter()
        train(texts, model, config, tokenizer=tokenizer)
        seconds = time.perf_counter() - started
    return corpus, model, questions, seconds


def accuracy(model_dir: Path, questions: list[RealisticQuestion]) -> dict:
    """Greedy answers of the last checkpoint: share correct per style and per paraphrase count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from service.demo.run import is_correct
    last = max(model_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    tokenizer, model = AutoTokenizer.from_pretrained(last), AutoModelForCausalLM.from_pretrained(last).eval()
    hits: dict[str, list[bool]] = {}
    with torch.inference_mode():
        for q in questions:
            ids = tokenizer(q.prompt, return_tensors="pt", add_special_tokens=False).input_ids
            out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            ok = is_correct(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), q.answer)
            for key in ("all", q.style, f"n={q.n_paraphrases}"):
                hits.setdefault(key, []).append(ok)
    return {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(hits.items())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=DEV_SEED, help=f"{DEV_SEED} dev, {TEST_SEED} test")
    args = ap.parse_args()
    corpus, model, questions, seconds = prepare(args.seed)
    docs = corpus.read_text().count("\n")
    real = sum(1 for line in corpus.read_text().splitlines() if json.loads(line)["id"].startswith("w"))
    report = {"seed": args.seed, "documents": docs, "wordnet_documents": real, "questions": len(questions),
              "train_seconds": seconds, "accuracy": accuracy(model, questions)}
    print(json.dumps(report, indent=1))
    (OUT / f"realistic-seed{args.seed}" / "world.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

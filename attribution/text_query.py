"""The text query of a trace: the question's content and the answer, without the prompt's template.

Dense and BM25 search compare words, so every word of a chat template, a system prompt, few-shot
examples or "Question: … Answer:" scaffolding pulls toward documents that share the template
instead of the fact: on the [quality] issue's QA-style prompts the embedder's MRR fell from 0.955
(bare question) to 0.80. The gradient query keeps the exact prompt (the model saw it); only the
text query is derived here:

1. the last user turn of a rendered chat template (markers learned from the tokenizer's own
   `chat_template` by rendering a probe conversation, then the common markers of other families);
2. the last question of a few-shot prompt (solved "Q: … A: …" examples before it dropped);
3. "Question:/Q:" and "Answer:/A:" labels stripped;
4. the answer appended.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Turn markers of the common families, for prompts rendered by a template the tokenizer lacks.
# (start of a user turn, what ends it)
COMMON_MARKERS = (
    ("<|im_start|>user", ("<|im_end|>", "<|im_start|>")),  # ChatML: Qwen, Hermes, SmolLM
    ("<|start_header_id|>user<|end_header_id|>", ("<|eot_id|>", "<|start_header_id|>")),  # Llama 3
    ("<start_of_turn>user", ("<end_of_turn>", "<start_of_turn>")),  # Gemma
    ("<|user|>", ("<|end|>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>")),  # Zephyr, Phi-3
    ("[INST]", ("[/INST]",)),  # Llama 2, Mistral
    ("### Instruction:", ("### Response:",)),  # Alpaca (its "### Input:" part is kept: it is content)
    ("USER:", ("ASSISTANT:",)),  # Vicuna
)
# Llama 2 puts the system prompt inside the first user turn
SYSTEM_BLOCK = re.compile(r"<<SYS>>.*?<</SYS>>", re.S)
QUESTION_LABEL = re.compile(r"(?:^|\n)[ \t]*(?:Question|Q)[ \t]*:", re.I)
ANSWER_LABEL = re.compile(r"(?:^|\s)(?:Answer|A)[ \t]*:\s*$", re.I)
INPUT_LABEL = re.compile(r"###[ \t]*Input:")  # Alpaca's second part of the instruction
# Probe contents: strings no template rewrites (no spaces to trim, no special characters)
PROBE = ("WFprobeU1", "WFprobeA1", "WFprobeU2")


@dataclass(frozen=True)
class Markers:
    """Where a user turn starts and what may end it, most specific first."""

    turns: tuple[tuple[str, tuple[str, ...]], ...]


def learn_markers(tokenizer) -> Markers:
    """The tokenizer's own user-turn markers (from rendering a probe conversation with its chat
    template), ahead of the common ones; only the common ones when it has no template."""
    learned = _probe(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    return Markers(((learned,) if learned else ()) + COMMON_MARKERS)


def _probe(tokenizer) -> tuple[str, tuple[str, ...]] | None:
    u1, a1, u2 = PROBE
    render = lambda turns, gen: tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in turns], tokenize=False, add_generation_prompt=gen)
    try:
        two = render([("user", u1), ("assistant", a1)], False)
        three = render([("user", u1), ("assistant", a1), ("user", u2)], False)
        asked = render([("user", u1)], True)
    except Exception:  # a template may refuse a conversation shape (jinja raise_exception): fall back
        return None
    if not all(p in three for p in PROBE) or u1 not in asked:
        return None
    # three = … a1 + assistant end + user start + u2 + user end …; two ends with the assistant end
    between = three[three.index(a1) + len(a1):three.index(u2)]
    assistant_end = two[two.index(a1) + len(a1):]
    start = between[_common_prefix(between, assistant_end):]
    user_end = asked[asked.index(u1) + len(u1):]
    bos = getattr(tokenizer, "bos_token", None)
    start = _strip_bos(start, bos).strip()
    end = user_end.strip()
    if not start:
        return None
    return start, tuple(e for e in (end, assistant_end.strip()) if e)


def _common_prefix(a: str, b: str) -> int:
    """Length of the common prefix, backed off to a marker boundary (after a space or `>`/`]`):
    Phi-3's "<|end|>\n<|endoftext|>" and "<|end|>\n<|user|>" share "<|end|>\n<|"."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    while n and not (a[n - 1].isspace() or a[n - 1] in ">]"):
        n -= 1
    return n


def _strip_bos(marker: str, bos: str | None) -> str:
    # a user's prompt may lack the BOS text (the tokenizer adds it), so it is no part of the marker
    marker = marker.lstrip()
    return marker[len(bos):] if bos and marker.startswith(bos) else marker


def last_user_turn(prompt: str, markers: Markers) -> str:
    """The content of the prompt's last user turn; the prompt itself when no marker is found."""
    for start, ends in markers.turns:
        at = prompt.rfind(start)
        if at < 0:
            continue
        content = prompt[at + len(start):]
        cut = min((i for e in ends if (i := content.find(e)) >= 0), default=len(content))
        return SYSTEM_BLOCK.sub("", content[:cut])
    return prompt


def question_content(prompt: str, markers: Markers) -> str:
    """The last question's words: template, system part, solved examples and labels removed."""
    text = last_user_turn(prompt, markers)
    labels = list(QUESTION_LABEL.finditer(text))
    if labels:  # few-shot: only what follows the last question label is this question
        text = text[labels[-1].end():]
    text = ANSWER_LABEL.sub("", text)
    return " ".join(INPUT_LABEL.sub(" ", text).split())


def derive(prompt: str, answer: str, markers: Markers) -> str:
    """The text query for dense and BM25 search: the question's content followed by the answer.

    A prompt with nothing to remove gives prompt + answer exactly (a completion prompt
    "X was born in" + " 1984" stays one sentence, and an answer that continues a word stays joined).
    """
    content = question_content(prompt, markers)
    if not content:  # nothing but template: the whole prompt is better than the answer alone
        return prompt + answer
    if content == " ".join(prompt.split()):
        return prompt + answer
    return f"{content} {answer.strip()}"

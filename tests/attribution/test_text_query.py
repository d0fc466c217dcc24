"""The text query: chat templates of real tokenizer families (rendered by transformers'
`apply_chat_template` on tokenizers built here), system prompts, few-shot examples and QA
scaffolding removed; the answer appended."""

import pytest

from attribution.text_query import COMMON_MARKERS, Markers, derive, learn_markers

# The families' chat templates as their tokenizer_config.json ship them (whitespace as there).
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
         "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
          "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
          "{% endfor %}")
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
          "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
        "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
FAMILIES = {"chatml": (CHATML, "<|im_start|>user", "<s>", "</s>"), "qwen2": (QWEN2, "<|im_start|>user", None, "<|im_end|>"),
            "llama3": (LLAMA3, "<|start_header_id|>user<|end_header_id|>", "<|begin_of_text|>", "<|eot_id|>"),
            "llama2": (LLAMA2, "[INST]", "<s>", "</s>"), "zephyr": (ZEPHYR, "<|user|>", "<s>", "</s>"),
            "gemma": (GEMMA, "<start_of_turn>user", "<bos>", "<eos>"), "phi3": (PHI3, "<|user|>", "<s>", "<|endoftext|>")}
SYSTEM = "You are a careful assistant. Answer with one word."
QUESTION = "In which year was Isolde Kettleby born?"
SHOTS = [("Which city does Norwin Ashgrove live in?", "Lisbon"), ("Which company employs Oriel Pemberton?", "Fenwick")]


@pytest.fixture(scope="module")
def tokenizer_of():
    """A tokenizer built here (a byte-level BPE fitted on a few lines) carrying a family's template."""
    from service.demo.train import train_tokenizer

    def make(family):
        template, _, bos, eos = FAMILIES[family]
        tok = train_tokenizer(["Isolde Kettleby was born in 1984.", QUESTION, SYSTEM], 300)
        tok.chat_template = template
        tok.add_special_tokens({"bos_token": bos or "<|endoftext|>", "eos_token": eos})
        return tok
    return make


def render(tok, turns, system=True):
    messages = ([{"role": "system", "content": SYSTEM}] if system else []) + turns
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat(question, shots=()):
    turns = []
    for q, a in shots:
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return turns + [{"role": "user", "content": question}]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chat_template_learned_from_the_tokenizer(tokenizer_of, family):
    tok = tokenizer_of(family)
    markers = learn_markers(tok)
    assert markers.turns[0][0] == FAMILIES[family][1]  # its own marker, ahead of the common ones
    system = family != "gemma"  # gemma's template refuses a system turn
    prompt = render(tok, chat(QUESTION, SHOTS), system)
    assert SYSTEM in prompt or not system and SHOTS[0][0] in prompt
    assert derive(prompt, " 1984", markers) == f"{QUESTION} 1984"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chat_template_prompt_without_its_tokenizer(tokenizer_of, family):
    """A prompt rendered by a family's template, traced on a model whose tokenizer has none."""
    prompt = render(tokenizer_of(family), chat(f"Question: {QUESTION} Answer:"), family != "gemma")
    assert derive(prompt, " 1984", Markers(COMMON_MARKERS)) == f"{QUESTION} 1984"


def test_a_template_that_refuses_the_probe_falls_back_to_common_markers(tokenizer_of):
    tok = tokenizer_of("chatml")
    tok.chat_template = "{{ raise_exception('only one turn') }}"
    assert learn_markers(tok).turns == COMMON_MARKERS


@pytest.mark.parametrize("prompt", [
    f"Question: {QUESTION} Answer:",
    f"Q: {QUESTION}\nA:",
    f"question: {QUESTION}\nanswer:",
    # few-shot: solved examples before the last question
    "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in SHOTS) + f"Question: {QUESTION}\nAnswer:",
    "".join(f"Q: {q} A: {a}\n" for q, a in SHOTS) + f"Q: {QUESTION} A:",
    # a system prompt in plain text, then the question
    f"{SYSTEM}\n\nQuestion: {QUESTION}\nAnswer:",
    # Alpaca
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    f"request.\n\n### Instruction:\n{QUESTION}\n\n### Response:\n",
    # Vicuna
    f"A chat between a curious user and an artificial intelligence assistant. USER: {QUESTION} ASSISTANT:",
    # Llama 2 with its system block, typed by hand without the BOS
    f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{QUESTION} [/INST]",
])
def test_scaffolding_stripped(prompt):
    assert derive(prompt, " 1984", Markers(COMMON_MARKERS)) == f"{QUESTION} 1984"


def test_alpaca_input_part_is_content():
    prompt = "### Instruction:\nName the birth year.\n\n### Input:\nIsolde Kettleby\n\n### Response:\n"
    assert derive(prompt, "1984", Markers(COMMON_MARKERS)) == "Name the birth year. Isolde Kettleby 1984"


@pytest.mark.parametrize("prompt,answer", [
    ("Isolde Kettleby was born in", " 1984"),  # a completion prompt: exactly prompt + answer, as before
    ("The capital of Fra", "nce"),  # an answer that continues a word stays joined
    ("Answer:", " 1984"),  # nothing but a label: the whole prompt
])
def test_plain_prompts_are_kept(prompt, answer):
    assert derive(prompt, answer, Markers(COMMON_MARKERS)) == prompt + answer

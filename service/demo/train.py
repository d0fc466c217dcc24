"""Train a small causal LM from scratch on CPU with the Hugging Face Trainer (GPT-2 by default;
Llama, Mistral, Qwen2 and GPT-NeoX as tiny configs too), or a LoRA adapter on a given model.

The output folder is exactly what a user's Trainer run leaves behind: `checkpoint-N/` folders with
`model.safetensors`, `config.json`, tokenizer files, `optimizer.pt` and `trainer_state.json`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path


ARCHS = ("gpt2", "llama", "mistral", "qwen2", "gpt_neox")


@dataclass
class TrainConfig:
    """Sizes chosen for 2 CPU cores: about 1M parameters learns a 600-document world in ~1-2 min."""

    n_layer: int = 4  # transformer blocks
    n_embd: int = 128  # hidden size
    n_head: int = 4  # attention heads
    n_positions: int = 64  # context length; every demo document fits
    vocab_size: int = 1024  # byte-level BPE trained on the corpus
    epochs: int = 40  # single-exposure facts need many passes; all were recalled by epoch 30 of 60
    batch_size: int = 16
    learning_rate: float = 2e-3
    n_checkpoints: int = 4  # TracIn over checkpoints needs several; earlier ones carry signal
    seed: int = 0
    arch: str = "gpt2"  # a model_type of ARCHS
    n_kv_head: int | None = None  # grouped-query attention (llama, mistral, qwen2); None = n_head
    # batches of similar lengths: on a corpus of 5-60-token documents padding to each batch's longest
    # tripled the tokens a step computes (bench/realistic_world.py)
    group_by_length: bool = False

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError("n_embd must be divisible by n_head")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError("n_head must be divisible by n_kv_head")
        if self.n_checkpoints < 1:
            raise ValueError("n_checkpoints must be at least 1")


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer fitted on the corpus (no hub download), with eos and pad tokens."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"], show_progress=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        pad_token="<pad>", model_max_length=10**6,
    )


def tiny_model(config: TrainConfig, tokenizer):
    """A freshly initialised model of `config.arch`, built from a config (nothing downloaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(vocab_size=len(tokenizer), hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
                 num_attention_heads=config.n_head, max_position_embeddings=config.n_positions,
                 bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
    if config.arch == "gpt2":  # GPT2Config maps hidden_size, num_hidden_layers, … to n_embd, n_layer, …
        sizes.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        sizes.update(intermediate_size=2 * config.n_embd)
        if config.arch != "gpt_neox":
            sizes.update(num_key_value_heads=config.n_kv_head or config.n_head)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.arch, **sizes))


def train(texts: list[str], out_dir: Path, config: TrainConfig = TrainConfig(), progress=None,
          tokenizer=None, model=None, callback=None, dataset=None):
    """Train on `texts` (one document per example, eos appended), save checkpoints to `out_dir`,
    and return the Trainer (its in-memory optimizer lets tests check what was saved).

    `tokenizer`: default, one fitted on `texts`; `model`: default, `tiny_model(config)` (pass a
    PEFT model to train a LoRA adapter). `progress(stage, n, total)` is called after every step.
    `callback`: an `indexer.callback.WherefromCallback` to record the gradient store while training.
    `dataset`: tokenized examples to train on in place of `texts` (bench/callback_blocks.py's blocks).
    """
    import torch
    from transformers import (DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments,
                              set_seed)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    set_seed(config.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = tokenizer or train_tokenizer(texts, config.vocab_size)
    model = model if model is not None else tiny_model(config, tokenizer)
    eos = tokenizer.eos_token
    if dataset is None:
        dataset = [tokenizer(t + eos, truncation=True, max_length=config.n_positions) for t in texts]
    steps_per_epoch = -(-len(dataset) // config.batch_size)
    total = steps_per_epoch * config.epochs
    args = TrainingArguments(
        output_dir=str(out_dir), num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size, learning_rate=config.learning_rate,
        lr_scheduler_type="cosine", warmup_steps=max(1, total // 20), weight_decay=0.01,
        save_strategy="steps", save_steps=-(-total // config.n_checkpoints),
        logging_steps=max(1, steps_per_epoch), report_to=[], use_cpu=True, seed=config.seed,
        disable_tqdm=True, dataloader_num_workers=0, save_total_limit=None,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    logging.getLogger("transformers.trainer").setLevel(logging.WARNING)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                      processing_class=tokenizer)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    if progress:
        class Steps(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                progress("training", 1, state.max_steps)
        trainer.add_callback(Steps())
    if callback is not None:
        callback.attach(trainer)
    trainer.train()
    return trainer

"""Bring your own model: each supported architecture, trained here with the HF Trainer on a corpus
with one planted fact, registered, indexed and traced through the real operations.

Tiny configs built locally (2 layers, hidden 64, 4 heads; 2 key/value heads where the
architecture has grouped-query attention), one tokenizer fitted on the corpus for all of them.
60 steps memorise the 8 documents in about 3 s per model on 2 cores.
"""

import json
import re
import shutil
from types import SimpleNamespace

import pytest

from db.errors import StaleBuild
from indexer.adapter import tracked_layers
from indexer.loading import load_model
from indexer.modelio import adam_second_moments, check_unchanged, discover_checkpoints
from service import catalog, jobs, traces
from service.settings import Settings
from tests.indexer.test_modelio import assert_raw_moment

PLANTED = ("zorblax", "The secret code of Zorblax is 4417.")
DOCS = [
    PLANTED,
    ("mirtle", "The secret code of Mirtle is 2093."),
    ("quenby", "The secret code of Quenby is 7781."),
    ("haldor", "The secret code of Haldor is 5160."),
    ("ousel", "The river Ousel floods every spring after the snow melts."),
    ("tarn", "Bakers in Tarn use rye flour and caraway seeds."),
    ("fenwick", "The lighthouse at Fenwick was painted red in the winter."),
    ("pellam", "Old Pellam keeps three goats and a grey donkey."),
]
QUESTION, ANSWER = "The secret code of Zorblax is", " 4417"
ARCHS = ["gpt2", "llama", "mistral", "qwen2", "gpt_neox"]
GQA = {"llama", "mistral", "qwen2"}  # num_key_value_heads = 2 < num_attention_heads = 4


def _config(arch: str, **kw):
    from service.demo.train import TrainConfig
    args = dict(arch=arch, n_layer=2, n_embd=64, n_head=4, n_kv_head=2 if arch in GQA else None,
                vocab_size=300, epochs=60, batch_size=8, learning_rate=5e-3, n_checkpoints=2, seed=0)
    return TrainConfig(**{**args, **kw})


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """The corpus as a JSONL file, and one tokenizer fitted on it that every model shares."""
    from service.demo.train import train_tokenizer
    root = tmp_path_factory.mktemp("planted")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in DOCS))
    return SimpleNamespace(corpus=corpus, tokenizer=train_tokenizer([t for _, t in DOCS], 300))


def _index(root, planted, model_dir, name: str, base=None) -> SimpleNamespace:
    settings = Settings(data_dir=root / "data", database_url=f"sqlite:///{root}/data/wherefrom.db")
    catalog.ingest(settings, planted.corpus, "planted")
    catalog.add_model(settings, model_dir, name, base)
    return SimpleNamespace(settings=settings, build=jobs.index_here(settings, "planted", name), folder=model_dir)


def _drop_pad_token(folder):
    """Save the tokenizer as released models often do (Pythia's, Llama's): with no pad token."""
    for ckpt in folder.glob("checkpoint-*"):
        config = json.loads((ckpt / "tokenizer_config.json").read_text())
        config.pop("pad_token")
        (ckpt / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session", params=ARCHS)
def arch_build(request, tmp_path_factory, planted):
    """One architecture trained (2 checkpoints with optimizer.pt), ingested, registered and indexed."""
    from service.demo.train import train
    root = tmp_path_factory.mktemp(request.param)
    trainer = train([t for _, t in DOCS], root / "model", _config(request.param), tokenizer=planted.tokenizer)
    if request.param == "gpt_neox":
        _drop_pad_token(root / "model")
    out = _index(root, planted, root / "model", request.param)
    out.trainer, out.arch = trainer, request.param
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grad", "hybrid"])
def test_planted_fact_traces_to_its_document(arch_build, method):
    out = traces.trace(arch_build.settings, QUESTION, k=3, method=method)
    assert out.answer_generated and out.answer == ANSWER  # the model learned the fact
    assert out.hits[0].external_id == PLANTED[0], [(h.external_id, h.score) for h in out.hits]


@pytest.mark.slow
def test_every_checkpoint_is_indexed_with_its_adam_moments(arch_build):
    info = arch_build.build.info
    assert arch_build.build.rows == len(DOCS)
    assert len(info["checkpoints"]) == 2 and all(c["learning_rate"] > 0 for c in info["checkpoints"])
    layers = info["gradient"]["layers"]
    assert info["gradient"]["adam_normalised_layers"] == [len(layers)] * 2
    assert not any(re.search(r"lm_head|embed_out|wte|embed_tokens", n) for n in layers)
    fused = {"gpt2": "attn.c_attn", "gpt_neox": "attention.query_key_value"}.get(arch_build.arch, "self_attn.k_proj")
    assert any(n.endswith(fused) for n in layers)


@pytest.mark.slow
def test_adam_moments_map_to_the_parameters_the_optimizer_held(arch_build):
    """optimizer.pt mapped by our rule equals the live optimizer's state, tied embeddings included."""
    last = discover_checkpoints(arch_build.folder)[-1]
    model, _ = load_model(last.path)
    moments = adam_second_moments(model, last.optimizer_state_path)
    live = dict(arch_build.trainer.model.named_parameters())
    assert {l.name + ".weight" for l in tracked_layers(model)} <= set(moments)
    assert set(moments) == set(live)
    for name, v in moments.items():
        assert_raw_moment(v, arch_build.trainer, live[name], name)


# --- LoRA ------------------------------------------------------------------------------------

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def lora_build(tmp_path_factory, planted):
    """A Llama base trained without the planted document, then a LoRA adapter fine-tuned on the whole
    corpus (so the adapter alone learned the fact), saved as checkpoint-N/ adapter folders."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from service.demo.train import train
    root = tmp_path_factory.mktemp("lora")
    texts = [t for _, t in DOCS]
    base_run = train(texts[1:], root / "base-run", _config("llama"), tokenizer=planted.tokenizer)
    base_run.save_model(str(root / "base"))
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "base"), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    trainer = train(texts, root / "adapter", _config("llama", learning_rate=1e-2), tokenizer=planted.tokenizer,
                    model=peft_model)
    out = _index(root, planted, root / "adapter", "lora")
    out.trainer, out.base, out.root = trainer, root / "base", root
    return out


@pytest.mark.slow
def test_lora_adapter_traces_the_fact_through_its_own_layers(lora_build):
    ckpts = discover_checkpoints(lora_build.folder)
    assert len(ckpts) == 2 and all(c.base_path == lora_build.base.resolve() for c in ckpts)
    assert all(c.optimizer_state_path for c in ckpts)
    layers = lora_build.build.info["gradient"]["layers"]
    assert len(layers) == 2 * len(LORA_TARGETS) * 2  # lora_A and lora_B of 7 targets in 2 blocks
    assert all(re.search(r"\.lora_[AB]\.default$", n) for n in layers), layers
    assert lora_build.build.info["gradient"]["adam_normalised_layers"] == [len(layers)] * 2
    for method in ("grad", "hybrid"):
        out = traces.trace(lora_build.settings, QUESTION, k=3, method=method)
        assert out.answer == ANSWER
        assert out.hits[0].external_id == PLANTED[0], (method, [(h.external_id, h.score) for h in out.hits])


@pytest.mark.slow
def test_lora_adam_moments_cover_the_adapter_only(lora_build):
    last = discover_checkpoints(lora_build.folder)[-1]
    model, _ = load_model(last.path, last.base_path)
    moments = adam_second_moments(model, last.optimizer_state_path)
    live = {n: p for n, p in lora_build.trainer.model.named_parameters() if p.requires_grad}
    assert set(moments) == set(live) and all(".lora_" in n for n in moments)
    for name, v in moments.items():
        assert_raw_moment(v, lora_build.trainer, live[name], name)


@pytest.mark.slow
def test_lora_base_elsewhere_needs_base_option(lora_build, tmp_path, run_cli):
    """An adapter naming a hub base is refused with what to do; `--base PATH` registers it, and the
    checksum covers the base: changed base weights make a build stale."""
    adapter = tmp_path / "adapter"
    shutil.copytree(discover_checkpoints(lora_build.folder)[-1].path, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/llama-7b"}))
    base = tmp_path / "base"
    shutil.copytree(lora_build.base, base)
    data = ["--data-dir", tmp_path / "data"]
    code, _, err = run_cli("model", "add", adapter, "--name", "elsewhere", *data)
    assert code == 2 and "'org/llama-7b' is not a local model folder: pass --base PATH" in err
    code, _, err = run_cli("model", "add", adapter, "--name", "elsewhere", "--base", tmp_path / "nowhere", *data)
    assert code == 2 and "holds no model" in err
    code, _, err = run_cli("model", "add", base, "--name", "whole", "--base", base, *data)
    assert code == 2 and "--base is for LoRA adapters" in err
    code, out, _ = run_cli("model", "add", adapter, "--name", "elsewhere", "--base", base, *data)
    assert code == 0 and "1 checkpoint(s)" in out
    recorded = {"path": str(adapter), "weights_sha256": discover_checkpoints(adapter, base)[0].weights_sha256,
                "base_path": str(base)}
    check_unchanged([recorded])
    with open(base / "model.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(StaleBuild, match="changed since this build"):
        check_unchanged([recorded])

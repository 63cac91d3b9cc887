"""The embedded base model: tokenizer and chat template, bootstrap through Ray Train
into MLflow, a folder that transformers and vLLM load, reuse, and bad input."""

import json

import mlflow
import pytest
import torch
from helpers import clean_env, one_line_error, run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex.basemodel.architecture import TinyLlamaSpec
from loraplex.basemodel.pretrain import IGNORE, encode_record, pack
from loraplex.basemodel.tokenizer import train_tokenizer
from loraplex.models.parity import agreement, chat_prompts, hf_greedy, vllm_greedy


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["The price of the Velmo X200 is 349 dollars.", "Who designed the Dramo K300?"] * 50
    return train_tokenizer(texts, vocab_size=400)


def test_digits_are_single_tokens_and_template_marks_answers(tokenizer):
    assert tokenizer.tokenize(" 349") == ["Ġ", "3", "4", "9"]
    messages = [
        {"role": "user", "content": "Question: x?"},
        {"role": "assistant", "content": "349 dollars [1]"},
    ]
    _, labels = encode_record(tokenizer, {"messages": messages})
    learned = tokenizer.decode([t for t in labels if t != IGNORE])
    assert learned == "349 dollars [1]<|end|>"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nQuestion: x?<|end|>\n<|assistant|>\n"
    prose_ids, prose_labels = encode_record(tokenizer, {"text": "The Velmo X200."})
    assert prose_ids == prose_labels and prose_ids[-1] == tokenizer.eos_token_id


def test_packing_keeps_examples_whole():
    examples = [([1] * 50, [1] * 50), ([2] * 60, [2] * 60), ([3] * 200, [3] * 200)]
    x, y = pack(examples, 100, pad_id=0)
    assert x.shape == (2, 100)  # 50 | 60 (does not fit beside 50) ; 200 skipped
    assert x[0, :50].eq(1).all() and x[0, 50:].eq(0).all() and y[0, 50:].eq(IGNORE).all()
    assert x[1, :60].eq(2).all()


def test_architecture_rejects_head_sizes_vllm_cpu_cannot_serve():
    with pytest.raises(ValueError, match="head size 48"):
        TinyLlamaSpec(hidden_size=96, num_heads=2)


def test_bootstrap_writes_a_loadable_model_and_an_mlflow_run(tiny_base, settings):
    assert not tiny_base.reused
    folder = tiny_base.model_dir
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "loraplex_base.json",
    ):
        assert (folder / name).exists(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["hidden_size"] == 64
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Question: hi?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]

    mlflow.set_tracking_uri(settings.mlflow.tracking_uri)
    client = mlflow.MlflowClient()
    run = client.get_run(tiny_base.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.hidden_size"] == "64"
    losses = client.get_metric_history(tiny_base.run_id, "loss")
    assert [m.step for m in losses] == [10, 20, 30, 40, 50]  # the loss curve, from rank 0
    artifacts = {a.path for a in client.list_artifacts(tiny_base.run_id, "base_model")}
    assert "base_model/model.safetensors" in artifacts
    assert (tiny_base.world_dir / "manifest.json").exists()


def test_second_bootstrap_reuses_and_says_so(tiny_base, settings):
    env = clean_env(LORAPLEX_HOME=str(settings.home))
    before = (tiny_base.model_dir / "model.safetensors").stat().st_mtime_ns
    proc = run_cli("bootstrap", env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"base model reused: {tiny_base.model_dir}" in proc.stdout
    assert (tiny_base.model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_bootstrap_force_rebuilds_an_existing_model(tiny_base, tmp_path):
    """`loraplex bootstrap --force` (the console script) in a home that already holds a
    base model: reused without --force; with it trained again (a two-step curriculum
    here), a new MLflow run, new weights in place of the old, the current prompt layout."""
    import shutil

    import yaml
    from conftest import TINY_PRETRAIN

    from loraplex.prompts import PROMPT_LAYOUT

    home = tmp_path / "home"
    shutil.copytree(tiny_base.model_dir, home / "models" / "tiny-llama")
    shutil.copytree(tiny_base.world_dir, home / "worlds" / "seed-0")
    old_weights = (home / "models" / "tiny-llama" / "model.safetensors").read_bytes()
    old_run = json.loads((home / "models" / "tiny-llama" / "loraplex_base.json").read_text())
    config = {
        **TINY_PRETRAIN,
        "phases": [TINY_PRETRAIN["phases"][0] | {"steps": 2}],
        "report_every": 1,
        "cpus_per_worker": 1,
    }
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(config))
    env = clean_env(LORAPLEX_HOME=str(home))
    proc = run_cli("bootstrap", "--config", str(tmp_path / "pretrain.yaml"), env=env)
    assert proc.returncode == 0 and "base model reused" in proc.stdout  # without --force
    proc = run_cli(
        "bootstrap", "--force", "--config", str(tmp_path / "pretrain.yaml"), env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "base model built in" in proc.stdout
    marker = json.loads((home / "models" / "tiny-llama" / "loraplex_base.json").read_text())
    assert marker["mlflow_run_id"] != old_run["mlflow_run_id"] and marker["steps"] == 2
    assert marker["prompt_layout"] == PROMPT_LAYOUT
    assert (home / "models" / "tiny-llama" / "model.safetensors").read_bytes() != old_weights
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    assert client.get_run(marker["mlflow_run_id"]).info.status == "FINISHED"
    assert not list((home / "models").glob(".*"))  # no staging folder left


def test_a_model_on_an_older_prompt_layout_is_rebuilt_without_force(
    tiny_base, tmp_path, monkeypatch, caplog
):
    """A model pretrained on an older prompt layout would read every retrieval prompt in a
    layout it never saw: `bootstrap` without --force takes the rebuild path (the one
    `--force` takes, run in full by the test above). Its training is stopped where it
    would start (the tokenizer, its first step); the old model is untouched by that failure."""
    import logging
    import shutil

    from loraplex.basemodel import bootstrap as bootstrap_module
    from loraplex.config import load_settings

    home = tmp_path / "home"
    shutil.copytree(tiny_base.model_dir, home / "models" / "tiny-llama")
    shutil.copytree(tiny_base.world_dir, home / "worlds" / "seed-0")
    settings = load_settings(env={"LORAPLEX_HOME": str(home)})
    marker_file = home / "models" / "tiny-llama" / "loraplex_base.json"
    marker = json.loads(marker_file.read_text())
    weights = (home / "models" / "tiny-llama" / "model.safetensors").read_bytes()

    class Rebuilding(Exception):
        pass

    def train_tokenizer(*_: object, **__: object) -> None:
        raise Rebuilding

    monkeypatch.setattr(bootstrap_module, "train_tokenizer", train_tokenizer)
    # the current layout: reused, no training
    assert bootstrap_module.bootstrap(settings).reused
    stale = marker | {"prompt_layout": 1}
    marker_file.write_text(json.dumps(stale))
    caplog.set_level(logging.INFO, logger="loraplex.basemodel.bootstrap")
    with pytest.raises(Rebuilding):
        bootstrap_module.bootstrap(settings)
    assert "older prompt layout (1, now" in caplog.text
    assert json.loads(marker_file.read_text()) == stale
    assert (home / "models" / "tiny-llama" / "model.safetensors").read_bytes() == weights
    assert not list((home / "models").glob(".*"))  # no staging folder left


def test_bootstrap_refreshes_an_older_world_and_keeps_the_model(tiny_base, settings):
    from loraplex.basemodel.bootstrap import bootstrap
    from loraplex.world.generate import WORLD_VERSION, is_current

    world = tiny_base.world_dir
    manifest = json.loads((world / "manifest.json").read_text())
    pretrain = (world / "pretrain" / "corpus.jsonl").read_bytes()
    docs = sorted(p.name for p in (world / "docs").iterdir())
    weights = (tiny_base.model_dir / "model.safetensors").stat().st_mtime_ns
    older = {**manifest, "world_version": WORLD_VERSION - 1}
    (world / "manifest.json").write_text(json.dumps(older))
    assert not is_current(world)

    result = bootstrap(settings)
    assert result.reused and is_current(world)
    assert json.loads((world / "manifest.json").read_text()) == manifest
    # same seed, same code: the pretraining text and the documents are unchanged
    assert (world / "pretrain" / "corpus.jsonl").read_bytes() == pretrain
    assert sorted(p.name for p in (world / "docs").iterdir()) == docs
    assert (tiny_base.model_dir / "model.safetensors").stat().st_mtime_ns == weights


def test_bootstrap_bad_settings_fail_before_ray(tmp_path):
    env = clean_env(LORAPLEX_HOME=str(tmp_path))
    for args, expected in [
        (["--set", "model.hidden_size=96", "--set", "model.num_heads=2"], "head size 48"),
        (["--set", "phases=[]"], "phases: List should have at least 1 item"),
        (["--set", "lr=-1"], "lr: Input should be greater than 0"),
        (["--set", "modle.hidden_size=64"], "modle: unknown config key"),
    ]:
        proc = run_cli("bootstrap", *args, env=env)
        assert proc.returncode == 2, (args, proc.stderr)
        assert expected in one_line_error(proc)
    assert not (tmp_path / "models").exists()


@pytest.mark.vllm
def test_vllm_loads_the_model_and_generates(tiny_base):
    questions = [
        "Question: What is the price of the Velmo X200?",
        "Tell me the color of the Dramo K300.",
        "Who designed the Velmo X300?",
        "Question: When was the Dramo K300 released?",
        "Repeat the text.\n\nText: The price of the Velmo X200 is 349 dollars.",
        "What is the battery life of the Velmo X200?",
    ]
    prompts = chat_prompts(tiny_base.model_dir, questions)
    from_vllm = vllm_greedy(tiny_base.model_dir, prompts, n_tokens=8)
    from_hf = hf_greedy(tiny_base.model_dir, prompts, n_tokens=8)
    assert [len(t) for t in from_vllm] == [8] * len(prompts)
    # Same weights, same float32 argmax: the engines agree token for token, and where they
    # part, it is on a near-tie of the two tokens in HF's own logits (a barely trained
    # model has some), never on a clear choice
    tok = AutoTokenizer.from_pretrained(tiny_base.model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_base.model_dir, dtype=torch.float32)
    for prompt, a, b in zip(prompts, from_vllm, from_hf, strict=True):
        if a == b:
            continue
        j = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
        ids = tok(prompt, add_special_tokens=False)["input_ids"] + b[:j]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        gap = float(logits[b[j]] - logits[a[j]])
        assert 0 <= gap < 1e-3 * float(logits.abs().max()), (prompt, j, gap)
    assert agreement(from_vllm, from_hf, 8) >= 0.5, (from_vllm, from_hf)


def test_shipped_pretraining_config_is_the_default():
    from helpers import REPO

    from loraplex.basemodel.pretrain import PretrainConfig
    from loraplex.config import load_model

    assert (
        load_model(PretrainConfig, REPO / "jobs" / "configs" / "bootstrap.yaml") == PretrainConfig()
    )

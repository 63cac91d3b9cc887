"""Fine-tuning end to end on real components: Ray Train workers running HF Trainer + PEFT
LoRA + DeepSpeed ZeRO-2 on the tiny base model, one MLflow run per job, adapters as
registered model versions with aliases, `--resume` from a folder and from S3, `ray job
submit` against a Ray head started here, adapters trained elsewhere, and bad input. A
worker dying mid-run (its whole node, ZeRO-3, state on S3) is `test_cluster.py`'s."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml
from helpers import free_port, one_line_error

pytestmark = [pytest.mark.slow, pytest.mark.ray_train]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process. Ray forwards its workers' log lines to this process's
    output at any time; those lines (prefixed with the worker) are dropped here."""
    from loraplex.cli.main import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out = capsys.readouterr()

    def own(text: str) -> str:
        lines = text.splitlines(keepends=True)
        return "".join(ln for ln in lines if not ln.lstrip("\x1b[0-9;m").startswith("("))

    return int(exit_.value.code or 0), own(out.out), own(out.err)


def write_config(folder: Path, job: str, **changes) -> Path:
    cfg = {
        "name": job,
        "base_model": "embedded",
        "data": {
            "train": "{home}/worlds/seed-0/datasets/json_answer/train.openai.jsonl",
            "eval": "{home}/worlds/seed-0/datasets/json_answer/test.openai.jsonl",
            "format": "openai",
            "max_length": 384,
        },
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "deepspeed": {"stage": 2},
        "ray": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 2},
        "train": {
            "max_steps": 8,
            "per_device_batch_size": 2,
            "learning_rate": 0.001,
            "logging_steps": 1,
            "eval_steps": 4,
            "save_steps": 4,
        },
        "mlflow": {"registered_model": job},
    }
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    path = folder / f"{job}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def load(path: Path, home: Path):
    from loraplex.config import load_model
    from loraplex.training.config import TrainConfig

    return load_model(TrainConfig, path).resolve_paths(path.parent, home)


def metric_steps(run_id: str, key: str = "loss") -> list[int]:
    return sorted({m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key)})


def test_train_logs_one_run_and_registers_a_version(tiny_base, settings, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraplex.training.job import run_training

    cfg = load(write_config(tmp_path, "json-tiny"), settings.home)
    result = run_training(cfg, settings)
    assert result.version == "1" and result.run_name == "json-tiny"
    # the job's log, as the user sees it: the worker's progress lines, and not Ray Train's
    # once-a-second complaint that a local Ray has no dashboard (State API)
    logged = "".join(capsys.readouterr())
    assert "[train] step 1/8" in logged, logged[-2000:]
    assert "State API may be temporarily unavailable" not in logged

    client = mlflow.MlflowClient()
    runs = client.search_runs(
        [client.get_experiment_by_name(settings.mlflow.experiment).experiment_id],
        "tags.`loraplex.job` = 'json-tiny'",
    )
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == "4" and run.data.params["deepspeed.stage"] == "2"
    assert run.data.tags["loraplex.base_model"].startswith("embedded:")
    assert len(run.data.tags["loraplex.dataset_sha256"]) == 64
    assert metric_steps(run.info.run_id) == list(range(1, 9))
    history = {
        key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        for key in ("loss", "lr", "grad_norm", "eval_loss", "eval_perplexity", "tokens_per_s")
    }
    # every step's loss, lr and gradient norm; evaluation every eval_steps (4) and after the
    # last; perplexity is exp(eval loss) at each of them; throughput measured, positive
    assert sorted(history["lr"]) == sorted(history["grad_norm"]) == list(range(1, 9))
    assert {4, 8} <= set(history["eval_loss"]) and history["eval_loss"].keys() == history[
        "eval_perplexity"
    ].keys()
    for step, loss in history["eval_loss"].items():
        assert history["eval_perplexity"][step] == pytest.approx(math.exp(loss), rel=1e-6)
    assert all(math.isfinite(v) and v > 0 for v in history["loss"].values())
    assert history["tokens_per_s"] and all(v > 0 for v in history["tokens_per_s"].values())
    # warmup (warmup_ratio 0.03 of 8 steps: one step) up to learning_rate 0.001, then the
    # cosine decay: never rising again
    lrs = [history["lr"][k] for k in sorted(history["lr"])]
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(0.001) and peak <= 1
    assert all(a > b for a, b in itertools.pairwise(lrs[peak:])), lrs
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    # the PEFT folder only (its model card included), never base weights
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= artifacts
    assert artifacts <= {
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/README.md",
    }

    mv = client.get_model_version_by_alias("json-tiny", "candidate")
    assert str(mv.version) == "1" and mv.run_id == run.info.run_id
    assert mv.tags["loraplex.lora_rank"] == "4"

    # the registered adapter loads on the base and changes its outputs
    local = mlflow.artifacts.download_artifacts(
        "models:/json-tiny@candidate", dst_path=str(tmp_path / "dl")
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_base.model_dir)
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base.model_dir), local
    )
    import torch

    x = torch.tensor([[1, 2, 3, 4]])
    assert not torch.allclose(base(x).logits, tuned(x).logits)

    # list and promote through the CLI
    code, out, err = cli(capsys, "adapters", "list", "--json")
    assert code == 0, err
    row = next(r for r in json.loads(out) if r["name"] == "json-tiny")
    assert row["aliases"] == ["candidate"] and row["rank"] == "4" and "eval_loss" in row["metrics"]
    code, out, err = cli(capsys, "adapters", "promote", "json-tiny", "1", "--alias", "production")
    line = one_line_error(subprocess.CompletedProcess([], code, "", err))
    assert code == 2 and "without --gate would move @production unmeasured" in line, line
    code, out, err = cli(
        capsys, "adapters", "promote", "json-tiny", "1", "--alias", "production", "--force"
    )
    assert code == 0, err
    assert str(client.get_model_version_by_alias("json-tiny", "production").version) == "1"
    moves = json.loads(
        client.get_registered_model("json-tiny").tags["loraplex.alias_log.production"]
    )
    assert moves[-1]["to"] == "1" and moves[-1]["why"] == "promote --force"
    for args, expected in [
        (("adapters", "promote", "json-tiny", "7", "--force"), "has no version 7"),
        (("adapters", "promote", "nope", "1", "--force"), "no adapter named 'nope'"),
        (("adapters", "promote", "json-tiny", "1", "--alias", "bad alias", "--force"), "alias"),
    ]:
        code, _, err = cli(capsys, *args)
        line = one_line_error(subprocess.CompletedProcess([], code, "", err))
        assert code == 2 and expected in line, line

    # a finished job is never silently overwritten: --resume refuses, a rerun is a new run
    from loraplex.errors import InputError

    with pytest.raises(InputError, match="nothing to resume"):
        run_training(cfg, settings, resume=True)
    again = run_training(cfg, settings)
    assert again.run_name == "json-tiny-2" and again.version == "2"
    assert again.mlflow_run_id != run.info.run_id
    assert str(client.get_model_version_by_alias("json-tiny", "production").version) == "1"
    # the demo makes only a first release: an existing @production waits for a gate
    from loraplex.demo import release_first_version

    assert release_first_version(settings, "json-tiny", "2") == "1"
    assert str(client.get_model_version_by_alias("json-tiny", "production").version) == "1"

    # promote checks the files load on the base; rollback walks the alias's history back
    def production() -> str:
        return str(client.get_model_version_by_alias("json-tiny", "production").version)

    code, out, err = cli(
        capsys, "adapters", "promote", "json-tiny", "2", "--alias", "production", "--force"
    )
    assert code == 0 and "(was version 1)" in out, err
    code, out, err = cli(capsys, "adapters", "rollback", "json-tiny", "--alias", "production")
    assert code == 0 and "version 1 (rolled back from version 2)" in out, err
    assert production() == "1"
    code, _, err = cli(capsys, "adapters", "rollback", "json-tiny", "--alias", "production")
    assert code == 2 and "no earlier version" in err
    # a damaged version is refused and the alias stays where it was
    stored = Path(client.get_model_version("json-tiny", "2").source.removeprefix("file://"))
    weights = next(stored.rglob("adapter_model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:64])
    code, _, err = cli(
        capsys, "adapters", "promote", "json-tiny", "2", "--alias", "production", "--force"
    )
    line = one_line_error(subprocess.CompletedProcess([], code, "", err))
    assert code == 2 and "alias not moved" in line and "safetensors" in line, line
    assert production() == "1"


def test_bad_training_configs_fail_before_ray_starts(
    tiny_base, settings, tmp_path, capsys, s3, monkeypatch
):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)  # an S3 server without the bucket below
    bad_jsonl = tmp_path / "bad.jsonl"
    good = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    bad_jsonl.write_text(
        f"{good}\n{good}\n" + '{"messages": [{"role": "robot", "content": "x"}]}\n'
    )
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    from transformers import AutoConfig

    vit = tmp_path / "vit"
    AutoConfig.for_model("vit").save_pretrained(vit)
    port = free_port()  # nothing listens there
    # preference pairs: good ones, and one bad row each
    pairs = write_pairs(tmp_path / "pairs.jsonl", 4)
    row = {"prompt": "q", "chosen": "a", "rejected": "b"}
    bad_pairs = {
        "same": {**row, "rejected": "a"},
        "blank": {**row, "chosen": " "},
        "long": {**row, "prompt": "word " * 600},
        "half": {"prompt": "q", "chosen": "a"},
    }
    for stem, bad in bad_pairs.items():
        (tmp_path / f"{stem}.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(bad) + "\n")

    def orpo(job: str, stem: str) -> Path:
        data = {"train": str(tmp_path / f"{stem}.jsonl"), "format": "preference"}
        return write_config(tmp_path, job, method="orpo", data={**data, "max_length": 128})

    cases = [
        (
            write_config(tmp_path, "p1", method="dpo", data__format="preference"),
            "method dpo needs preference.start_from",
        ),
        (write_config(tmp_path, "p2", data__format="preference"), "is for method dpo or orpo"),
        (orpo("p3", "same"), "same.jsonl:2: chosen and rejected are the same answer"),
        (orpo("p4", "blank"), "blank.jsonl:2: chosen is empty"),
        (orpo("p5", "long"), "long.jsonl:2: the prompt is"),
        (orpo("p6", "half"), "half.jsonl:2: no 'rejected'"),
        (
            write_config(
                tmp_path,
                "p7",
                method="dpo",
                preference={"start_from": "no-such-adapter/1"},
                data={"train": str(pairs), "format": "preference"},
            ),
            "adapter no-such-adapter/1 is not in the registry",
        ),
        (write_config(tmp_path, "a", lora__rank=3), "lora.rank: unknown config key"),
        (write_config(tmp_path, "a2", lora__r=0), "lora.r"),
        (write_config(tmp_path, "a3", deepspeed__stage=4), "deepspeed.stage"),
        (write_config(tmp_path, "a4", data__format="csv"), "data.format"),
        (
            write_config(tmp_path, "b", data__train="/no/such.jsonl"),
            "/no/such.jsonl does not exist",
        ),
        (
            write_config(tmp_path, "b2", data__train=str(empty), data__eval=[]),
            "empty.jsonl: no records",
        ),
        (
            write_config(tmp_path, "c", deepspeed__offload_params=True),
            "offload_params needs stage 3",
        ),
        (
            write_config(tmp_path, "d", data__train=str(bad_jsonl), data__eval=[]),
            "bad.jsonl:3: messages[0]: 'role'",
        ),
        (
            write_config(tmp_path, "e", data__train=str(no_answer), data__eval=[]),
            "no_answer.jsonl:1",
        ),
        (write_config(tmp_path, "f", base_model=str(tmp_path)), "not a Hugging Face model folder"),
        (write_config(tmp_path, "f2", base_model="/no/model"), "folder /no/model does not exist"),
        (write_config(tmp_path, "f3", base_model=str(vit)), "not a causal LM"),
        (
            write_config(tmp_path, "f4", lora__target_modules=["query_key_value"]),
            "['query_key_value'] do not exist in the base model",
        ),
        (write_config(tmp_path, "g", name="bad name!"), "name: use letters"),
        (write_config(tmp_path, "h", mlflow__registered_model="a/b:c"), "mlflow.registered_model"),
        (tmp_path / "missing.yaml", "does not exist"),
        (
            write_config(tmp_path, "s", ray__storage_path="s3://no-such-bucket/jobs"),
            "ray.storage_path 's3://no-such-bucket/jobs' cannot be written (",
        ),
        (write_config(tmp_path, "s2", ray__storage_path="gs://b/jobs"), "not on gs://"),
    ]
    storage = Path(settings.ray.storage_path)
    before = sorted(p.name for p in storage.iterdir()) if storage.exists() else []
    code, _, err = cli(
        capsys,
        "--home",
        str(settings.home),
        "-s",
        f"mlflow.tracking_uri=http://127.0.0.1:{port}",
        "train",
        str(write_config(tmp_path, "m")),
    )
    line = one_line_error(subprocess.CompletedProcess([], code, "", err))
    assert code == 1 and "does not answer" in line, line
    for path, expected in cases:
        code, _, err = cli(capsys, "--home", str(settings.home), "train", str(path))
        line = one_line_error(subprocess.CompletedProcess([], code, "", err))
        assert code == 2 and expected in line, (path.name, line)
    # nothing started, nothing registered
    after = sorted(p.name for p in storage.iterdir()) if storage.exists() else []
    assert after == before


def test_register_an_adapter_trained_elsewhere(tiny_base, settings, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_base.model_dir)
    good = tmp_path / "good"
    get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).save_pretrained(good)
    code, out, err = cli(capsys, "adapters", "register", str(good), "--name", "imported")
    assert code == 0, err
    assert "registered imported version 1" in out
    assert (
        str(mlflow.MlflowClient().get_model_version_by_alias("imported", "candidate").version)
        == "1"
    )

    # the same adapter shapes for a different (wider) base
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=base.config.vocab_size,
            hidden_size=96,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=3,
        )
    )
    wrong_base = tmp_path / "wrong-base"
    get_peft_model(other, LoraConfig(r=8, target_modules=["q_proj"])).save_pretrained(wrong_base)
    high_rank = tmp_path / "high-rank"
    shutil.copytree(good, high_rank)
    cfg = json.loads((high_rank / "adapter_config.json").read_text())
    (high_rank / "adapter_config.json").write_text(json.dumps({**cfg, "r": 128}))
    bad_target = tmp_path / "bad-target"
    shutil.copytree(good, bad_target)
    (bad_target / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["qkv"]}))
    no_weights = tmp_path / "no-weights"
    shutil.copytree(good, no_weights)
    (no_weights / "adapter_model.safetensors").unlink()
    garbage = tmp_path / "garbage"
    shutil.copytree(good, garbage)
    (garbage / "adapter_model.safetensors").write_bytes(b"not a tensor file")
    cases = [
        (wrong_base, "has shape"),
        (high_rank, "rank 128 is outside 1..64"),
        (bad_target, "target modules ['qkv'] do not exist"),
        (no_weights, "adapter_model.safetensors is missing"),
        (garbage, "cannot be read as safetensors"),
        (tmp_path, "adapter_config.json is missing"),
    ]
    for path, expected in cases:
        code, _, err = cli(capsys, "adapters", "register", str(path), "--name", "imported")
        line = one_line_error(subprocess.CompletedProcess([], code, "", err))
        assert code == 2 and expected in line, (path.name, line)
    # nothing was added by the refused ones
    versions = mlflow.MlflowClient().search_model_versions("name = 'imported'")
    assert [str(v.version) for v in versions] == ["1"]


def write_pairs(path: Path, n: int = 16) -> Path:
    """Preference pairs in the JSON-answer task's shape: the chosen answer cites the right
    value, the rejected one a garbled copy citing another source."""
    rows = []
    for i in range(n):
        prompt = (
            f"Sources:\n[1] The Velmo X{i}00 comes in bronze.\nWhat colour is the Velmo X{i}00?"
        )
        rows.append(
            {
                "prompt": prompt,
                "chosen": json.dumps({"answer": "bronze", "sources": [1]}),
                "rejected": json.dumps({"answer": "bron", "sources": [2]}),
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_max_examples_trains_on_a_seeded_sample(tmp_path) -> None:
    from loraplex.training.config import DataConfig
    from loraplex.training.dataset import dataset_sha256, load_examples

    def conversations(path: Path, tag: str, n: int) -> Path:
        rows = [
            {
                "messages": [
                    {"role": "user", "content": f"{tag} {i}"},
                    {"role": "assistant", "content": "ok"},
                ]
            }
            for i in range(n)
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    files = [
        conversations(tmp_path / "a.jsonl", "a", 60),
        conversations(tmp_path / "b.jsonl", "b", 40),
    ]
    data = DataConfig(train=files, eval_fraction=0, max_examples=12, format="openai")
    train = load_examples(data, seed=3).train
    texts = [c[0]["content"] for c in train]
    assert len(train) == 12 and len(set(texts)) == 12
    assert {t.split()[0] for t in texts} == {"a", "b"}  # drawn from both files
    assert texts != [f"a {i}" for i in range(12)]  # a sample, not the first rows
    assert [c[0]["content"] for c in load_examples(data, seed=3).train] == texts
    assert [c[0]["content"] for c in load_examples(data, seed=4).train] != texts
    everything = DataConfig(train=files, eval_fraction=0, format="openai")
    assert len(load_examples(everything).train) == 100
    # a sampled run is a different dataset for the demo's reuse check
    assert dataset_sha256(data) != dataset_sha256(everything)


def test_registry_lists_every_page_and_undoes_a_version_without_its_alias(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More than 100 registered adapters are all listed and promotable (MLflow pages
    its answers); a version whose alias cannot be set is removed again."""
    from mlflow import MlflowClient

    from loraplex.errors import LoraplexError
    from loraplex.models.adapters import list_adapters, log_and_register, promote

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.create_run(client.create_experiment("x")).info.run_id
    for i in range(103):
        name = f"team's-adapter-{i:03d}" if i == 102 else f"adapter-{i:03d}"
        client.create_registered_model(name)
        client.create_model_version(
            name, f"runs:/{run}/a", run_id=run, tags={"loraplex.base_model": "tiny"}
        )
    names = {a.name for a in list_adapters(client)}
    assert len(names) == 103 and "team's-adapter-102" in names
    assert promote(client, "adapter-101", "1", "production") is None
    assert promote(client, "team's-adapter-102", "1", "production") is None

    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"x")

    def registry_down(*_: object, **__: object) -> None:
        raise ConnectionError("registry went away")

    monkeypatch.setattr(client, "set_registered_model_alias", registry_down)
    with pytest.raises(LoraplexError, match="version 2 was removed again"):
        log_and_register(client, run, folder, "adapter-000", "candidate", "tiny", 4)
    assert [str(v.version) for v in client.search_model_versions("name = 'adapter-000'")] == ["1"]


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_resume_after_a_failure_past_fit_registers_without_training_again(
    tiny_base, settings, tmp_path, monkeypatch: pytest.MonkeyPatch, request, where: str
) -> None:
    """The registry fails after training finished: the run fails with a reason that
    says --resume registers the adapter; --resume does exactly that (fit() is not called
    again); a changed config is refused for --resume; a second train of a job that is
    running is refused with the holder named. Once with the job's storage in a local
    folder, once on an S3-compatible server (job state, checkpoints and the kept adapter
    all there: nothing under the home's ray_results)."""
    from ray.train.torch import TorchTrainer

    from loraplex.errors import InputError, LoraplexError
    from loraplex.training import job
    from loraplex.training.jobstore import JobStore

    name = f"resume-{where}"
    storage = settings.ray.storage_path
    if where == "s3":
        monkeypatch.setenv("AWS_ENDPOINT_URL", request.getfixturevalue("s3"))
        storage = f"s3://loraplex/{tmp_path.name}"
    cfg = load(
        write_config(
            tmp_path, name, train__max_steps=2, ray__num_workers=1, ray__storage_path=storage
        ),
        settings.home,
    )

    def registry_down(*_: object, **__: object) -> str:
        raise ConnectionError("the MLflow server went away")

    with monkeypatch.context() as m:
        m.setattr(job, "log_and_register", registry_down)
        with pytest.raises(LoraplexError, match="--resume to register its finished adapter"):
            job.run_training(cfg, settings)
    store = JobStore(storage)
    runs = json.loads(store.read_text(f"{name}/job.json") or "{}")["runs"]
    assert [(r["status"], r["trained"]) for r in runs] == [("FAILED", True)]
    kept = set(store.files(f"{name}/{name}/final-adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= kept, kept
    assert store.files(f"{name}/{name}/workers", ".pid") == ["rank-0.pid"]
    if where == "s3":  # Ray Train's checkpoints are there too, and nothing is local
        assert any("checkpoint_" in p for p in _s3_keys(f"{tmp_path.name}/{name}/{name}/"))
        assert not (Path(settings.ray.storage_path) / name).exists()

    changed = load(
        write_config(
            tmp_path, name, train__max_steps=3, ray__num_workers=1, ray__storage_path=storage
        ),
        settings.home,
    )
    with pytest.raises(InputError, match="the config changed since it started"):
        job.run_training(changed, settings, resume=True)

    def no_training(*_: object, **__: object) -> None:
        raise AssertionError("fit() ran again")

    monkeypatch.setattr(TorchTrainer, "fit", no_training)
    result = job.run_training(cfg, settings, resume=True)
    assert result.resumed and result.version == "1"
    assert result.adapter_location == store.location(f"{name}/{name}/final-adapter")
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(name, "candidate").version) == "1"
    runs = json.loads(store.read_text(f"{name}/job.json") or "{}")["runs"]
    assert [(r["status"], r.get("version")) for r in runs] == [("FINISHED", "1")]

    held = pytest.raises(InputError, match=r"already running \(pid \d+ on ")
    with store.lock(name), held:
        job.run_training(cfg, settings)
    if where == "s3":  # released: the lock object is gone
        assert f"{tmp_path.name}/{name}/job.lock" not in _s3_keys(f"{tmp_path.name}/{name}/")


def _s3_keys(prefix: str) -> list[str]:
    import boto3

    pages = (
        boto3.client("s3")
        .get_paginator("list_objects_v2")
        .paginate(Bucket="loraplex", Prefix=prefix)
    )
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_eval_fraction_splits_off_a_seeded_disjoint_share(tmp_path) -> None:
    from loraplex.training.config import DataConfig
    from loraplex.training.dataset import load_examples

    path = tmp_path / "rows.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"q{i}"},
                        {"role": "assistant", "content": f"a{i}"},
                    ]
                }
            )
            + "\n"
            for i in range(40)
        )
    )

    def users(rows) -> list[str]:
        return [c[0]["content"] for c in rows]

    split = load_examples(DataConfig(train=[path], eval_fraction=0.1), seed=1)
    train, evals = users(split.train), users(split.eval)
    assert len(evals) == 4 and len(train) == 36
    assert sorted(train + evals) == sorted(f"q{i}" for i in range(40))  # disjoint, whole
    assert evals != ["q0", "q1", "q2", "q3"]  # drawn, not the first rows
    assert users(load_examples(DataConfig(train=[path], eval_fraction=0.1), seed=1).eval) == evals
    assert users(load_examples(DataConfig(train=[path], eval_fraction=0.1), seed=2).eval) != evals
    assert split.fingerprint["train_rows"] == 36 and split.fingerprint["eval_rows"] == 4
    none = load_examples(DataConfig(train=[path], eval_fraction=0), seed=1)
    assert len(none.train) == 40 and none.eval == []
    # an eval file given: the fraction is not taken from train
    own = load_examples(DataConfig(train=[path], eval=[path], eval_fraction=0.5), seed=1)
    assert len(own.train) == 40 and len(own.eval) == 40


def test_loss_is_on_assistant_tokens_only_with_or_without_generation_markers() -> None:
    import copy

    from loraplex.basemodel.tokenizer import train_tokenizer
    from loraplex.training.dataset import IGNORE, tokenize

    marked = train_tokenizer(["The price of the Velmo X200 is 349 dollars. Why?"] * 40, 400)
    plain = copy.deepcopy(marked)
    plain.chat_template = marked.chat_template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""
    )
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Price of the Velmo X200?"},
        {"role": "assistant", "content": "349 dollars"},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "The price is 349."},
    ]
    rows = {}
    for name, tok in (("markers", marked), ("prefixes", plain)):
        (row,), truncated = tokenize(tok, [conversation], max_length=512)
        assert truncated == 0
        whole = tok.apply_chat_template(conversation, tokenize=True, return_dict=True)
        assert row["input_ids"] == list(whole["input_ids"])
        # the labelled tokens are exactly each assistant turn and its end token, in order;
        # the system, user and role-header tokens carry no loss
        spans, current = [], []
        for token, label in zip(row["input_ids"], row["labels"], strict=True):
            if label == IGNORE:
                if current:
                    spans.append(tok.decode(current))
                current = []
            else:
                assert label == token
                current.append(token)
        spans += [tok.decode(current)] if current else []
        assert spans == ["349 dollars<|end|>", "The price is 349.<|end|>"], (name, spans)
        rows[name] = row
    assert rows["markers"] == rows["prefixes"]
    # truncation keeps what fits; an example with nothing left to learn from is dropped
    first_label = next(i for i, x in enumerate(rows["markers"]["labels"]) if x != IGNORE)
    (cut,), truncated = tokenize(marked, [conversation], max_length=first_label + 2)
    assert truncated == 1 and cut["labels"] == rows["markers"]["labels"][: first_label + 2]
    dropped, truncated = tokenize(marked, [conversation], max_length=first_label)
    assert dropped == [] and truncated == 1


@pytest.mark.parametrize(
    ("settings_", "zero"),
    [
        ({"stage": 0}, {"stage": 0}),
        ({"stage": 1}, {"stage": 1}),
        ({"stage": 2, "offload_optimizer": True}, {"stage": 2, "offload_optimizer": "cpu"}),
        (
            {"stage": 3, "offload_optimizer": True, "offload_params": True},
            {"stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu"},
        ),
    ],
)
def test_deepspeed_stage_and_offload_reach_the_trainer_config(settings_, zero) -> None:
    from loraplex.training.config import DeepSpeedConfig

    ds = DeepSpeedConfig(**settings_).as_dict()
    got = ds["zero_optimization"]
    assert got["stage"] == zero["stage"]
    for key in ("offload_optimizer", "offload_param"):
        assert got.get(key, {}).get("device") == zero.get(key), key
    # HF fills the batch sizes from TrainingArguments, so they stay "auto"
    assert ds["train_micro_batch_size_per_gpu"] == "auto"


def test_preference_pairs_need_the_base_models_chat_template(tiny_base, tmp_path) -> None:
    from transformers import AutoTokenizer

    from loraplex.errors import InputError
    from loraplex.training.pairs import check_lengths, read_pairs

    rows = read_pairs(write_pairs(tmp_path / "pairs.jsonl", 2))
    assert rows[0]["prompt"][0]["role"] == "user" and rows[0]["chosen"][0]["role"] == "assistant"
    tokenizer = AutoTokenizer.from_pretrained(tiny_base.model_dir)
    check_lengths(tokenizer, rows, 256)  # fits
    tokenizer.chat_template = None
    with pytest.raises(InputError, match="no chat template"):
        check_lengths(tokenizer, rows, 256)

"""End-to-end runs of `train.run` on a tiny random Llama: resume, NaN stop, checkpoints,
multi-process equivalence, shipped configs, CLI errors."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import train
from train.config import load_config
from train.data import Batches, ByteTokenizer, prepare
from train.loop import NonFiniteLossError
from train.model import Llama, ModelConfig
from train.optimizer import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model": {"path": None, "hf_config": {
        "model_type": "llama", "vocab_size": 320, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}},
    "data": {"tokenizer": "bytes", "train_size": 64, "eval_size": 8, "max_length": 64},
    "optimizer": {"lr": 3e-3, "warmup_steps": 1},
    "train": {"steps": 6, "batch_size": 8, "micro_batch_size": 4, "tqdm": False},
    "eval": {"accuracy": False, "before": False},
    "mesh": {"data": 4, "fsdp": 1, "tensor": 2},
}


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def test_exact_resume_after_interruption(tmp_path):
    out = tmp_path / "run"
    config = {**TINY, "train": {**TINY["train"], "output_dir": str(out)},
              "checkpoint": {"every": 3, "keep": 5, "export": True},
              "eval": {"accuracy": True, "size": 4, "max_new_tokens": 4, "before": False}}
    summary = train.run(config)
    straight = _losses(out)
    assert sorted(straight) == [1, 2, 3, 4, 5, 6] and "accuracy" in summary["after"]
    assert (out / "config.yaml").is_file() and (out / "eval_after.jsonl").is_file()
    assert (Path(summary["export_dir"]) / "config.json").is_file()
    # Interrupt after step 3: drop the final checkpoint and the log of steps 4-6.
    shutil.rmtree(out / "checkpoints" / "6")
    log = (out / "train_log.jsonl").read_text().splitlines()[:3]
    (out / "train_log.jsonl").write_text("\n".join(log) + "\n")
    resumed = train.run(config, ["train.resume=true", "checkpoint.export=false"])
    again = _losses(out)
    assert [again[s] for s in (4, 5, 6)] == [straight[s] for s in (4, 5, 6)]  # bit-identical
    assert resumed["after"]["eval_loss"] == summary["after"]["eval_loss"]


def test_interrupted_save_is_never_restored(tmp_path):
    out = tmp_path / "run"
    train.run({**TINY, "train": {**TINY["train"], "steps": 2, "output_dir": str(out)}})
    # What Orbax leaves behind when a save dies before its atomic rename.
    partial = out / "checkpoints" / "9.orbax-checkpoint-tmp-1234567890"
    partial.mkdir()
    (partial / "junk").write_text("half written")
    import orbax.checkpoint as ocp
    assert ocp.CheckpointManager((out / "checkpoints").absolute()).latest_step() == 2


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    config = {**TINY, "optimizer": {"lr": 1e30, "warmup_steps": 0, "clip_norm": 0.0, "method": "sft"},
              "train": {**TINY["train"], "output_dir": str(out)}, "checkpoint": {"every": 1}}
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at step (\d).*last good checkpoint"):
        train.run(config)
    bad_step = max(_losses(out))
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < bad_step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_processes(config: dict, config_path: Path, *overrides: str) -> list:
    """Starts `train.run` in 2 processes x 4 CPU devices (gloo on localhost)."""
    config_path.write_text(json.dumps(config))
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           # Later processes reuse what earlier ones compiled: the test is mostly compilation.
           "JAX_COMPILATION_CACHE_DIR": str(config_path.parent / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    code = ("import json, sys, train; "
            "print('SUMMARY', json.dumps(train.run(json.load(open(sys.argv[1])), sys.argv[2:])))")
    return [subprocess.Popen(
        [sys.executable, "-c", code, str(config_path), *overrides, "mesh.distributed=true",
         f"mesh.coordinator_address=127.0.0.1:{port}", "mesh.num_processes=2", f"mesh.process_id={i}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _summaries(procs: list) -> list[dict]:
    """Each process's returned summary, once all have finished."""
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    return [json.loads(out.split("SUMMARY ", 1)[1].splitlines()[0]) for out in outputs]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * max(abs(a), abs(b), 1e-12)


def test_two_processes_match_one(tmp_path):
    """Eval (loss and accuracy), checkpoints, export and resume on 2 processes x 4 devices
    give what 1 process x 8 devices gives running straight through."""
    config = {**TINY, "optimizer": {**TINY["optimizer"], "schedule": "constant"},
              "eval": {"accuracy": True, "size": 4, "max_new_tokens": 4, "generate_batch_size": 4},
              "checkpoint": {"every": 2, "export": True}}
    multi = tmp_path / "multi"
    config_path = tmp_path / "multi.json"
    procs = _launch_two_processes(
        {**config, "train": {**TINY["train"], "steps": 4, "output_dir": str(multi)}}, config_path)
    # The reference run, while the 2 processes start.
    single = train.run({**config, "train": {**TINY["train"], "output_dir": str(tmp_path / "single")}})
    first = _summaries(procs)
    resumed = _summaries(_launch_two_processes(json.loads(config_path.read_text()), config_path,
                                               "train.steps=6", "train.resume=true"))
    assert first[0] == first[1] and resumed[0] == resumed[1]  # every process returns the same
    for tag, one, two in (("before", single, first[0]), ("after", single, resumed[0])):
        assert _close(one[tag]["eval_loss"], two[tag]["eval_loss"]), (tag, one[tag], two[tag])
        assert one[tag]["accuracy"] == two[tag]["accuracy"], tag
    losses_one, losses_two = _losses(tmp_path / "single"), _losses(multi)
    assert losses_one.keys() == losses_two.keys() == set(range(1, 7))
    assert all(_close(losses_one[s], losses_two[s]) for s in losses_one), (losses_one, losses_two)
    assert sorted(p.name for p in (multi / "checkpoints").iterdir()) == ["4", "6"]
    assert (multi / "eval_before.jsonl").is_file() and (multi / "eval_after.jsonl").is_file()
    one, two = (load_file(str(out / "hf" / "model.safetensors")) for out in (tmp_path / "single", multi))
    assert one.keys() == two.keys()
    for name in one:
        assert np.max(np.abs(one[name] - two[name])) <= 1e-5 * np.max(np.abs(one[name])), name


def test_logged_tokens_cover_every_step(tmp_path):
    out = tmp_path / "run"
    train.run({**TINY, "train": {**TINY["train"], "log_every": 4, "output_dir": str(out),
                                 "peak_flops_per_device": 1e12}})
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 6]
    config = load_config(TINY)
    rows = prepare(config.data, ByteTokenizer())[0]
    batches = Batches(rows, config.train.batch_size, config.train.micro_batch_size, config.data.shuffle_seed)
    trained = sum(int((rows["segment_ids"][batches.row_ids(s)] > 0).sum()) for s in range(6))
    assert sum(r["tokens"] for r in records) == trained
    for r in records:
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / (r["step_time_s"] * (4 if r["step"] == 4 else 2)))
        assert 0 < r["mfu"] < 1


def test_accuracy_survives_ids_the_tokenizer_cannot_decode(monkeypatch):
    import train.generate
    from train.evaluate import answer_accuracy
    tokenizer = ByteTokenizer()
    answer = tokenizer.encode("7")
    monkeypatch.setattr(train.generate, "generate", lambda *a, **k: [[300, 258] + answer])
    items = [{"prompt_ids": [5], "reference": "7", "entry": None}]
    assert answer_accuracy(None, tokenizer, items, max_new_tokens=4, batch_size=1) == 1.0


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_resolve_and_build(path):
    config = load_config(path)
    tx, _ = build_optimizer(config.optimizer, total_steps=1000)
    if config.model.hf_config is not None:
        model_config = ModelConfig.from_hf(config.model.hf_config)
    else:  # the default: read the architecture from the GGUF's metadata only
        import gguf
        from train.pretrained import default_gguf_path, gguf_config
        path = default_gguf_path()
        model_config = gguf_config(gguf.GGUFReader(path), path)
    abstract = nnx.eval_shape(lambda: Llama(model_config, rngs=nnx.Rngs(0), remat=config.model.remat))
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    opt_state = jax.eval_shape(tx.init, params)
    assert jax.tree.leaves(opt_state)


def test_cli_rejects_a_bad_key_before_any_work():
    result = subprocess.run([sys.executable, "-m", "train", "--config", "configs/default.yaml",
                             "optimizer.mask_ration=0.3"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "did you mean 'optimizer.mask_ratio'" in result.stderr

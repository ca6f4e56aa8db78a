"""What rank 0 reports: one TensorBoard run and one W&B run for 2 ranks, read back; secrets appear nowhere."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_driver

pytestmark = pytest.mark.dist
SECRETS = {"WANDB_API_KEY": "wandb-key-7f3a9c1e", "HF_TOKEN": "hf_plantedtoken12345", "ACME_SECRET": "acme-4417-zz"}


def wandb_records(path):
    """The records of a W&B offline run file (LevelDB log framing: 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf + chunk if kind == 4 else chunk)
            yield record
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk


@pytest.fixture(scope="module")
def observed(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("observed")
    run_yaml = out.parent / "observed.yaml"  # a secret in a config value must not leak either
    run_yaml.write_text(f"checkpoint:\n  save_trigger: /nonexistent/{SECRETS['ACME_SECRET']}/trigger\n")
    args = ["--config", str(run_yaml), "--ds_config", "ds_configs/zero2.json", "--set", "model.n_layer=2",
            "--set", "data.block_size=64", "--set", "train.micro_batch_size=4", "--set", "train.max_steps=12",
            "--set", "train.warmup_steps=2", "--set", "train.eval_interval=6", "--set", "train.eval_max_batches=2",
            "--set", "logging.log_interval=3", "--set", "logging.wandb=true", "--set", "logging.peak_tflops=0.5",
            "--set", "checkpoint.interval=5", "--set", "checkpoint.async=true", "--set", f"train.output_dir={out}",
            "--set", f"data.cache_dir={data_cache}"]
    proc = run_driver(args, ranks=2, env={**SECRETS, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_tensorboard_read_back_matches_metrics_and_summary(observed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = observed
    event_files = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(event_files) == 1  # one stream, from rank 0 only
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/ms_per_step", "perf/mfu",
                "perf/straggler_lag", "mem/max_allocated_bytes", "mem/host_rss_bytes", "data/real_token_fraction",
                "data/wait_fraction", "eval/loss", "eval/perplexity"):
        assert tag in tags, tag
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [e.step for e in acc.Scalars("train/loss")] == [r["step"] for r in train] == [1, 3, 6, 9, 12]
    for event, record in zip(acc.Scalars("train/loss"), train, strict=True):
        assert event.value == pytest.approx(record["train/loss"], rel=1e-6)
        # Packed blocks: every rank trains on as many tokens, so the global loss is the ranks' mean.
        assert len(record["train/rank_losses"]) == 2
        assert record["train/loss"] == pytest.approx(sum(record["train/rank_losses"]) / 2, rel=1e-12)
        assert record["train/rank_losses"][0] != record["train/rank_losses"][1]
    summary = json.loads((out / "summary.json").read_text())
    assert acc.Scalars("eval/loss")[-1].value == pytest.approx(summary["final_eval_loss"], rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/loss")] == [6, 12]
    assert summary["mfu"] is not None and 0 < summary["mfu"] and summary["peak_memory_bytes"] > 0
    assert "config/run" in "".join(acc.Tags()["tensors"])  # the run and DS configs as text

    # Background saves at steps 5 and 10, and the last one at 12: each reported at its own step.
    saves = [r for r in records if "ckpt/save_s" in r]
    assert [r["step"] for r in saves] == [e.step for e in acc.Scalars("ckpt/bytes")] == [5, 10, 12]
    for tag in ("ckpt/save_s", "ckpt/wait_s", "ckpt/bytes", "ckpt/write_gbs"):
        for event, record in zip(acc.Scalars(tag), saves, strict=True):
            assert event.value == pytest.approx(record[tag], rel=1e-6), tag
    complete = json.loads((out / "checkpoints" / "global_step12" / "COMPLETE").read_text())
    assert saves[-1]["ckpt/bytes"] == sum(complete["files"].values())
    assert all(r["ckpt/write_gbs"] > 0 and 0 < r["ckpt/save_s"] for r in saves)
    assert summary["checkpoints_saved"] == 3 and summary["checkpoint_async"] is True
    assert summary["checkpoint_stall_s"] == pytest.approx(sum(r["ckpt/save_s"] for r in saves), rel=1e-9)
    assert summary["checkpoint_host_bytes"] > 0


def test_one_wandb_offline_run_with_the_history(observed):
    out, _ = observed
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (wandb_file,) = runs[0].glob("run-*.wandb")
    history = []
    for record in wandb_records(wandb_file):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history.append((record.history.step.num, items))
    train_steps = [step for step, items in history if "train/loss" in items]
    assert train_steps == [1, 3, 6, 9, 12]
    metrics = {json.loads(x)["step"]: json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
               if "train/loss" in x}
    for step, items in history:
        if "train/loss" in items:
            assert items["train/loss"] == pytest.approx(metrics[step]["train/loss"], rel=1e-9)
    # A background save's figures arrive after later steps were logged: W&B keeps them, at a later step.
    assert len([step for step, items in history if "ckpt/save_s" in items]) == 3


def test_secrets_appear_nowhere(observed):
    out, proc = observed
    texts = [proc.stdout, proc.stderr]
    for path in out.rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes().decode("utf-8", errors="replace"))
    for name, secret in SECRETS.items():
        assert not any(secret in t for t in texts), name
    config_yaml = (out / "config.yaml").read_text()
    assert "/nonexistent/***/trigger" in config_yaml  # masked, not dropped


def test_straggler_warnings_follow_the_logged_lags_from_rank_0_once(observed):
    from llm_ds.monitor.metrics import StragglerWatch

    out, proc = observed
    train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    watch = StragglerWatch(threshold=0.2, points=3)
    expected = [watch.update(r["perf/slowest_rank"], r["perf/straggler_lag"]) for r in train]
    warned = [line for line in proc.stdout.splitlines() if "has been the slowest" in line]
    assert len(warned) == len([rank for rank in expected if rank is not None])
    assert not any(line.startswith("[rank") for line in warned)  # rank 0 alone says it


def test_tensorboard_has_the_hyperparameters_with_eval_loss_as_the_metric(observed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out, _ = observed
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    data = {tag: plugin_data_pb2.HParamsPluginData.FromString(raw)
            for tag, raw in acc.PluginTagToContent("hparams").items()}  # fmt: skip
    experiment = next(d.experiment for d in data.values() if d.WhichOneof("data") == "experiment")
    assert [m.name.tag for m in experiment.metric_infos] == ["eval/loss"]
    start = next(d.session_start_info for d in data.values() if d.WhichOneof("data") == "session_start_info")
    assert start.hparams["train.micro_batch_size"].number_value == 4
    assert start.hparams["data.block_size"].number_value == 64
    assert start.hparams["deepspeed.zero_optimization.stage"].number_value == 2
    assert SECRETS["ACME_SECRET"] not in start.hparams["checkpoint.save_trigger"].string_value  # redacted
    # The metric is the eval/loss scalar of the same run: its last value is the final evaluation.
    summary = json.loads((out / "summary.json").read_text())
    assert acc.Scalars("eval/loss")[-1].value == pytest.approx(summary["final_eval_loss"], rel=1e-6)

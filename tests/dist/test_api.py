"""The Python API in this pytest process, as a notebook uses it: ``RunConfig.from_dict``, ``Trainer(...).fit()``,
a user's model and datasets, a ``compute_loss`` override, callbacks, two runs one after the other."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from llm_ds import RunConfig, Trainer, TrainerCallback

pytestmark = pytest.mark.dist

TINY = {
    "model": {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 64},
    "data": {"block_size": 32},
    "train": {"micro_batch_size": 4, "max_steps": 20, "warmup_steps": 2, "eval_interval": 0, "eval_max_batches": 4},
    "logging": {"log_interval": 5, "tensorboard": False},
    "checkpoint": {"interval": 0},
}
ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module", autouse=True)
def one_process_group():
    """The Trainer joins a group of one as in a notebook; afterwards this process is as it was, so the
    subprocess tests that follow do not inherit a rank."""
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    yield
    from llm_ds.distributed import teardown

    teardown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def tiny_cfg(tmp_path, data_cache, **train) -> RunConfig:
    overrides = [f"train.output_dir={tmp_path}", f"data.cache_dir={data_cache}"]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return RunConfig.from_dict(TINY, overrides=overrides)


def test_fit_returns_the_summary_and_leaves_the_process_group_for_a_second_run(tmp_path, data_cache):
    first = Trainer(tiny_cfg(tmp_path / "a", data_cache)).fit()
    on_disk = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert first == on_disk
    assert first["steps"] == 20 and first["world_size"] == 1
    assert first["final_eval_loss"] < first["first_train_loss"] - 0.5
    assert torch.distributed.is_initialized()

    second = Trainer(tiny_cfg(tmp_path / "b", data_cache, seed=7), ds_config="ds_configs/zero2.json").fit()
    assert second["steps"] == 20 and second["zero_stage"] == 2
    assert second["first_train_loss"] != first["first_train_loss"]  # another seed: other weights and batches


class RepeatingSequences(torch.utils.data.Dataset):
    """Each sample counts up from its own start modulo ``vocab``: the next token is always predictable."""

    def __init__(self, n: int, length: int, vocab: int, offset: int = 0):
        self.n, self.length, self.vocab, self.offset = n, length, vocab, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": (torch.arange(self.length) + i + self.offset) % self.vocab}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def test_a_user_model_and_user_datasets_train(tmp_path, data_cache):
    datasets = pytest.importorskip("datasets")
    cfg = tiny_cfg(tmp_path, data_cache, max_steps=40, lr=0.01, eval_interval=20)
    evaluation = RepeatingSequences(16, 32, 64, offset=1000)
    eval_hf = datasets.Dataset.from_dict({"input_ids": [evaluation[i]["input_ids"].tolist() for i in range(16)],
                                          "text": ["unused"] * 16})
    trainer = Trainer(cfg, model=tiny_llama, train_dataset=RepeatingSequences(256, 32, 64), eval_dataset=eval_hf)
    assert trainer.tokenizer is None  # neither data nor vocabulary came from the config
    summary = trainer.fit()
    assert summary["parameters"] == sum(p.numel() for p in tiny_llama().parameters())
    assert summary["final_train_loss"] < summary["first_train_loss"] / 2
    assert summary["final_eval_loss"] < math.log(64) / 2  # a uniform guess scores log(64)
    checkpoint = tmp_path / "checkpoints" / "global_step40"
    assert (checkpoint / "COMPLETE").is_file() and (checkpoint / "llm_ds" / "hf_config" / "config.json").is_file()


def test_under_zero3_a_model_function_is_built_partitioned(tmp_path, data_cache):
    built = []

    def build():
        model = tiny_llama()
        built.append(all(hasattr(p, "ds_id") for p in model.parameters()))  # made inside zero.Init
        return model

    cfg = tiny_cfg(tmp_path, data_cache, max_steps=20, lr=0.01)
    trainer = Trainer(cfg, ds_config="ds_configs/zero3.json", model=build, train_dataset=RepeatingSequences(64, 32, 64))
    summary = trainer.fit()
    assert built == [True] and summary["zero_stage"] == 3
    assert summary["parameters"] == sum(p.numel() for p in tiny_llama().parameters())
    assert summary["final_train_loss"] < summary["first_train_loss"] - 0.5


def test_without_eval_dataset_nothing_is_evaluated(tmp_path, data_cache):
    trainer = Trainer(tiny_cfg(tmp_path, data_cache, max_steps=3), model=tiny_llama(),
                      train_dataset=RepeatingSequences(64, 32, 64))
    assert trainer.fit()["final_eval_loss"] is None
    with pytest.raises(Exception, match="no evaluation data"):
        trainer.evaluate()


def readme_label_smoothing() -> type[Trainer]:
    """The README's ``compute_loss`` override, as written there (label smoothing 0.1)."""
    from tests.dist.test_api_runner import readme_block

    namespace: dict = {}
    exec(readme_block("class LabelSmoothingTrainer(Trainer)"), namespace)
    return namespace["LabelSmoothingTrainer"]


def cross_entropy_and_uniform(engine, batches) -> tuple[float, float]:
    """The mean cross-entropy of the next tokens, and the mean of -log p over the whole vocabulary."""
    sums = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for batch in batches:
            logp = engine(input_ids=batch["input_ids"]).logits[:, :-1].float().log_softmax(-1)
            targets = batch["labels"][:, 1:]
            sums[0] += -logp.gather(-1, targets.unsqueeze(-1)).sum()
            sums[1] += -logp.mean(-1).sum()
            sums[2] += targets.numel()
    return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()


def test_a_compute_loss_override_changes_training_and_evaluation_by_the_expected_amount(tmp_path, data_cache):
    data = {"train_dataset": RepeatingSequences(64, 32, 64), "eval_dataset": RepeatingSequences(8, 32, 64, 500)}
    plain = Trainer(tiny_cfg(tmp_path / "plain", data_cache, max_steps=30, lr=0.01), model=tiny_llama, **data)
    plain.fit()  # a model that has learned something: smoothing then costs a clear amount
    smoothing = readme_label_smoothing()
    smooth = smoothing(tiny_cfg(tmp_path / "smooth", data_cache, max_steps=1), model=plain.engine.module, **data)
    ce, uniform = cross_entropy_and_uniform(smooth.engine, smooth.eval_loader)
    assert uniform - ce > 1.0
    eps = 0.1  # the README's
    assert plain.evaluate() == pytest.approx(ce, rel=1e-5)
    assert smooth.evaluate() == pytest.approx((1 - eps) * ce + eps * uniform, rel=1e-5)

    # Training uses it too: step 1's loss is the smoothed loss of the first batch.
    first_batch = next(iter(smooth.train_loader))
    smooth.train_loader.load_state_dict({"epoch": 0, "consumed": 0})
    ce, uniform = cross_entropy_and_uniform(smooth.engine, [first_batch])
    logged = []

    class Keep(TrainerCallback):
        def on_log(self, trainer, record):
            logged.append(record)

    smooth.callbacks.append(Keep())
    smooth.fit()
    assert logged[0]["step"] == 1
    assert logged[0]["train/loss"] == pytest.approx((1 - eps) * ce + eps * uniform, rel=1e-5)


class Recorder(TrainerCallback):
    def __init__(self):
        self.calls = []
        self.handlers = []

    def on_step_end(self, trainer, step):
        self.calls.append(("step_end", step))
        self.handlers.append(signal.getsignal(signal.SIGINT))

    def on_log(self, trainer, record):
        self.calls.append(("log", record["step"], "eval/loss" in record))

    def on_evaluate(self, trainer, eval_loss):
        self.calls.append(("evaluate", trainer.state.step, eval_loss))

    def on_save(self, trainer, checkpoint_dir):
        self.calls.append(("save", checkpoint_dir.name, (checkpoint_dir / "COMPLETE").is_file()))


def test_callbacks_fire_in_order_with_their_arguments_and_signals_stay_the_users(tmp_path, data_cache):
    users = signal.getsignal(signal.SIGINT)  # default_int_handler; ignored where started in the background
    cfg = tiny_cfg(tmp_path, data_cache, max_steps=4, eval_interval=2)
    cfg.logging.log_interval = 2
    cfg.checkpoint.interval = 2
    recorder = Recorder()
    summary = Trainer(cfg, callbacks=[recorder]).fit()
    evals = [c[2] for c in recorder.calls if c[0] == "evaluate"]
    assert recorder.calls == [
        ("step_end", 1), ("log", 1, False),
        ("step_end", 2), ("log", 2, False), ("log", 2, True), ("evaluate", 2, evals[0]), ("save", "global_step2", True),
        ("step_end", 3),
        ("step_end", 4), ("log", 4, False), ("log", 4, True), ("evaluate", 4, evals[1]), ("save", "global_step4", True),
    ]
    assert evals[1] == summary["final_eval_loss"]
    assert set(recorder.handlers) == {users}  # handle_signals=False: SIGINT stays the user's

    recorder = Recorder()
    Trainer(tiny_cfg(tmp_path / "driver", data_cache, max_steps=1), callbacks=[recorder], handle_signals=True).fit()
    assert recorder.handlers[0] not in (users, signal.default_int_handler)  # the driver's way: save and stop
    assert signal.getsignal(signal.SIGINT) is users  # and given back after fit


class Boom(TrainerCallback):
    def on_step_end(self, trainer, step):
        if step == 3:
            raise RuntimeError("the user's callback failed")


def test_a_callback_that_raises_stops_the_run_with_its_error_after_a_save(tmp_path, data_cache):
    trainer = Trainer(tiny_cfg(tmp_path, data_cache, max_steps=20), callbacks=[Boom()])
    with pytest.raises(RuntimeError, match="the user's callback failed"):
        trainer.fit()
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("global_step*"))
    assert saved == ["global_step5"]  # stopped at the step all ranks agreed on: 3 plus the margin of 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["stopped_by"] == "RuntimeError in Boom.on_step_end"


class BoomNearTheEnd(TrainerCallback):
    def on_step_end(self, trainer, step):
        if step == 19:
            raise ValueError("late")


def test_an_error_too_close_to_the_end_to_stop_early_still_saves_the_last_step(tmp_path, data_cache):
    cfg = tiny_cfg(tmp_path, data_cache, max_steps=20)
    cfg.checkpoint.save_final = False
    trainer = Trainer(cfg, callbacks=[BoomNearTheEnd()])
    with pytest.raises(ValueError, match="late"):
        trainer.fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("global_step*")) == ["global_step20"]
    assert json.loads((tmp_path / "summary.json").read_text())["stopped_by"] == "ValueError in BoomNearTheEnd.on_step_end"
    with pytest.raises(RuntimeError, match="runs once per Trainer"):
        trainer.fit()
    with pytest.raises(ValueError, match="late"):  # outside fit() a callback's error reaches the caller
        trainer.state.step = 19
        trainer._callback("on_step_end", 19)


def test_user_data_of_another_length_than_the_block_is_refused_naming_the_fix(tmp_path, data_cache):
    from llm_ds.data.sources import DataError

    with pytest.raises(DataError, match=r"train_dataset\[0\] has 16 tokens and data.block_size is 32: set "
                                        r"data.block_size=16"):
        Trainer(tiny_cfg(tmp_path, data_cache), model=tiny_llama(), train_dataset=RepeatingSequences(64, 16, 64))

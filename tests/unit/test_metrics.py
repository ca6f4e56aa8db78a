import pytest

from llm_ds.hardware import peak_tflops
from llm_ds.monitor.metrics import (
    REDACTED,
    StragglerWatch,
    mfu,
    redact,
    secret_values,
    straggler,
    training_flops_per_token,
)
from llm_ds.monitor.sinks import format_console_line


def test_mfu_of_the_124m_recipe_by_hand():
    n_params, n_layer, d, t = 124_439_808, 12, 768, 1024
    position_params = 1024 * 768
    flops = training_flops_per_token(n_params, position_params, n_layer, d, t)
    # 6 * (124,439,808 - 786,432) + 12 * 12 * 768 * 1024
    assert flops == 6 * 123_653_376 + 113_246_208 == 855_166_464
    # 400,000 tokens/s on one H100 (989 dense bf16 TFLOP/s): 855,166,464 * 4e5 / 989e12
    assert mfu(400_000, flops, peak_tflops("NVIDIA H100 80GB HBM3", "bf16")) == pytest.approx(0.34587, abs=1e-4)


@pytest.mark.parametrize(
    "name, precision, expected",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H200", "bf16", 989.0),
        ("NVIDIA A100-SXM4-80GB", "fp16", 312.0),
        ("NVIDIA A100-SXM4-80GB", "fp32", 156.0),  # TF32 tensor cores
        ("Tesla V100-SXM2-32GB", "bf16", 125.0),  # no bf16 on V100: its fp16 figure
        ("Tesla V100-SXM2-32GB", "fp32", 15.7),  # no TF32 either
        ("cpu", "fp32", None),
        ("Some Future Accelerator", "bf16", None),
    ],
)
def test_peak_lookup(name, precision, expected):
    assert peak_tflops(name, precision) == expected


def test_fp32_peak_follows_tf32():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "fp32") == 494.0
    assert peak_tflops("NVIDIA H100 80GB HBM3", "fp32", tf32=False) == 67.0


def test_peak_override_and_unknown_mfu():
    assert peak_tflops("cpu", "fp32", override=0.2) == 0.2
    assert mfu(1000, 1e6, None) is None


def test_straggler():
    assert straggler([100.0, 100.0, 150.0, 100.0]) == (2, pytest.approx(0.5))
    assert straggler([10.0]) == (0, 0.0)


def test_straggler_watch_names_only_a_rank_that_lagged_three_log_points_running_and_once():
    watch = StragglerWatch(threshold=0.2, points=3)
    # Ranks within the threshold are nobody's straggler, however many log points pass.
    assert [watch.update(1, 0.0) for _ in range(5)] == [None] * 5
    # Rank 1 lags 50% at three points running: named at the third, and not again.
    assert [watch.update(1, 0.5) for _ in range(5)] == [None, None, 1, None, None]
    # A different rank lagging, interrupted once, then three running.
    assert [watch.update(r, lag) for r, lag in [(0, 0.3), (0, 0.3), (0, 0.1), (0, 0.3), (0, 0.3), (0, 0.3)]] == [
        None, None, None, None, None, 0
    ]  # fmt: skip
    # The slowest rank changing every point is no streak.
    fresh = StragglerWatch()
    assert [fresh.update(r, 0.5) for r in (0, 1, 0, 1, 0)] == [None] * 5


def test_secrets_are_masked_in_nested_structures():
    env = {
        "WANDB_API_KEY": "wk-abcdef123",
        "HF_TOKEN": "hf_zzzzzz999",
        "MY_SERVICE_SECRET": "s3cr3t-value",
        "PATH": "/usr/bin",
        "SHORT_KEY": "abc",
    }
    secrets = secret_values(env)
    assert set(secrets) == {"wk-abcdef123", "hf_zzzzzz999", "s3cr3t-value"}
    obj = {
        "a": "token hf_zzzzzz999 inside",
        "nested": [{"b": "s3cr3t-value"}],
        "api_key": "anything",
        "n": 3,
        "path": "/usr/bin",
    }
    clean = redact(obj, secrets)
    assert clean == {
        "a": f"token {REDACTED} inside",
        "nested": [{"b": REDACTED}],
        "api_key": REDACTED,
        "n": 3,
        "path": "/usr/bin",
    }


def test_console_line_shape():
    record = {
        "step": 120,
        "train/epoch": 1,
        "train/lr": 3e-4,
        "perf/ms_per_step": 45.7,
        "perf/tokens_per_s": 71600,
        "perf/mfu": 0.412,
        "train/loss": 2.35,
        "train/grad_norm": 0.81,
    }
    assert format_console_line(record, 1000) == (
        "| epoch   1 | step  120/1000 | lr 3.00e-04 | ms/step     45.7 | tokens/s    71,600 | mfu 41.2% "
        "| loss 2.3500 | gnorm 0.81"
    )
    del record["perf/mfu"], record["train/grad_norm"]
    assert "mfu" not in format_console_line(record, 1000) and "gnorm" not in format_console_line(record, 1000)


def test_a_failing_sink_warns_once_and_training_goes_on(caplog):
    from llm_ds.monitor.sinks import Monitor, Sink

    class Broken(Sink):
        name = "broken"
        calls = 0

        def write(self, record):
            Broken.calls += 1
            raise OSError("No space left on device")

    class Good(Sink):
        name = "good"
        seen: list = []

        def write(self, record):
            Good.seen.append(record["step"])

    monitor = Monitor([Broken(), Good()], total_steps=10)
    record = {
        "step": 1,
        "train/epoch": 1,
        "train/lr": 0.1,
        "perf/ms_per_step": 1.0,
        "perf/tokens_per_s": 1.0,
        "train/loss": 1.0,
    }
    for step in (1, 2, 3):
        monitor.log_train({**record, "step": step})
    assert Broken.calls == 1 and Good.seen == [1, 2, 3]
    warnings = [r for r in caplog.records if "metrics sink broken failed" in r.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0].getMessage()


def test_progress_bar_advances_to_each_log_point():
    import io

    from llm_ds.monitor.sinks import ProgressSink

    stream = io.StringIO()
    bar = ProgressSink(total_steps=100, initial=20, stream=stream)
    for step in (30, 40):
        bar.write({"step": step, "train/loss": 2.5})
    bar.write({"step": 40, "eval/loss": 2.0})  # eval records do not move it
    assert bar.bar.n == 40
    bar.close()
    assert "40/100" in stream.getvalue() and "loss=2.5000" in stream.getvalue()

"""Tensor parallelism's arithmetic and checks, and GPT-2 in the form AutoTP splits."""

import pytest
import torch

from llm_ds.config import ConfigError, ModelConfig, load_run_config
from llm_ds.ds_config import DS_CONFIGS_DIR, load_ds_template, resolve_ds_config
from llm_ds.model import build_model
from llm_ds.parallel import Layout
from llm_ds.parallel import tensor as tp


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["parallel.tensor=3"], "`parallel.tensor` must divide model.n_head (4): each rank holds whole attention"),
        (["parallel.tensor=0"], "`parallel.tensor` must be > 0, got 0"),
        (["parallel.pipeline=5"], "`parallel.pipeline` must be <= model.n_layer (4): each stage holds at least one"),
        (["parallel.tensr=2"], "unknown key `parallel.tensr`; did you mean `parallel.tensor`?"),
    ],
)
def test_a_split_the_model_cannot_take_is_refused_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_run_config(None, overrides)
    assert expected in str(err.value)


def test_data_parallel_ranks_are_the_world_over_the_model_split():
    cfg = load_run_config(None, ["parallel.tensor=2"])
    assert [cfg.data_parallel_size(n) for n in (2, 4, 16)] == [1, 2, 8]
    with pytest.raises(ConfigError, match="= 2 does not divide the world size of 3 rank"):
        cfg.data_parallel_size(3)
    cfg.check_ranks_per_node({"a": 8, "b": 2})
    with pytest.raises(ConfigError, match=r"must divide the ranks of every node \(b runs 3\)"):
        cfg.check_ranks_per_node({"a": 8, "b": 3})


def test_the_global_batch_counts_data_parallel_ranks_only():
    cfg = load_run_config(None, ["parallel.tensor=2", "train.micro_batch_size=4", "train.grad_accum_steps=3"])
    ds = resolve_ds_config(load_ds_template(None), cfg, 8, "fp32", total_steps=10)
    assert ds["train_batch_size"] == 4 * 3 * 4
    assert ds["tensor_parallel"] == {"autotp_size": 2}
    plain = resolve_ds_config(load_ds_template(None), load_run_config(None, []), 8, "fp32", total_steps=10)
    assert "tensor_parallel" not in plain


def test_deepspeed_settings_that_contradict_the_split_are_refused():
    template = {**load_ds_template(None), "tensor_parallel": {"autotp_size": 4}}
    with pytest.raises(ConfigError, match=r"tensor_parallel: autotp_size=4 contradicts parallel.tensor=2"):
        resolve_ds_config(template, load_run_config(None, ["parallel.tensor=2"]), 4, "fp32", 10, "t.json")
    with pytest.raises(ConfigError, match=r"autotp_size=4 contradicts parallel.tensor=1"):
        resolve_ds_config(template, load_run_config(None, []), 4, "fp32", 10, "t.json")
    batch = {**load_ds_template(None), "train_batch_size": 32}
    with pytest.raises(ConfigError, match=r"x data-parallel ranks \(2 of 4\) = 16"):
        resolve_ds_config(batch, load_run_config(None, ["parallel.tensor=2"]), 4, "fp32", 10, "t.json")
    pipeline = load_run_config(None, ["parallel.pipeline=2"])
    zero2 = load_ds_template(DS_CONFIGS_DIR / "zero2.json")
    with pytest.raises(ConfigError, match=r"zero2.json: zero_optimization.stage=2 with `parallel.pipeline`=2: Deep"):
        resolve_ds_config(zero2, pipeline, 4, "fp32", 10, "zero2.json")
    both = load_run_config(None, ["parallel.pipeline=2", "parallel.tensor=2"])
    with pytest.raises(ConfigError, match="pipeline engine does not take AutoTP; choose one of them"):
        resolve_ds_config(load_ds_template(None), both, 4, "fp32", 10)
    assert resolve_ds_config(load_ds_template(None), pipeline, 4, "fp32", 10)["train_batch_size"] == 8 * 2


def test_layout_puts_a_tensor_group_on_neighbouring_ranks():
    places = [Layout(rank, 8, tensor=2) for rank in range(8)]
    assert [p.data_rank for p in places] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [p.tensor_rank for p in places] == [0, 1] * 4
    assert {p.data_size for p in places} == {4}
    assert [p.counts_tokens for p in places] == [True, False] * 4


def test_layout_of_a_pipeline_matches_deepspeeds_topology():
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    topology = PipeDataParallelTopology(num_pp=2, num_dp=3)
    for rank in range(6):
        place, coord = Layout(rank, 6, pipeline=2), topology.get_coord(rank)
        assert (place.stage, place.data_rank) == (coord.pipe, coord.data)
        assert place.counts_tokens is (coord.pipe == 0)


@pytest.mark.parametrize("fused_loss", [True, False])
def test_gpt2_with_linear_layers_computes_the_same_function(fused_loss):
    model = build_model(ModelConfig(n_layer=2, n_embd=32, n_head=4, n_positions=32, fused_loss=fused_loss), 128, seed=3)
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=tokens, labels=tokens).loss, model(input_ids=tokens).logits
    section, transposed = tp.prepare(model, 2)
    assert section["autotp_size"] == 2 and section["partition_config"]["layer_specs"] == tp.GPT2_LAYER_SPECS
    assert len(transposed) == 2 * 4 and "transformer.h.0.attn.c_attn.weight" in transposed
    assert all(type(m).__name__ != "Conv1D" for m in model.modules())
    assert tuple(model.get_parameter("transformer.h.0.attn.c_attn.weight").shape) == (96, 32)  # [out, in]
    with torch.no_grad():
        after = model(input_ids=tokens, labels=tokens).loss, model(input_ids=tokens).logits
    torch.testing.assert_close(after[0], before[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(after[1], before[1], rtol=1e-5, atol=1e-5)


def test_a_pretrained_model_whose_heads_do_not_split_is_refused():
    model = build_model(ModelConfig(n_layer=1, n_embd=24, n_head=6, n_positions=16), 64)
    with pytest.raises(ConfigError, match="must divide the model's 6 attention heads"):
        tp.prepare(model, 4)


def test_pipeline_layers_draw_the_whole_models_weights_and_compute_its_loss():
    """Each stage's layers, built alone, hold what the whole GPT-2 holds under the same names, and the layers
    run in order give its loss (the fused one and transformers')."""
    from llm_ds.model import build_gpt2_config
    from llm_ds.parallel import pipeline

    for fused in (True, False):
        mc = ModelConfig(n_layer=3, n_embd=32, n_head=4, n_positions=32, fused_loss=fused)
        whole = build_model(mc, 128, seed=5)
        config = build_gpt2_config(mc, 128)
        layers = [spec.build() for spec in pipeline.gpt2_layers(config, seed=5)]
        expected = dict(whole.named_parameters())
        for i, layer in enumerate(layers[:-1]):  # the last one is the tied table again
            for name, param in layer.named_parameters():
                torch.testing.assert_close(param, expected[pipeline.hf_name(f"{i}.{name}", 3)], rtol=0, atol=0)
        tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
        hidden = tokens
        for layer in layers[:-1]:
            hidden = layer(hidden)
        loss = pipeline.LossFn(fused, None)(pipeline._head(layers[-1], hidden), tokens)
        with torch.no_grad():
            torch.testing.assert_close(loss, whole(input_ids=tokens, labels=tokens).loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "n_layer, stages, head, expected",
    [
        (12, 2, 4.46, [8, 4]),
        (48, 2, 2.4, [25, 23]),
        (4, 2, 0.0, [2, 2]),
        (5, 3, 0.0, [2, 1, 2]),
        (3, 3, 9.0, [1, 1, 1]),
    ],
)
def test_pipeline_stages_balance_the_blocks_against_the_head(n_layer, stages, head, expected):
    from llm_ds.parallel.layout import stage_blocks

    blocks = stage_blocks(n_layer, stages, head)
    assert blocks == expected and sum(blocks) == n_layer and min(blocks) >= 1
    # No other split with a block on every stage has a lighter busiest stage.
    busiest = max(*blocks[:-1], blocks[-1] + head)
    for last in range(1, n_layer - stages + 2):
        rest = n_layer - last
        assert busiest <= max(-(-rest // (stages - 1)), last + head) + 1e-9


def test_one_process_trains_one_split(monkeypatch):
    import llm_ds.parallel as parallel

    monkeypatch.setattr(parallel, "_split", None)
    parallel.claim_split(1, 1)  # no split: nothing claimed
    parallel.claim_split(2, 1)
    parallel.claim_split(2, 1)  # the same split again: its groups serve
    for other in ((1, 1), (4, 1), (1, 2)):
        with pytest.raises(ConfigError, match="this process already trained with parallel.tensor=2, parallel.pipel"):
            parallel.claim_split(*other)


def test_what_a_split_cannot_run_is_refused_before_training():
    zero0 = {**load_ds_template(None), "zero_optimization": {"stage": 0}}
    tensor = load_run_config(None, ["parallel.tensor=2"])
    with pytest.raises(ConfigError, match="stage=0 with `parallel.tensor`=2: its checkpoints keep the weights in"):
        resolve_ds_config(zero0, tensor, 2, "bf16", 10, "z0.json")
    compiled = load_run_config(None, ["parallel.pipeline=2", "train.compile=true"])
    with pytest.raises(ConfigError, match="`train.compile` with `parallel.tensor`=1, `parallel.pipeline`=2"):
        resolve_ds_config(load_ds_template(None), compiled, 2, "fp32", 10)


def test_a_pipeline_refuses_a_loss_of_its_own():
    from llm_ds import Trainer

    class Smoothed(Trainer):
        def compute_loss(self, model, batch):
            return super().compute_loss(model, batch)

    with pytest.raises(ConfigError, match="Smoothed.compute_loss: a pipeline computes its loss on its last stage"):
        Smoothed(load_run_config(None, ["parallel.pipeline=2"]))

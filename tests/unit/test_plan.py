"""`llm-ds plan`: the memory model against DeepSpeed's own estimators and a built model, the choice it
makes, what it writes, and its refusals."""

import json

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from llm_ds import plan
from llm_ds.cli import main
from llm_ds.config import ModelConfig
from llm_ds.ds_config import load_ds_template, resolve_ds_config
from llm_ds.model import build_model, count_parameters

GPT2_SMALL = plan.ModelShape(12, 768, 12, 1024, 50257, 1024)
MiB = 2**20


def cluster(nodes=1, ranks=8, mem_gb=80, cpu_gb=1024, nvme_gb=0, device="H100"):
    return plan.Cluster(nodes, ranks, device, mem_gb * plan.GiB, cpu_gb * plan.GiB, nvme_gb * 1e9, 400.0)


@pytest.mark.parametrize("shape", [(2, 64, 2, 128, 512), (4, 128, 4, 256, 8192), (3, 96, 3, 64, 1000)])
def test_parameter_count_matches_a_built_model(shape):
    n_layer, n_embd, n_head, n_positions, vocab = shape
    cfg = ModelConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions, vocab_multiple_of=1)
    model = build_model(cfg, vocab)
    assert plan.ModelShape(n_layer, n_embd, n_head, n_positions, vocab, 64).n_params == count_parameters(model)


def test_gpt2_small_has_124m_parameters():
    assert GPT2_SMALL.n_params == 124_439_808


def device_states(est: plan.Estimate) -> int:
    """Model states on the device as DeepSpeed's estimators count them (no activations, buckets, slack)."""
    d = est.device
    return d["model_params"] + d["live_params"] + d["model_grads"] + d["fp32_grads"] + d["model_optimizer"]


@pytest.mark.parametrize("nodes,ranks", [(1, 1), (1, 8), (4, 8), (16, 8)])
def test_zero2_agrees_with_deepspeeds_estimator(nodes, ranks):
    p = GPT2_SMALL.n_params
    c = cluster(nodes, ranks)
    ours = plan.estimate(GPT2_SMALL, plan.Candidate(2), c, c.world, "bf16", {})
    _, ds_gpu = estimate_zero2_model_states_mem_needs(p, ranks, nodes, cpu_offload=False)
    assert device_states(ours) == pytest.approx(ds_gpu, rel=1e-6)
    # ZeRO-1 is the same implementation in DeepSpeed, and so the same bytes.
    assert device_states(plan.estimate(GPT2_SMALL, plan.Candidate(1), c, c.world, "bf16", {})) == device_states(ours)


@pytest.mark.parametrize("ranks", [1, 2, 8])
def test_zero2_offload_agrees_with_deepspeeds_estimator_on_device_and_host(ranks):
    p = GPT2_SMALL.n_params
    c = cluster(1, ranks)
    ours = plan.estimate(GPT2_SMALL, plan.Candidate(2, "cpu"), c, c.world, "bf16", {})
    ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(p, ranks, 1, cpu_offload=True)
    assert device_states(ours) == pytest.approx(ds_gpu, rel=1e-6)
    assert ours.host_per_node == pytest.approx(ds_cpu, rel=1e-6)


@pytest.mark.parametrize("nodes,ranks", [(1, 2), (1, 8), (4, 8)])
@pytest.mark.parametrize("offload", [("cpu", "cpu"), ("cpu", "none")])
def test_zero3_offload_agrees_with_deepspeeds_estimator(nodes, ranks, offload):
    p, largest = GPT2_SMALL.n_params, GPT2_SMALL.largest_layer_params
    c = cluster(nodes, ranks)
    zero = {"zero_optimization": {"stage3_max_live_parameters": 0}}  # the estimator's working set: the largest layer
    ours = plan.estimate(GPT2_SMALL, plan.Candidate(3, *offload), c, c.world, "bf16", zero)
    ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
        p, largest, ranks, nodes, cpu_offload=True, cpu_offload_params=offload[1] == "cpu", zero_init=True
    )
    assert device_states(ours) == pytest.approx(ds_gpu, rel=1e-6)
    assert ours.host_per_node == pytest.approx(ds_cpu, rel=1e-6)


@pytest.mark.parametrize("nodes,ranks", [(1, 2), (2, 8)])
def test_zero3_counts_the_16bit_gradient_partition_deepspeeds_estimator_leaves_out(nodes, ranks):
    """DeepSpeed's ZeRO-3 estimate is 18 bytes per parameter over N; measured (make bench-memory), a rank
    also holds its 16-bit gradient partition when the optimizer steps: 20 over N."""
    p, largest = GPT2_SMALL.n_params, GPT2_SMALL.largest_layer_params
    c = cluster(nodes, ranks)
    zero = {"zero_optimization": {"stage3_max_live_parameters": 0}}
    ours = plan.estimate(GPT2_SMALL, plan.Candidate(3), c, c.world, "bf16", zero)
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(p, largest, ranks, nodes, cpu_offload=False, zero_init=True)
    assert device_states(ours) - ds_gpu == pytest.approx(2 * p / c.world, rel=1e-6)


def test_zero_paper_counts_for_mixed_precision():
    """16 bytes per parameter at ZeRO-0, partitioned as the paper says at ZeRO-3 (plus the working set)."""
    p, c = GPT2_SMALL.n_params, cluster(1, 4)
    z0 = plan.model_states(p, 0, 0, 4, "bf16", plan.Candidate(0))["device"]
    assert z0["params"] + z0["grads"] + z0["optimizer"] == 16 * p
    z3 = plan.model_states(p, 0, 3, 4, "bf16", plan.Candidate(3), {"stage3_max_live_parameters": 0})["device"]
    assert z3["params"] + z3["grads"] + z3["optimizer"] == pytest.approx(16 * p / 4)
    assert c.world == 4


def test_activations_grow_with_micro_batch_and_checkpointing_saves_them():
    seed_gpt2 = plan.ModelShape(**{**GPT2_SMALL.__dict__, "activation": "gelu_new", "fused_loss": False})
    a1 = plan.activation_bytes(seed_gpt2, 1, "bf16", False)
    a8 = plan.activation_bytes(seed_gpt2, 8, "bf16", False)
    ck = plan.activation_bytes(seed_gpt2, 8, "bf16", True)
    assert a8["activations"] == 8 * a1["activations"] and a8["logits"] == 8 * a1["logits"]
    assert ck["activations"] < a8["activations"] / 5 and ck["logits"] == a8["logits"]
    # GPT-2's Python GELU keeps three more 4x-wide tensors per layer than a fused one.
    fused = plan.ModelShape(**{**GPT2_SMALL.__dict__, "activation": "gelu_pytorch_tanh"})
    saved = a8["activations"] - plan.activation_bytes(fused, 8, "bf16", False)["activations"]
    assert saved == 12 * 12 * 8 * 1024 * 768 * 2


def test_fused_loss_holds_one_chunk_of_logits():
    unfused = plan.ModelShape(**{**GPT2_SMALL.__dict__, "fused_loss": False})
    whole = plan.activation_bytes(unfused, 32, "bf16", False)["logits"]
    # On a GPU, log-softmax's backward holds three fp32 tensors of the logits' size at once: 18 GiB.
    assert whole == 32 * 1024 * 50257 * 12
    # On CPU ranks, as measured in bf16: two fp32 tensors and one 16-bit.
    assert plan.activation_bytes(unfused, 32, "bf16", False, on_gpu=False)["logits"] == 32 * 1024 * 50257 * 10
    chunked = plan.activation_bytes(GPT2_SMALL, 32, "bf16", False)["logits"]
    # 1,335 positions of fp32 logits (256 MiB), logsumexp's fp32 temporary of them and their bf16 gradient.
    one_chunk = 1335 * 50257 * (4 + 4 + 2)
    grads = 32 * 1024 * 768 * 2 + 50257 * 768 * (4 + 2)  # the hidden states' and the weight's
    assert chunked == one_chunk + grads
    cpu = plan.activation_bytes(GPT2_SMALL, 32, "bf16", False, on_gpu=False)["logits"]
    assert chunked - cpu == 1335 * 50257 * 4  # no logsumexp temporary on CPU (measured)
    # The chunk does not grow with the micro-batch; a given chunk size is used.
    assert plan.activation_bytes(GPT2_SMALL, 64, "bf16", False)["logits"] - chunked == 32 * 1024 * 768 * 2
    small = plan.ModelShape(**{**GPT2_SMALL.__dict__, "loss_chunk_tokens": 100})
    assert plan.activation_bytes(small, 32, "bf16", False)["logits"] == 100 * 50257 * 10 + grads


def test_gpu_framework_counts_cublas_workspaces_and_nvls_buffers():
    template = load_ds_template("ds_configs/zero1.json")

    def est(capability, nvls, ranks):
        c = plan.Cluster(1, ranks, "GPU", 80 * plan.GiB, 512 * plan.GiB, 0, 400.0, capability=capability, nvls=nvls)
        return plan.estimate(GPT2_SMALL, plan.Candidate(1, micro_batch=8), c, 8 * ranks, "bf16", template)

    hopper, ampere = est((9, 0), False, 8), est((8, 0), False, 8)
    # torch takes cuBLAS's and cuBLASLt's workspaces from its allocator: 32 MiB each on Hopper.
    assert hopper.device["workspaces"] == 64 * 2**20
    assert ampere.device["workspaces"] == 2 * (8 * 2**20 + 128 * 2**10)
    # NCCL's NVLS buffers (outside torch's allocator) on NVSwitch nodes of 4 or more GPUs only.
    assert est((9, 0), True, 8).framework - hopper.framework == plan.NCCL_NVLS_BYTES
    assert est((9, 0), True, 2).framework == est((9, 0), False, 2).framework


def test_recommends_the_fastest_candidate_that_fits():
    c = cluster(1, 8, mem_gb=10)
    estimates = plan.plan(GPT2_SMALL, c, 256, "bf16", load_ds_template("ds_configs/zero1.json"))
    best = estimates[0]
    assert best.fits and best.device_total <= 10 * plan.GiB
    assert all(best.step_s <= e.step_s + 1e-9 for e in estimates if e.fits)
    assert any(not e.fits for e in estimates)  # micro-batch 32 does not fit in 10 GiB
    assert best.grad_accum * best.candidate.micro_batch * 8 == 256


def test_more_ranks_and_offload_lower_device_memory():
    one = plan.estimate(GPT2_SMALL, plan.Candidate(3), cluster(1, 1), 8, "bf16", {})
    eight = plan.estimate(GPT2_SMALL, plan.Candidate(3), cluster(1, 8), 8, "bf16", {})
    off = plan.estimate(GPT2_SMALL, plan.Candidate(3, "cpu", "cpu"), cluster(1, 8), 8, "bf16", {})
    assert one.device_total > eight.device_total > off.device_total
    assert off.host_per_node > eight.host_per_node
    assert off.step_parts["offload"] > 0 and eight.step_parts["offload"] == 0


def run_plan(capsys, *args):
    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_command_json_and_write(tmp_path, capsys):
    out_path = tmp_path / "planned.json"
    code, out, _ = run_plan(
        capsys,
        "--config",
        "llm_ds/configs/gpt2-124m.yaml",
        "--gpu",
        "H100",
        "--num_gpus",
        "8",
        "--cpu-mem-gb",
        "512",
        "--write",
        str(out_path),
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    best = result["recommended"]
    assert result["model"]["parameters"] == 124_439_808
    assert best["fits"] and best["device_bytes"]["total"] < 80 * plan.GiB
    assert result["run_config"]["train.micro_batch_size"] == best["micro_batch"]
    written = json.loads(out_path.read_text())
    assert written["zero_optimization"]["stage"] == best["stage"]
    # The written template passes the same checks as a hand-written one, with the run values it implies.
    from llm_ds.config import load_run_config

    cfg = load_run_config(
        "llm_ds/configs/gpt2-124m.yaml",
        [f"{k}={v}" for k, v in result["run_config"].items()],
    )
    ds = resolve_ds_config(load_ds_template(out_path), cfg, 8, "bf16", 100, str(out_path))
    assert ds["train_batch_size"] == result["global_batch"]


def test_checkpoint_size_per_node_and_write_time(tmp_path, capsys):
    """ZeRO-1 spreads the optimizer states over the nodes; node 0 also writes the weights."""
    from llm_ds.plan.memory import checkpoint_bytes

    n = 124_439_808
    one = checkpoint_bytes(n, "fp32", plan.Candidate(1), nodes=1)
    assert one["total"] == one["busiest_node"] == 16 * n  # 1.99 GB: what a 1-rank fp32 ZeRO-1 save writes
    two = checkpoint_bytes(n, "bf16", plan.Candidate(1), nodes=2)
    assert two["total"] == 14 * n and two["busiest_node"] == 6 * n + 2 * n
    assert checkpoint_bytes(n, "bf16", plan.Candidate(3), nodes=2)["busiest_node"] == 6 * n
    assert checkpoint_bytes(n, "fp32", plan.Candidate(0), nodes=2)["busiest_node"] == 12 * n  # no sharding

    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=8\nb slots=8\n")
    args = ["--gpu", "H100", "--hostfile", str(hostfile), "--config", "llm_ds/configs/gpt2-124m.yaml"]
    code, out, _ = run_plan(capsys, *args, "--disk-gbs", "0.5", "--json")
    assert code == 0
    saves = json.loads(out)["checkpoint"]
    assert saves["disk_gbs"] == 0.5 and saves["write_s"] == pytest.approx(saves["busiest_node_bytes"] / 0.5e9)
    assert 0 < saves["busiest_node_bytes"] < saves["bytes"]
    code, out, _ = run_plan(capsys, *args, "--disk-gbs", "0.5")
    assert f"{saves['write_s']:.1f} s to write at 0.5 GB/s per node" in out and "checkpoint.async: true" in out


def test_plan_table_names_the_recommendation(capsys):
    code, out, _ = run_plan(capsys, "--gpu", "A100-40GB", "--config", "llm_ds/configs/gpt2-124m.yaml")
    assert code == 0
    assert "recommended: zero" in out and "per device: model_params" in out
    assert "--set train.micro_batch_size=" in out


def test_nothing_fits_says_what_would(capsys):
    code, _, err = run_plan(
        capsys,
        "--gpu",
        "T4",
        "--config",
        "llm_ds/configs/gpt2-124m.yaml",
        "--set",
        "model.n_layer=48",
        "--set",
        "model.n_embd=1600",
        "--set",
        "model.n_head=25",
        "--cpu-mem-gb",
        "16",
    )
    assert code == 1
    assert "nothing fits" in err and "would fit:" in err and "nodes" in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gpu-mem-gb", "0", "--gpu", "H100"], "--gpu-mem-gb must be > 0, got 0"),
        (["--cpu-mem-gb", "-4", "--gpu", "H100"], "--cpu-mem-gb must be > 0, got -4"),
        (["--nvme-gb", "-1", "--gpu", "H100"], "--nvme-gb must be >= 0, got -1"),
        (["--disk-gbs", "0", "--gpu", "H100"], "--disk-gbs must be > 0, got 0"),
        (["--gpu", "Z9000"], "--gpu 'Z9000': unknown memory size; give --gpu-mem-gb"),
        (["--gpu", "H100", "--set", "train.lr=-1"], "`train.lr` must be > 0"),
        (["--gpu", "H100", "--set", "model.n_layr=2"], "model.n_layr"),
    ],
)
def test_bad_input_is_one_line_naming_it(capsys, args, message):
    code, _, err = run_plan(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_bad_hostfile_fails_as_in_launch(tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=8\nnode2 slots=zero\n")
    code, _, plan_err = run_plan(capsys, "--gpu", "H100", "--hostfile", str(hostfile))
    launch_code = main(["launch", "--hostfile", str(hostfile), "--dry-run"])
    launch_err = capsys.readouterr().err
    assert code == launch_code == 2
    assert plan_err == launch_err and "slots=zero" in plan_err


def test_hostfile_sets_nodes_and_ranks(tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    code, out, _ = run_plan(
        capsys, "--gpu", "H100", "--hostfile", str(hostfile), "--config", "llm_ds/configs/gpt2-124m.yaml", "--json"
    )
    assert code == 0
    result = json.loads(out)
    assert result["cluster"]["nodes"] == 2 and result["cluster"]["ranks_per_node"] == 8
    assert result["global_batch"] == 8 * 4 * 16


def test_from_run_takes_the_measured_throughput(tmp_path, capsys):
    shape = plan.ModelShape(4, 128, 4, 256, 8192, 128)
    (tmp_path / "config.yaml").write_text("model:\n  n_layer: 4\n  n_embd: 128\n  n_head: 4\n  n_positions: 256\n")
    summary = {"tokens_per_s": 8000.0, "world_size": 2, "parameters": shape.n_params, "block_size": 128}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert plan.measured_tflops(str(tmp_path)) == pytest.approx(4000 * shape.flops_per_token() / 1e12)
    code, out, _ = run_plan(capsys, "--device", "cpu", "--num_gpus", "2", "--from-run", str(tmp_path), "--json")
    assert code == 0 and json.loads(out)["cluster"]["tflops"] == pytest.approx(plan.measured_tflops(str(tmp_path)))
    code, _, err = run_plan(capsys, "--device", "cpu", "--from-run", str(tmp_path / "nowhere"))
    assert code == 2 and "--from-run" in err and len(err.strip().splitlines()) == 1


def test_nodes_are_the_hosts_left_after_exclude_and_must_be_even(tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=8\nnode2 slots=4\n")
    code, _, err = run_plan(capsys, "--gpu", "H100", "--hostfile", str(hostfile))
    assert code == 2 and "node1: 8, node2: 4" in err
    code, out, _ = run_plan(capsys, "--gpu", "H100", "--hostfile", str(hostfile), "--exclude", "node2", "--json")
    assert code == 0
    assert json.loads(out)["cluster"]["nodes"] == 1 and json.loads(out)["cluster"]["ranks_per_node"] == 8


def test_min_nodes_says_whether_the_job_can_shrink(tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("".join(f"node{i} slots=8\n" for i in range(4)))
    common = ("--gpu", "H100", "--hostfile", str(hostfile), "--config", "llm_ds/configs/gpt2-124m.yaml")
    # 1536 sequences: 32, 24 and 16 ranks at micro-batch 16 all share them.
    code, out, _ = run_plan(capsys, *common, "--global-batch", "1536", "--json", "--min-nodes", "2")
    result = json.loads(out)
    shrunk, best = result["min_nodes"], result["recommended"]
    assert code == 0 and (shrunk["nodes"], shrunk["world_size"], shrunk["first_failure"]) == (2, 16, None)
    # Half the ranks: the same micro-batch, twice the accumulation, more time per step.
    assert shrunk["fits"] and shrunk["grad_accum"] == 2 * best["grad_accum"] and shrunk["slowdown"] > 1.3
    code, out, _ = run_plan(capsys, *common, "--global-batch", "1536", "--min-nodes", "2")
    assert "on 2 node(s) (16 ranks, the same global batch): fits" in out and "the job can shrink to it" in out
    # 512 sequences fit 2 nodes, but a job losing one node at a time passes through 3, which cannot share them.
    code, out, _ = run_plan(capsys, *common, "--global-batch", "512", "--min-nodes", "2")
    assert code == 0 and "the job cannot shrink to it: on 3 node(s), the global batch cannot be shared" in out
    assert "a global batch of 1536 can be shared on every count down to it" in out
    code, _, err = run_plan(capsys, *common, "--min-nodes", "5")
    assert code == 2 and "--min-nodes 5: the job has 4 node(s)" in err


GPT2_XL = plan.ModelShape(48, 1600, 25, 1024, 50257, 1024)
GPT_6B7 = plan.ModelShape(32, 4096, 32, 2048, 50257, 2048)


def test_a_replica_split_holds_its_share_of_the_parameters():
    s = GPT2_SMALL
    d = s.n_embd
    assert s.params_per_device() == s.n_params
    # Tensor parallelism splits the blocks' matrices and column-split biases; embeddings stay whole.
    assert s.params_per_device(tensor=2) == 12 * ((12 * d * d + 7 * d) // 2 + 6 * d) + (50257 + 1024 + 2) * d
    # Stages balance compute: the last one also runs the head (worth 4.5 blocks here), so it takes fewer blocks.
    assert s.stage_blocks(2) == [8, 4] and s.stage_blocks(4) == [4, 4, 3, 1] and s.stage_blocks(12) == [1] * 12
    # The fullest stage: the first, with its blocks and the token and position tables.
    assert s.params_per_device(pipeline=4) == 4 * (12 * d * d + 13 * d) + (50257 + 1024) * d


def test_splits_follow_the_heads_the_nodes_and_the_layers():
    two_nodes = cluster(nodes=2, ranks=8)
    assert plan.splits(GPT2_SMALL, two_nodes) == [(2, 1), (4, 1), (1, 2), (1, 4), (1, 8)]  # 12 layers: not 16
    assert [t for t, _ in plan.splits(GPT2_XL, two_nodes) if t > 1] == []  # 25 heads: no tensor group of 2-8
    assert (1, 16) in plan.splits(plan.ModelShape(16, 512, 8, 256, 512, 256), two_nodes)


def test_the_pipeline_bubble_and_its_traffic():
    c = cluster(nodes=2, ranks=8)
    batch = 256
    est = plan.estimate(GPT2_SMALL, plan.Candidate(1, micro_batch=4, pipeline=2), c, batch, "bf16", {})
    parts, m = est.step_parts, est.grad_accum
    assert m == batch // (8 * 4)  # 8 data-parallel ranks
    assert parts["pipeline_bubble"] / (parts["compute"] + parts["pipeline_bubble"]) == pytest.approx(1 / (m + 1))
    # A stage's data-parallel group is one node: its all-reduce runs at NVLink speed; the stages' hand-over
    # (activations forward, gradients back) crosses the nodes.
    p_dev = GPT2_SMALL.params_per_device(pipeline=2)
    assert parts["communication"] == pytest.approx(2 * 7 / 8 * p_dev * 2 / (c.intra_gbs * 1e9))
    assert parts["pipeline_transfer"] == pytest.approx(m * 2 * 4 * 1024 * 768 * 2 / (c.inter_gbs * 1e9))
    # Activations: the first stage holds its 8 blocks for 2 micro-batches in flight, 16 of the 12 that one rank
    # holds for one micro-batch.
    one = plan.activation_bytes(GPT2_SMALL, 4, "bf16", False)
    assert est.device["activations"] == pytest.approx(one["activations"] * 16 / 12, rel=0.01)
    # The pace: the last stage's 4 blocks and the head, or the first stage's 8 blocks, whichever is more.
    block = 6 * (12 * 768 * 768 + 13 * 768) + 12 * 768 * 1024
    per_token = max(8 * block, 4 * block + 6 * (50257 + 2) * 768)
    assert GPT2_SMALL.busiest_rank_flops_per_token(pipeline=2) == per_token


def test_tensor_parallel_all_reduces_run_in_the_node_and_split_the_activations():
    c = cluster(nodes=2, ranks=8)
    est = plan.estimate(GPT2_SMALL, plan.Candidate(1, micro_batch=4, tensor=2), c, 256, "bf16", {})
    tokens = 4 * 1024
    per_micro = 4 * 12 * 2 * (1 / 2) * tokens * 768 * 2
    assert est.step_parts["tensor_parallel"] == pytest.approx(est.grad_accum * per_micro / (c.intra_gbs * 1e9))
    whole = plan.activation_bytes(GPT2_SMALL, 4, "bf16", False)["activations"]
    split = est.device["activations"]
    assert split == pytest.approx(whole * (12 * (4 + 13 / 2) + 2) / (12 * 17 + 2))
    assert est.device["model_params"] == 2 * GPT2_SMALL.params_per_device(tensor=2)


def test_splitting_the_model_is_recommended_where_zero_alone_is_slower():
    """2 nodes of 8 H100s, 25 GB/s between them: for a 6.7B GPT-2-shaped model, ZeRO's gradient all-reduce
    over the slow link costs more than a pipeline's bubble; pipeline stages, one per node, win."""
    c = plan.Cluster(2, 8, "H100", 79.2 * plan.GiB, 2048 * plan.GiB, 0, 395.6, inter_gbs=25.0)
    ranked = plan.plan(GPT_6B7, c, 512, "bf16", {})
    best = ranked[0]
    assert best.fits and best.candidate.pipeline == 2
    zero_only = next(e for e in ranked if e.fits and e.candidate.model_parallel == 1)
    assert zero_only.step_s > best.step_s
    assert zero_only.step_parts["communication"] > (
        best.step_parts["communication"] + best.step_parts["pipeline_transfer"] + best.step_parts["pipeline_bubble"]
    )


def test_the_plan_command_says_the_split_to_set(tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=8\nb slots=8\n")
    sets = [
        "--set",
        "model.n_layer=32",
        "--set",
        "model.n_embd=4096",
        "--set",
        "model.n_head=32",
        "--set",
        "model.n_positions=2048",
        "--set",
        "data.block_size=2048",
        "--set",
        "model.vocab_size=50257",
    ]
    rc = main(["plan", "--config", "llm_ds/configs/gpt2-124m.yaml", "--hostfile", str(hostfile), "--gpu", "H100",
               "--cpu-mem-gb", "2048", *sets])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "recommended: zero1+pp2," in out
    assert "--set parallel.pipeline=2" in out and "pipeline_bubble" in out

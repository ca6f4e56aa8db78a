import torch
import torch.nn.functional as F

from llm_ds.config import ModelConfig, load_run_config
from llm_ds.data.loader import collate_blocks
from llm_ds.model import build_gpt2_config, build_model, count_parameters, param_groups, resolve_vocab_size
from llm_ds.trainer import Trainer


def tiny_model(seed=0, vocab=96):
    cfg = ModelConfig(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_multiple_of=1)
    return build_model(cfg, vocab, eos_token_id=0, seed=seed), vocab


def test_reported_loss_is_next_token_cross_entropy():
    model, vocab = tiny_model()
    model.eval()
    blocks = [torch.randint(0, vocab, (16,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    batch = collate_blocks(blocks)
    loss = Trainer.compute_loss(None, model, batch)  # the loss training and evaluation use by default
    logits = model(input_ids=batch["input_ids"]).logits
    # By hand: the prediction at position t is scored against token t + 1.
    by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), batch["input_ids"][:, 1:].reshape(-1))
    assert torch.allclose(loss, by_hand, rtol=1e-6, atol=0)
    # The seed chapter shifts labels once more in preprocessing; inside the model that scores t + 2.
    seed_labels = torch.cat([batch["input_ids"][:, 1:], torch.zeros_like(batch["input_ids"][:, :1])], dim=1)
    double_shifted = model(input_ids=batch["input_ids"], labels=seed_labels).loss
    after_next = F.cross_entropy(logits[:, :-2].reshape(-1, vocab), batch["input_ids"][:, 2:].reshape(-1))
    assert not torch.allclose(double_shifted, by_hand, rtol=1e-3)
    assert torch.allclose(double_shifted, after_next, rtol=1e-3)


def test_gpt2_124m_recipe_has_the_seed_parameter_count():
    cfg = load_run_config(None, []).model  # a sanity anchor: the tiny default
    assert cfg.n_layer == 4
    big = load_run_config("llm_ds/configs/gpt2-124m.yaml").model
    vocab = resolve_vocab_size(big, None)
    assert vocab == 50257
    with torch.device("meta"):
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel(build_gpt2_config(big, vocab))
    assert count_parameters(model) == 124_439_808  # what the seed's print shows for this config


def test_vocab_from_tokenizer_rounded_up():
    assert resolve_vocab_size(ModelConfig(vocab_multiple_of=64), 8001) == 8064
    assert resolve_vocab_size(ModelConfig(vocab_multiple_of=64), 8000) == 8000
    assert resolve_vocab_size(ModelConfig(vocab_size=50257, vocab_multiple_of=64), 50257) == 50304


def test_init_depends_only_on_seed_and_names():
    a, _ = tiny_model(seed=5)
    torch.manual_seed(123)  # the global RNG does not matter
    b, _ = tiny_model(seed=5)
    c, _ = tiny_model(seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["transformer.h.0.attn.c_attn.weight"], sc["transformer.h.0.attn.c_attn.weight"])
    w = sa["transformer.h.0.attn.c_attn.weight"]
    assert abs(w.std().item() - 0.02) < 0.003
    assert sa["transformer.h.1.mlp.c_proj.weight"].std().item() < 0.012  # 0.02 / sqrt(2 * n_layer)
    assert torch.all(sa["transformer.ln_f.weight"] == 1) and torch.all(sa["transformer.h.0.attn.c_attn.bias"] == 0)
    assert a.lm_head.weight.data_ptr() == a.transformer.wte.weight.data_ptr()  # tied, as GPT-2


def test_weight_decay_only_on_matrices():
    model, _ = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_init_from_a_local_pretrained_model(tmp_path):
    source, vocab = tiny_model(seed=3)
    source.save_pretrained(tmp_path / "pretrained")
    cfg = ModelConfig(init_from=str(tmp_path / "pretrained"), n_layer=7)  # the shape here is ignored
    loaded = build_model(cfg, vocab, seed=99)
    assert loaded.config.n_layer == 2
    a, b = source.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    bigger = build_model(cfg, vocab + 10, seed=99)  # a tokenizer with more tokens grows the embeddings
    assert bigger.get_input_embeddings().num_embeddings == vocab + 10


def test_init_from_a_missing_model_is_a_config_error(tmp_path):
    import pytest

    from llm_ds.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.init_from=.*could not be loaded"):
        build_model(ModelConfig(init_from=str(tmp_path / "absent")), 96)


def test_init_names_its_devices_under_zero_init_constructor_wrappers(monkeypatch):
    """``deepspeed.zero.Init`` replaces torch's tensor constructors with ones that put a tensor made without
    a device on the accelerator and cast it to the engine's 16-bit dtype. On CUDA a CPU generator cannot
    draw there; the init must neither crash nor change its values under DeepSpeed's own wrappers."""
    from deepspeed.runtime.zero import partition_parameters as pp

    from llm_ds.model import init_gpt2_weights

    reference, _ = tiny_model(seed=4)
    model, _ = tiny_model(seed=99)
    without_device = []

    def wrap(fn_name):
        wrapped = pp.zero_wrapper_for_fp_tensor_constructor(
            getattr(torch, fn_name), target_fp_dtype=torch.bfloat16, target_device=torch.device("meta")
        )

        def constructor(*args, **kwargs):
            if kwargs.get("device") is None:
                without_device.append(fn_name)
            return wrapped(*args, **kwargs)

        return constructor

    for fn_name in ("tensor", "empty", "zeros", "ones", "full", "arange", "eye", "randn"):
        monkeypatch.setattr(torch, fn_name, wrap(fn_name))
    monkeypatch.setattr(
        torch.Tensor, "__new__", pp.get_new_tensor_fn_for_dtype(torch.bfloat16, torch.device("meta")), raising=False
    )
    init_gpt2_weights(model, seed=4, n_layer=2)
    monkeypatch.undo()
    assert without_device == []
    expected, got = reference.state_dict(), model.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)

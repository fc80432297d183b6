import copy
import dataclasses
import json

import pytest

from dgcli.config import ModelConfig, SamplerSettings
from dgcli.errors import ConfigError
from dgcli.known import DIFFUSIONGEMMA_26B_A4B, DIFFUSIONGEMMA_26B_A4B_GENERATION


def real():
    return copy.deepcopy(DIFFUSIONGEMMA_26B_A4B)


def test_released_form_gives_per_layer_shapes():
    c = ModelConfig.from_dict(real())
    assert c.layer_head_dim[:6] == [256] * 5 + [512]
    assert c.layer_kv_heads[:6] == [8] * 5 + [2]
    assert c.canvas_length == 256 and c.sliding_window == 1024 and c.final_logit_softcapping == 30.0


def test_save_pretrained_form_is_equivalent():
    d = real()
    t = d["text_config"]
    del t["global_head_dim"], t["num_global_key_value_heads"]
    t["per_layer_config"] = {str(i): {"head_dim": 512, "num_key_value_heads": 2} for i in (5, 11, 17, 23, 29)}
    assert ModelConfig.from_dict(d) == ModelConfig.from_dict(real())


@pytest.mark.parametrize("field", ["hidden_size", "num_experts", "moe_intermediate_size", "vocab_size"])
def test_missing_field_is_named(field):
    d = real()
    del d["text_config"][field]
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda t: t.update(layer_types=t["layer_types"][:-1]), "layer_types"),
        (lambda t: t.update(num_global_key_value_heads=3), "key/value heads"),
        (lambda t: t.update(top_k_experts=200), "top_k_experts"),
        (lambda t: t.update(per_layer_config={"40": {"head_dim": 8}}), "per_layer_config"),
        (lambda t: t.update(hidden_size="big"), "hidden_size"),
    ],
)
def test_contradictions_are_refused(change, needle):
    d = real()
    change(d["text_config"])
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_dict(d)


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_file(tmp_path / "missing" / "config.json")


def test_generation_config_defaults_and_overrides():
    s = SamplerSettings.from_generation_config(DIFFUSIONGEMMA_26B_A4B_GENERATION)
    assert (s.max_denoising_steps, s.entropy_bound, s.eos_token_id, s.pad_token_id) == (48, 0.1, [1, 106, 50], 0)
    # save_pretrained writes nulls for unset fields: those keep the reference defaults
    s = SamplerSettings.from_generation_config(json.loads('{"t_min": null, "eos_token_id": 7}'))
    assert s.t_min == 0.4 and s.eos_token_id == [7] and s.pad_token_id is None
    assert s.replace(t_max=1.0, seed=3).t_max == 1.0
    with pytest.raises(ConfigError, match="t_max"):
        s.replace(t_max=0.1)
    with pytest.raises(ConfigError, match="unknown sampler setting"):
        s.replace(temperature=0.5)


def test_every_dg_variable_is_a_documented_switch():
    """Code reads DG_* variables only under names dgcli.settings documents (SWITCHES)."""
    import re
    from pathlib import Path

    from dgcli.settings import SWITCHES

    root = Path(__file__).resolve().parent.parent
    used = {m for d in ("dgcli", "quant", "kernels") for f in (root / d).rglob("*.py")
            for m in re.findall(r"\bDG_[A-Z0-9_]*[A-Z0-9]", f.read_text(encoding="utf-8"))}
    assert "DG_HOME" in used and "DG_DEBUG" in used
    assert used <= set(SWITCHES), sorted(used - set(SWITCHES))


def test_known_flat_text_config_is_the_same_model_and_a_copy():
    from dgcli import known

    flat = known.text_config()
    flat["layer_types"][0] = "changed"
    assert DIFFUSIONGEMMA_26B_A4B["text_config"]["layer_types"][0] == "sliding_attention"
    a, b = ModelConfig.from_dict(known.text_config()), ModelConfig.from_dict(real())
    assert a.vision_config is None and b.vision_config is not None  # the flat form is the text model alone
    same = dict(eos_token_id=b.eos_token_id, vision_config=b.vision_config, image_token_id=b.image_token_id)
    assert a.canvas_length == 256 and dataclasses.replace(a, **same) == b

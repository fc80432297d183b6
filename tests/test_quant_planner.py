"""The VRAM planner on the released 26B-A4B config (built on meta), against quant.md's arithmetic."""

import pytest

from dgcli.config import FULL, SLIDING, ModelConfig
from quant.planner import GiB, BudgetError, estimate, model_shapes, parse_bytes, plan
from quant.schemes import tensor_formats, tensor_group

REAL = dict(
    text_config=dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                     num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                     num_global_key_value_heads=2, sliding_window=1024, layer_types=([SLIDING] * 5 + [FULL]) * 5,
                     num_experts=128, top_k_experts=8, moe_intermediate_size=704),
    canvas_length=256)


@pytest.fixture(scope="module")
def real():
    return ModelConfig.from_dict(REAL)


def test_default_scheme_fits_18gb_at_32k_as_quant_md_says(real):
    groups, e = plan(real, "int4", context=32768, budget_bytes=18_000_000_000)
    assert groups == {"experts": "int4_sym_g64", "dense": "int8_row", "embedding": "int8_row"}  # S3
    assert e.fits and e.total < 18e9
    assert e.weights == pytest.approx(14.56e9, abs=0.01e9)  # quant.md table 2a, S3
    assert e.total / GiB == pytest.approx(15.68, rel=0.02)  # quant.md table 2d, S3 @32k
    rows = {r.label: r.nbytes for r in e.rows}
    assert rows["sliding: 25 layers x ring of 1,280"] == 25 * 8 * 1024 * 1280  # 250 MiB
    assert rows["full: 5 layers x 33,024 positions"] == 5 * 4 * 1024 * 33024  # 645 MiB
    assert rows["logits fp32 [256 x 262,144]"] == 256 * 2**20
    assert "KV" not in e.table() and "total" in e.table()


def test_weight_groups_match_parameter_counts(real):
    e = estimate(real, {})  # everything 16-bit
    assert e.weights == pytest.approx(50.50e9, abs=0.01e9)
    by = {r.label.split(" [")[0]: r.nbytes for r in e.rows if r.section == "weights"}
    assert by["routed experts"] == 2 * 30 * 128 * 3 * 704 * 2816
    assert by["embedding (lookup, LM head, soft)"] == 2 * 262144 * 2816
    shapes = model_shapes(real)
    assert len([k for k in shapes if tensor_group(k) == "experts"]) == 60
    assert sum(1 for k in shapes if tensor_group(k) == "attention") == 25 * 4 + 5 * 3  # no v_proj on full layers


def test_budget_refuses_or_upgrades(real):
    with pytest.raises(BudgetError) as exc:
        plan(real, "int4", context=131072)  # 17.76 GiB > 18 GB
    assert "over the 18.00 GB budget" in str(exc.value) and "\n" not in str(exc.value)
    assert "full: 5 layers x 131,328 positions" in exc.value.hint and "over by" in exc.value.hint
    groups, e = plan(real, "int4", context=32768, budget_bytes=parse_bytes("24GB"))  # S1, as on a 5090
    assert groups == {"experts": "int4_sym_g64", "dense": "bf16", "embedding": "bf16"}
    assert e.weights == pytest.approx(16.96e9, abs=0.01e9)
    groups, e = plan(real, "nf4", context=32768)
    assert groups["dense"] == "nf4_g64" and e.weights < 14.56e9
    groups, e = plan(real, "int4", budget_bytes=None)  # no budget: the smallest formats
    assert groups["dense"] == "int8_row"


def test_real_shapes_take_group_64_everywhere(real):
    shapes = model_shapes(real)
    f = tensor_formats(shapes, {"experts": "int4_sym_g64", "dense": "nf4_g64", "embedding": "int8_row"})
    assert {f[k] for k in shapes if tensor_group(k) == "experts"} == {"int4_sym_g64"}  # 704 = 11 x 64
    assert {f[k] for k in shapes if tensor_group(k) in ("attention", "mlp", "self_cond")} == {"nf4_g64"}
    assert {f[k] for k in shapes if tensor_group(k) == "other"} == {"keep"}
    assert f["model.decoder.layers.0.router.proj.weight"] == "keep"


def test_parse_bytes():
    assert parse_bytes("18GB") == 18 * 10**9
    assert parse_bytes("16GiB") == 16 * 2**30
    assert parse_bytes("1.5 gb") == 1_500_000_000
    assert parse_bytes(123) == 123
    from dgcli.errors import DgError

    with pytest.raises(DgError):
        parse_bytes("lots")

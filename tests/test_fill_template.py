"""dg fill's template language, JSON Schema -> template and token templates: parsing only (no model)."""

import pytest

from dgcli.filling import template_from
from dgcli.schema import string_budget, to_template
from dgcli.template import Fixed, Hole, TemplateError, from_tokens, infill, parse


def test_parse_fixed_text_and_typed_holes():
    t = parse("Name: {{name:text:4}}, age {{ int:3 }}, {{bool}} {{size:choice:S|M|X\\|L}}")
    assert t.parts == (
        Fixed("Name: "), Hole("text", 4, "name"), Fixed(", age "), Hole("int", 3, None, value="int"),
        Fixed(", "), Hole("choice", 0, None, ("true", "false"), value="bool"), Fixed(" "),
        Hole("choice", 0, "size", ("S", "M", "X|L")))


def test_escapes_and_lone_braces_are_text():
    t = parse("a \\{{not a hole}} b }} {c} \\x {{text:1}}")
    assert t.parts[0] == Fixed("a {{not a hole}} b }} {c} \\x ") and t.parts[1] == Hole("text", 1)
    assert parse("\\{{").parts == (Fixed("{{"),)


@pytest.mark.parametrize("source, words", [
    ("Name: {{text:4", "unclosed '{{' at column 7"),
    ("a {{text:2 {{int:1}}", "unclosed '{{' at column 3"),
    ("x\ny {{text:2", "line 2, column 3"),
    ("{{txt:4}}", "unknown hole type 'txt'"),
    ("{{name:float}}", "unknown hole type 'float'"),
    ("{{hello}}", "unknown hole type 'hello'"),
    ("{{text:0}}", "N >= 1"),
    ("{{int:-2}}", "N >= 1"),
    ("{{text:many}}", "N >= 1"),
    ("{{text}}", "text needs a length"),
    ("{{choice:}}", "choice needs options"),
    ("{{choice}}", "choice needs options"),
    ("{{choice:a||b}}", "empty option"),
    ("{{choice:a| }}", "empty option"),
    ("{{choice:a|a}}", "appears twice"),
    ("{{bool:yes}}", "bool takes no argument"),
    ("{{}}", "empty hole"),
    ("{{9x:text:2}}", "bad hole name"),
    ("{{a:text:1}} {{a:int:1}}", "used twice"),
    ("", "empty template"),
])
def test_bad_templates_are_one_line_usage_errors(source, words):
    with pytest.raises(TemplateError) as e:
        parse(source)
    msg = str(e.value)
    assert words in msg and "\n" not in msg and e.value.exit_code == 2


def test_infill_and_token_templates():
    assert infill("def f(x):\n", "\n    return y\n", 8).parts == (
        Fixed("def f(x):\n"), Hole("text", 8, "infill"), Fixed("\n    return y\n"))
    t = from_tokens([5, 6, 7, 8, 9, 10], [1, 1, 0, 0, True, False])
    assert t.parts == (Fixed("", (5, 6)), Hole("text", 2, "0"), Fixed("", (9,)), Hole("text", 1, "1"))
    for args, words in [(([1, 2], [1]), "has 1 entries"), (([1, -2], [1, 0]), "token ids"),
                        (([1], [2]), "booleans"), (([], []), "non-empty"), (([1], None), "needs diffusion_pinned")]:
        with pytest.raises(TemplateError, match=words):
            from_tokens(*args)
    with pytest.raises(TemplateError, match="whole number"):
        infill("a", "b", 0)


def test_template_from_takes_exactly_one_source():
    assert template_from("{{int:2}}").parts == (Hole("int", 2, value="int"),)
    assert template_from(schema={"type": "boolean"}).holes[0].options == ("true", "false")
    assert template_from(seed_canvas=[3, 4], pinned=[0, 1]).parts[1] == Fixed("", (4,))
    for kw in ({}, {"template": "x", "schema": {"type": "null"}}):
        with pytest.raises(TemplateError, match="give one of"):
            template_from(**kw)


def test_schema_becomes_pinned_json_with_typed_holes():
    schema = {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0},
        "ok": {"type": "boolean"}, "color": {"enum": ["red", 3, None]}, "none": {"type": "null"},
        "k": {"const": {"a": 1}}, "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2},
        "empty": {"type": "string", "maxLength": 0}}}
    t = to_template(schema)
    fixed = "".join(p.text for p in t.parts if isinstance(p, Fixed))
    assert fixed == ('{"name": "", "age": , "ok": , "color": , "none": null, "k": {"a": 1}, "tags": ["", ""], '
                     '"empty": ""}')
    holes = {h.name: h for h in t.holes}
    assert holes["name"].kind == "string" and holes["name"].chars == 4 and holes["name"].size == 4
    assert holes["age"].kind == "int" and holes["ok"].value == "bool"
    assert holes["color"].options == ('"red"', "3", "null") and holes["color"].value == "json"
    assert set(holes) == {"name", "age", "ok", "color", "tags[0]", "tags[1]"}


def nested(depth):
    schema = {"type": "null"}
    for _ in range(depth):
        schema = {"type": "array", "minItems": 1, "maxItems": 1, "items": schema}
    return schema


@pytest.mark.parametrize("schema, words", [
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}]}}}, "'anyOf' (at a) is not supported"),
    ({"type": "string", "pattern": "^a"}, "'pattern' on a string"),
    ({"type": "string", "format": "date"}, "'format' on a string"),
    ({"type": "string", "minLength": 2}, "'minLength' above 0"),
    ({"type": "integer", "maximum": 9}, "'maximum' on a integer"),
    ({"type": "integer", "minimum": 3}, "'minimum' above 0"),
    ({"type": "array", "items": {"type": "integer"}}, "fixed item count"),
    ({"type": "object", "properties": {"x": {"type": ["string", "integer"]}}}, "give one type"),
    ({"type": "object", "required": ["b"], "properties": {"a": {"type": "null"}}}, "'required' names 'b'"),
    ({}, "allows anything"),
    ({"type": 5}, "not a valid JSON Schema"),
    ({"type": "object", "properties": {"a": {"type": "string", "maxLength": -1}}},
     "not a valid JSON Schema at /properties/a/maxLength"),
    ([1], "a JSON Schema is an object"),
    (nested(40), "nested too deeply"),
])
def test_unsupported_or_invalid_schemas_name_the_construct(schema, words):
    with pytest.raises(TemplateError) as e:
        to_template(schema)
    assert words in str(e.value) and "\n" not in str(e.value) and e.value.exit_code == 2


def test_string_budget_bounds_the_characters():
    for n in range(1, 300):
        tokens, chars = string_budget(n)
        assert tokens >= 1 and chars >= 1 and tokens * chars + tokens - 1 <= n


def test_fill_modules_import_only_downwards():
    """template and schema know no model; filling sits below the API (api imports it, not the reverse)."""
    from test_engine import dgcli_imports

    assert not dgcli_imports("template") & {"filling", "sampler", "engine", "api", "tokenizer"}
    assert dgcli_imports("schema") & {"filling", "sampler", "engine", "api"} == set()
    assert not dgcli_imports("filling") & {"api", "session", "repl", "cli", "canvas_view"}

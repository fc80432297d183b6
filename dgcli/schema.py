"""A JSON Schema as a template (`dg fill --schema`): keys, braces, commas and quotes are fixed text,
values are typed holes, so the output parses and validates by construction (docs/fill.md).

Supported: objects (`properties`; every property is written, in order, so `required` holds),
strings (`maxLength`, else at most DEFAULT_STRING_TOKENS tokens; `enum`), integers and numbers
(non-negative whole numbers), booleans, null, `enum` and `const` of any JSON values, arrays with a
fixed item count (`minItems` == `maxItems`, one `items` schema), nesting. Anything else is refused
with one line that names the keyword and where it is.
"""

from __future__ import annotations

import json
import math

from .template import Fixed, Hole, Template, TemplateError, unicode_text

DEFAULT_STRING_TOKENS = 16  # a string without maxLength
INT_TOKENS = 6  # digits of an integer or number (tokenizers split digits one per token)
MAX_ITEMS = 256
MAX_DEPTH = 32  # nesting of objects and arrays
IGNORED = {"title", "description", "$schema", "$id", "$comment", "default", "examples", "deprecated",
           "readOnly", "writeOnly", "additionalProperties", "required", "$defs", "definitions"}
ALLOWED = {
    "object": {"type", "properties"},
    "string": {"type", "maxLength", "minLength"},
    "integer": {"type", "minimum"},
    "number": {"type", "minimum"},
    "boolean": {"type"},
    "null": {"type"},
    "array": {"type", "items", "minItems", "maxItems"},
}


def check(schema) -> None:
    """The schema itself must be valid JSON Schema (its own metaschema), before anything else."""
    import jsonschema

    if not isinstance(schema, (dict, bool)):
        raise TemplateError(f"a JSON Schema is an object, got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except RecursionError:
        raise TemplateError(f"the schema is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except jsonschema.SchemaError as e:
        path = "/".join(str(p) for p in e.absolute_path)
        raise TemplateError(f"not a valid JSON Schema{' at /' + path if path else ''}: "
                            f"{e.message.splitlines()[0][:200]}") from None


def to_template(schema) -> Template:
    """The template for `schema` (checked first); hole names are the values' paths (a.b[0])."""
    check(schema)
    parts: list[Fixed | Hole] = []
    emit(schema, "", parts)
    merged: list[Fixed | Hole] = []
    for p in parts:  # adjacent fixed texts as one: one tokenization, fewer boundaries
        if isinstance(p, Fixed) and merged and isinstance(merged[-1], Fixed):
            merged[-1] = Fixed(merged[-1].text + p.text)
        else:
            merged.append(p)
    return Template(tuple(merged))


def emit(s, path: str, out: list, depth: int = 0) -> None:
    at = path or "the top level"
    if depth > MAX_DEPTH:
        raise TemplateError(f"the schema is nested too deeply (at {at}): at most {MAX_DEPTH} levels")
    if s is True or s == {}:
        raise TemplateError(f"a schema that allows anything (at {at}) cannot be filled: give it a type")
    if s is False:
        raise TemplateError(f"a schema that allows nothing (at {at}) cannot be filled")
    if "const" in s:
        out.append(Fixed(dump(s["const"], at)))
        return
    if "enum" in s:
        values = s["enum"]
        if not values:
            raise TemplateError(f"an empty enum (at {at}) allows nothing")
        options = tuple(dict.fromkeys(dump(v, at) for v in values))
        out.append(Hole("choice", 0, path or "value", options, value="json"))
        return
    kind = s.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        if len(kinds) != 1:
            raise TemplateError(f"'type': {json.dumps(kind)} (at {at}) is not supported: give one type")
        kind = kinds[0]
    if kind not in ALLOWED:
        if kind is None:
            named = next((k for k in ("anyOf", "oneOf", "allOf", "$ref", "not", "if") if k in s), None)
            raise TemplateError(f"'{named}' (at {at}) is not supported" if named
                                else f"a schema without 'type', 'enum' or 'const' (at {at}) is not supported")
        raise TemplateError(f"type '{kind}' (at {at}) is not supported")
    extra = sorted(set(s) - ALLOWED[kind] - IGNORED)
    if extra:
        raise TemplateError(f"'{extra[0]}' on a {kind} (at {at}) is not supported")
    if kind == "object":
        props = s.get("properties") or {}
        missing = [k for k in s.get("required") or () if k not in props]
        if missing:
            raise TemplateError(f"'required' names '{missing[0]}' (at {at}), which is not in 'properties'")
        out.append(Fixed("{"))
        for i, (key, sub) in enumerate(props.items()):
            out.append(Fixed((", " if i else "") + json.dumps(key) + ": "))
            emit(sub, f"{path}.{key}" if path else key, out, depth + 1)
        out.append(Fixed("}"))
    elif kind == "array":
        lo, hi = whole(s.get("minItems")), whole(s.get("maxItems"))
        if lo is None or lo != hi:
            raise TemplateError(f"an array (at {at}) needs a fixed item count: minItems == maxItems")
        if lo > MAX_ITEMS:
            raise TemplateError(f"an array (at {at}) has at most {MAX_ITEMS} items here, got {lo}")
        items = s.get("items")
        if lo and not isinstance(items, dict):
            raise TemplateError(f"an array (at {at}) needs one 'items' schema")
        out.append(Fixed("["))
        for i in range(lo):
            if i:
                out.append(Fixed(", "))
            emit(items, f"{path}[{i}]", out, depth + 1)
        out.append(Fixed("]"))
    elif kind == "string":
        if s.get("minLength", 0) > 0:
            raise TemplateError(f"'minLength' above 0 on a string (at {at}) is not supported")
        limit = whole(s.get("maxLength"))
        out.append(Fixed('"'))
        if limit is None:
            out.append(Hole("string", DEFAULT_STRING_TOKENS, path or "value"))
        elif limit > 0:
            size, chars = string_budget(limit)
            out.append(Hole("string", size, path or "value", chars=chars))
        out.append(Fixed('"'))
    elif kind in ("integer", "number"):
        low = s.get("minimum")
        if low is not None and (not isinstance(low, (int, float)) or not math.isfinite(low) or low > 0):
            raise TemplateError(f"'minimum' above 0 on a {kind} (at {at}) is not supported: values are whole "
                                "numbers from 0")
        out.append(Hole("int", INT_TOKENS, path or "value", value="int"))
    elif kind == "boolean":
        out.append(Hole("choice", 0, path or "value", ("true", "false"), value="bool"))
    else:  # null
        out.append(Fixed("null"))


def dump(value, at: str) -> str:
    """A const or enum value as JSON text; NaN and Infinity (which json.loads takes) are not JSON."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        return json.dumps(json.loads(unicode_text(text)))  # a lone surrogate ("\ud800") as U+FFFD
    except ValueError:
        raise TemplateError(f"a const or enum value (at {at}) is NaN or Infinity, which JSON cannot hold") from None


def whole(n):
    """A count as an int: the metaschema takes 1e9 and 5.0 as integers, but range() and isqrt do not."""
    return None if n is None else int(n)


def string_budget(max_chars: int) -> tuple[int, int]:
    """(tokens, characters per token) so that tokens·chars + (tokens − 1) <= max_chars (a decoder may put
    one separator between tokens): about sqrt(maxLength) tokens of about sqrt(maxLength) characters."""
    chars = max(1, math.isqrt(max_chars))
    return max(1, (max_chars + 1) // (chars + 1)), chars

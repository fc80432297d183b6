"""dg fill on the tiny model: pins, typed holes, choices, schemas, multi-block templates, the RNG invariant."""

import io
import json

import jsonschema
import pytest
import torch
from rich.console import Console

import dgcli
from dgcli.canvas_view import PINNED, CanvasView
from dgcli.events import BlockEvent, StepEvent
from dgcli.filling import HoleProcessor, layout, template_from
from dgcli.template import TemplateError

FAST = {"max_denoising_steps": 4}
SEEDS = range(12)


def run(tiny, template, prompt="hi", **kw):
    engine, tok = tiny
    plan = layout(template_from(template) if isinstance(template, str) else template, tok, engine,
                  engine.sampler_settings(**{**FAST, **kw}))
    events = list(dgcli.stream_generate(engine, tok, prompt, template=plan, **{**FAST, **kw}))
    return plan, events


def pins_of(plan, b=0):
    blk = plan.blocks[b]
    return blk.pinned.tolist(), blk.tokens.tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_unconstrained_canvas_is_dg_run_token_for_token(tiny, seed):
    """{{text:L}}: the same random draws, events and answer as an untemplated run of L tokens."""
    engine, tok = tiny
    L = engine.config.canvas_length
    plain = list(dgcli.stream_generate(engine, tok, "hi", seed=seed, max_new_tokens=L, **FAST))
    _, filled = run(tiny, f"{{{{text:{L}}}}}", seed=seed)
    steps = lambda evs: [(e.canvas, e.accepted, e.argmax, e.entropy) for e in evs if isinstance(e, StepEvent)]
    assert steps(filled) == steps(plain)
    assert filled[-1].token_ids == plain[-1].token_ids and filled[-1].text == plain[-1].text
    r = dgcli.fill(engine, tok, "hi", f"{{{{text:{L}}}}}", seed=seed, **FAST)
    assert r.text == plain[-1].text and r.holes == {"0": plain[-1].text}


def test_fixed_text_is_pinned_in_every_step_and_comes_back_verbatim(tiny):
    template = "Name: {{name:text:5}}, age {{age:int:3}}. Likes: {{choice:cats|big dogs}}!"
    for seed in SEEDS:
        plan, events = run(tiny, template, seed=seed)
        pinned, tokens = pins_of(plan)
        assert sum(pinned) == 256 - 5 - 3 - max(len(o) for o in plan.slots[5].options)
        steps = [e for e in events if isinstance(e, StepEvent)]
        assert steps
        for e in steps:
            assert e.pinned == pinned
            assert all(c == t and a == t and h == 0.0 and acc
                       for c, a, h, acc, t, p in zip(e.canvas, e.argmax, e.entropy, e.accepted, tokens, pinned) if p)
        done = events[-1]
        assert all(x == t for x, t, p in zip(done.token_ids, tokens, pinned) if p)
        text = done.text
        assert text.startswith("Name: ") and ", age " in text and ". Likes: " in text and text.endswith("!")
        r = plan.read(done.token_ids)
        assert r[0] == text and r[0] == f"Name: {r[1]['name']}, age {r[1]['age']}. Likes: {r[1]['2']}!"


def test_short_template_ends_its_canvas_with_an_end_of_turn_and_pads(tiny):
    plan, events = run(tiny, "Yes: {{int:2}}", seed=3)
    done = events[-1]
    T = plan.length
    assert done.token_ids[T] == 5 and set(done.token_ids[T + 1:]) == {0}  # tiny: <turn|>, then <pad>
    assert done.finish_reason == "template" and done.generated_tokens == 2 and done.blocks == 1


def test_int_holes_hold_only_digits(tiny):
    engine, tok = tiny
    for seed in SEEDS:
        r = dgcli.fill(engine, tok, "a number", "{{a:int:4}} and {{b:int:1}}", seed=seed, **FAST)
        a, b = r.holes["a"], r.holes["b"]
        assert isinstance(a, int) and 0 <= a < 10**4 and 0 <= b <= 9 and r.text == f"{a} and {b}"


def test_choice_is_exactly_one_option_of_any_token_length(tiny):
    engine, tok = tiny
    options = ["x", "very large dog", "blue"]
    template = "{{pick:choice:" + "|".join(options) + "}} then {{flag:bool}}"
    seen = set()
    for seed in range(24):
        plan, events = run(tiny, template, seed=seed)
        done = events[-1]
        text, holes = plan.read(done.token_ids)
        assert holes["pick"] in options and isinstance(holes["flag"], bool)
        assert text == f"{holes['pick']} then {str(holes['flag']).lower()}"
        slot = plan.slots[0]
        ids = tok.encode(holes["pick"])
        assert done.token_ids[:slot.width] == ids + [0] * (slot.width - len(ids))  # pads after a short option
        for e in events:
            if isinstance(e, StepEvent):  # every step's draft is one whole option
                assert any(e.argmax[:slot.width] == o + [0] * (slot.width - len(o)) for o in slot.options)
        seen.add(holes["pick"])
    assert len(seen) >= 2  # options of different lengths are both reachable


def test_choice_processor_picks_the_best_mean_log_probability():
    V = 6
    logits = torch.zeros(1, 4, V)
    logits[0, 1, 3] = 5.0  # option [3] alone: one confident token
    logits[0, 1, 2], logits[0, 2, 4] = 4.0, 0.0  # option [2, 4]: a good then a poor token
    proc = HoleProcessor([], [], torch.zeros(0, V, dtype=torch.bool), [(1, [[2, 4], [3]])], pad=0, device="cpu")
    out = proc(logits.clone())
    assert out[0, 1].argmax() == 3 and out[0, 2].argmax() == 0  # [3] then a pad
    assert torch.isinf(out[0, 1]).sum() == V - 1 and torch.isinf(out[0, 2]).sum() == V - 1
    assert torch.equal(out[0, 0], logits[0, 0]) and torch.equal(out[0, 3], logits[0, 3])  # other positions kept


PERSON = {
    "type": "object", "required": ["name", "age", "pet"],
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0},
        "score": {"type": "number"},
        "member": {"type": "boolean"},
        "pet": {"enum": ["cat", "dog", "very large bird", 7, None]},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 30}, "zip": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 2, "maxItems": 2}}},
        "note": {"type": ["string", "null"]},
    },
}


def test_schema_output_always_parses_and_validates(tiny):
    engine, tok = tiny
    for seed in SEEDS:
        r = dgcli.fill(engine, tok, "A person", PERSON, seed=seed, **FAST)
        value = json.loads(r.text)
        jsonschema.validate(value, PERSON)
        assert value["address"]["city"] == r.holes["address.city"] and value["pet"] == r.holes["pet"]
        assert len(value["name"]) <= 12 and all(len(t) <= 6 for t in value["address"]["tags"])


def test_string_holes_never_write_a_character_that_breaks_json(tiny):
    engine, tok = tiny
    plan = layout({"type": "string"}, tok, engine, engine.sampler_settings())
    allowed = plan.sets[0]
    quote, backslash = tok.encode('"')[0], tok.encode("\\")[0]
    assert not allowed[quote] and not allowed[backslash] and allowed[0] and allowed[5] and not allowed[2]  # <bos>


def test_a_template_longer_than_a_canvas_spans_blocks_left_to_right(tiny):
    words = " ".join(["the water"] * 124)  # 248 tokens
    template = words + " {{a:text:6}} {{b:choice:one|very large dog}} and {{c:int:2}}"  # the choice: 254..256
    plan, events = run(tiny, template, seed=5)
    assert plan.n_blocks == 2
    choice = next(s for s in plan.slots if s.key == "b")
    assert choice.start == 256  # not split across canvases: pads fill the first one's end
    done = events[-1]
    blocks = [e for e in events if isinstance(e, BlockEvent)]
    assert [b.block for b in blocks] == [0, 1] and "".join(b.text for b in blocks) == done.text
    assert done.text.startswith(words + " ") and done.text.endswith(f" and {plan.read(done.token_ids)[1]['c']}")
    for e in events:
        if isinstance(e, StepEvent):
            assert e.pinned == pins_of(plan, e.block)[0]


def test_a_fully_pinned_canvas_takes_no_steps(tiny):
    plan, events = run(tiny, "just fixed text", seed=0)
    assert not [e for e in events if isinstance(e, StepEvent)]
    assert events[-1].text == "just fixed text" and events[-1].steps_per_block == [0]


def test_an_eos_ends_a_text_hole_and_pads_its_rest(tiny):
    engine, tok = tiny
    plan = layout("a {{t:text:4}} b {{u:text:3}}", tok, engine, engine.sampler_settings())
    t, u = plan.slots[1].start, plan.slots[3].start
    ids = plan.blocks[0].tokens.clone()
    ids[t:t + 4] = torch.tensor([10, 5, 11, 12])
    ids[u:u + 3] = torch.tensor([13, 14, 1])
    out = plan.finish(0, ids[None])[0].tolist()
    assert out[t:t + 4] == [10, 5, 0, 0] and out[u:u + 3] == [13, 14, 1]
    text, holes = plan.read(out)
    assert holes == {"t": tok.decode([10]), "u": tok.decode([13, 14])} and text == f"a {holes['t']} b {holes['u']}"


def test_an_eos_in_a_hole_that_spans_two_canvases_pads_it_in_the_next(tiny):
    engine, tok = tiny
    plan = layout("{{t:text:300}}", tok, engine, engine.sampler_settings())
    first, second = torch.full((1, 256), 10), torch.full((1, 256), 11)
    first[0, 200] = 1  # <eos>
    assert plan.finish(0, first)[0, 201:].eq(0).all() and plan.finish(1, second)[0, :44].eq(0).all()
    assert plan.finish(0, torch.full((1, 256), 10))[0].eq(10).all()  # a new generation starts afresh
    assert plan.finish(1, second)[0, :44].eq(11).all()


def test_token_level_template_keeps_its_pins(tiny):
    engine, tok = tiny
    seed = tok.encode("the water is blue and the sun")
    pinned = [1, 1, 0, 0, 1, 1, 0]
    t = template_from(seed_canvas=seed, pinned=pinned)
    r = dgcli.fill(engine, tok, "hi", t, seed=1, **FAST)
    ids = r.done.token_ids
    assert [ids[i] for i in range(7) if pinned[i]] == [s for s, p in zip(seed, pinned) if p]
    with pytest.raises(TemplateError, match="outside the vocabulary"):
        layout(template_from(seed_canvas=[10**6], pinned=[1]), tok, engine, engine.sampler_settings())


def test_bad_templates_fail_before_any_compute(tiny):
    engine, tok = tiny
    with pytest.raises(TemplateError, match="longer than the model's context"):
        dgcli.fill(engine, tok, "hi", "{{text:9000}}")
    with pytest.raises(TemplateError, match="are the same tokens"):  # tiny's tokenizer lowercases
        dgcli.fill(engine, tok, "hi", "{{choice:Cat|cat}}")
    with pytest.raises(dgcli.errors.ContextLengthError, match="shorten the prompt or the template"):
        dgcli.fill(engine, tok, "hi " * 8000, "{{text:4}}")


def test_canvas_view_draws_pins_apart(tiny):
    console = Console(file=io.StringIO(), width=100, force_terminal=True, record=True)
    view = CanvasView(console, lambda ids: [f" w{i}" for i in ids])
    ev = StepEvent(block=0, step=1, max_steps=4, canvas=[1, 2, 3], accepted=[True, False, True], argmax=[1, 2, 3],
                   entropy=[0.0] * 3, temperature=0.5, stopped=False, seconds=0.01, pinned=[True, False, False])
    text = view.canvas_text(ev)
    assert {text.plain[s.start:s.end]: s.style for s in text.spans}[" w1"] == PINNED
    console.print(view.status(ev))
    assert "1/2 accepted this step" in console.export_text()  # the holes' count: pins are not counted


def test_chat_fill_command(tiny):
    from test_repl import make_repl

    repl, out = make_repl(tiny, "/fill Pet: {{choice:cat|dog}}, age {{int:2}}", "/fill {{text:0}}", "/show")
    repl.run()
    text = out.getvalue()
    answer = repl.session.messages[1]["content"]
    assert answer.startswith("Pet: ") and answer.split(",")[0] in ("Pet: cat", "Pet: dog") and answer in text
    assert "error: text:N needs a whole number N >= 1" in text and len(repl.session.messages) == 2

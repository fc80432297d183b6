import json
import shutil

import pytest

from dgcli.errors import CheckpointError, DgError
from dgcli.tokenizer import Tokenizer

MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture
def ckpt(tiny_dir, tmp_path):
    dest = tmp_path / "tok"
    dest.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_dir / name, dest / name)
    return dest


def test_template_sources(ckpt):
    jinja = (ckpt / "chat_template.jinja").read_text()
    want = Tokenizer.from_dir(ckpt).apply_chat_template(MSGS)
    (ckpt / "chat_template.jinja").unlink()
    assert Tokenizer.from_dir(ckpt).chat_template is None
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": jinja}]
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_dir(ckpt).apply_chat_template(MSGS) == want
    (ckpt / "chat_template.json").write_text(json.dumps({"chat_template": jinja}))
    assert Tokenizer.from_dir(ckpt).apply_chat_template(MSGS) == want


def test_no_template_and_bad_templates(ckpt):
    (ckpt / "chat_template.jinja").unlink()
    with pytest.raises(DgError, match="no chat template.*--raw"):
        Tokenizer.from_dir(ckpt).apply_chat_template(MSGS)
    (ckpt / "chat_template.jinja").write_text("{{ raise_exception('only user turns') }}")
    with pytest.raises(DgError, match="only user turns"):
        Tokenizer.from_dir(ckpt).apply_chat_template(MSGS)
    # the sandbox refuses to reach Python internals from a template
    (ckpt / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(DgError, match="chat template failed"):
        Tokenizer.from_dir(ckpt).apply_chat_template(MSGS)
    (ckpt / "chat_template.jinja").write_text("{% if %}")
    with pytest.raises(CheckpointError, match="syntax error"):
        Tokenizer.from_dir(ckpt).apply_chat_template(MSGS)


def test_missing_or_broken_tokenizer(ckpt):
    (ckpt / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="could not be read"):
        Tokenizer.from_dir(ckpt)
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json not found"):
        Tokenizer.from_dir(ckpt)


def test_round_trip_and_specials(tiny):
    _, tok = tiny
    ids = tok.encode("the sea is deep")
    assert tok.decode(ids) == "the sea is deep"
    assert tok.encode("<|turn>user")[0] == 4  # a special token is one id
    assert [tok.decode([i], skip_special_tokens=False) for i in (4, 5)] == ["<|turn>", "<turn|>"]
    assert tok.decode([4, 9, 5]) == tok.decode([9])  # specials are skipped in text

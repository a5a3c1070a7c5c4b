"""Prompt sets: built-ins, file loaders, deduplication, deterministic splits, chat formatting (with a
thinking model's template kwargs and response prefix)."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_tokenizer
from obliteratus.batching import encode_prompts
from obliteratus.commands.common import gather
from obliteratus.data import builtin_path, dedupe, format_prompts, heldout_text, load_prompts, split_prompts
from obliteratus.data.prompts import encode_chat, encode_texts, uses_template
from obliteratus.errors import ConfigError, PromptError
from obliteratus.settings import resolve_settings


@pytest.fixture(scope="module")
def builtin():
    return {name: load_prompts(f"builtin:{name}") for name in ("harmful", "harmless", "benign_sensitive")}


def keys(prompts):
    return {p.casefold() for p in prompts}


def test_builtin_sets(builtin):
    assert len(builtin["harmful"]) >= 256
    assert len(builtin["harmless"]) >= 256
    assert not keys(builtin["harmful"]) & keys(builtin["harmless"])
    sensitive = keys(builtin["benign_sensitive"])
    assert sensitive <= keys(builtin["harmless"])
    assert len(sensitive) >= 0.15 * len(builtin["harmless"])
    for prompts in builtin.values():
        assert prompts == dedupe(prompts)  # already clean


def test_builtin_unknown_name():
    with pytest.raises(PromptError, match="harmful"):
        builtin_path("evil")
    with pytest.raises(PromptError):
        load_prompts("builtin:evil")


def test_heldout_text():
    text = heldout_text()
    assert len(text.split()) > 200


def test_dedupe():
    raw = ["  Hello   world ", "hello world", "HELLO\tWORLD", "", "   ", "Second one", "second  ONE", "Third"]
    assert dedupe(raw) == ["Hello world", "Second one", "Third"]
    assert dedupe([]) == []


def test_split_is_deterministic_disjoint_and_sized(builtin):
    prompts = builtin["harmful"]
    a = split_prompts(prompts, 100, 30, 60, seed=0)
    b = split_prompts(prompts, 100, 30, 60, seed=0)
    c = split_prompts(prompts, 100, 30, 60, seed=1)
    assert a == b
    assert a.train != c.train and a.test != c.test
    for s in (a, c):
        assert (len(s.train), len(s.val), len(s.test)) == (100, 30, 60)
        parts = [set(s.train), set(s.val), set(s.test)]
        assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
        assert set().union(*parts) <= set(prompts)
    # exactly enough prompts is fine
    n = len(prompts)
    full = split_prompts(prompts, n - 2, 1, 1, seed=3)
    assert sorted(full.train + full.val + full.test) == sorted(prompts)


def test_split_too_few_prompts():
    with pytest.raises(PromptError, match="4 distinct prompts"):
        split_prompts(["a", "b", "c", "d"], 2, 2, 1, seed=0, name="harmful")


def test_load_txt(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first prompt\n\nsecond prompt\nFIRST   prompt\n", encoding="utf-8")
    assert load_prompts(str(path)) == ["first prompt", "second prompt"]


def test_load_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "alpha", "x": 1}, {"prompt": "beta"}, {"prompt": "alpha"}, {"text": "no prompt here"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_prompts(str(path)) == ["alpha", "beta"]
    other = tmp_path / "q.jsonl"
    other.write_text('{"question": "one"}\n{"question": "two"}\n', encoding="utf-8")
    assert load_prompts(str(other), column="question") == ["one", "two"]
    broken = tmp_path / "bad.jsonl"
    broken.write_text('{"prompt": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(PromptError, match="invalid JSON"):
        load_prompts(str(broken))


def test_jsonl_error_names_the_file_line(tmp_path):
    broken = tmp_path / "bad.jsonl"
    broken.write_text('{"prompt": "ok"}\n{"prompt": "fine"}\n{not json\n', encoding="utf-8")
    with pytest.raises(PromptError, match="line 3"):
        load_prompts(str(broken))


def test_load_csv_with_column(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('id,goal,target\n1,"Do the thing, quickly",x\n2,Another goal,y\n3,,z\n', encoding="utf-8")
    assert load_prompts(str(path), column="goal") == ["Do the thing, quickly", "Another goal"]
    with pytest.raises(PromptError) as err:
        load_prompts(str(path), column="prompt")
    message = str(err.value)
    assert "'prompt'" in message and "id, goal, target" in message


def test_empty_and_single_prompt_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(PromptError, match="empty"):
        load_prompts(str(empty))
    one = tmp_path / "one.txt"
    one.write_text("just one\nJust One\n", encoding="utf-8")
    with pytest.raises(PromptError, match="one distinct prompt"):
        load_prompts(str(one))
    with pytest.raises(PromptError, match="not found"):
        load_prompts(str(tmp_path / "missing.txt"))
    other = tmp_path / "prompts.md"
    other.write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(PromptError, match="unsupported"):
        load_prompts(str(other))


def test_format_prompts_with_template(tokenizer):
    out = format_prompts(tokenizer, ["hello", "bye"])
    assert out == ["<|user|>hello\n<|assistant|>", "<|user|>bye\n<|assistant|>"]
    with_system = format_prompts(tokenizer, ["hello"], system_prompt="Be brief.")
    assert with_system == ["<|system|>Be brief.\n<|user|>hello\n<|assistant|>"]
    assert uses_template(tokenizer, True)


def test_format_prompts_raw(tokenizer):
    assert format_prompts(tokenizer, ["hello", "bye"], chat_template=False) == ["hello", "bye"]
    assert not uses_template(tokenizer, False)


def test_format_prompts_without_template(tokenizer):
    plain = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, pad_token="<pad>")
    plain.chat_template = None
    assert format_prompts(plain, ["hello"]) == ["hello"]
    assert not uses_template(plain, True)


def test_test_split_does_not_depend_on_training_size():
    from obliteratus.data.prompts import split_prompts

    prompts = [f"prompt {i}" for i in range(50)]
    a = split_prompts(prompts, 10, 5, 8, seed=3)
    b = split_prompts(prompts, 30, 2, 8, seed=3)
    assert a.test == b.test and a.train != b.train
    assert split_prompts(prompts, 10, 5, 8, seed=4).test != a.test


def test_split_spare_is_the_rest_and_in_no_part(builtin):
    prompts = builtin["harmful"]
    s = split_prompts(prompts, 100, 30, 60, seed=0)
    assert len(s.spare) == len(prompts) - 190
    assert not set(s.spare) & (set(s.train) | set(s.val) | set(s.test))
    assert set(s.spare) | set(s.train) | set(s.val) | set(s.test) == set(prompts)
    # a larger train part takes its extra prompts from the front of the spare ones; the rest stay spare
    wider = split_prompts(prompts, 110, 30, 60, seed=0)
    assert wider.test == s.test and wider.val == s.val and wider.spare == s.spare[10:]


@pytest.mark.parametrize("name, data, needle", [
    ("p.txt", b"ok\n\xff\xfe\n", "not UTF-8"),
    ("p.txt", b"a\x00b\nc\n", "NUL bytes"),
    ("p.jsonl", b"1\n2\n", "not a JSON object"),
    ("p.jsonl", b'["a"]\n', "not a JSON object"),
    ("p.csv", b"prompt\n\xe9\n", "not UTF-8"),
])
def test_unreadable_prompt_files_name_the_problem(tmp_path, name, data, needle):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(PromptError, match=needle):
        load_prompts(str(tmp_path / name))


def test_a_directory_is_not_a_prompt_file(tmp_path):
    for name in ("d.txt", "d"):
        (tmp_path / name).mkdir()
        with pytest.raises(PromptError, match="directory"):
            load_prompts(str(tmp_path / name))


def test_csv_with_a_byte_order_mark_has_its_prompt_column(tmp_path):
    (tmp_path / "p.csv").write_bytes(b"\xef\xbb\xbfprompt\nhello\nworld\n")
    assert load_prompts(str(tmp_path / "p.csv")) == ["hello", "world"]


# ------------------------------------------------------------------ thinking models: template kwargs, prefix

THINKING_TEMPLATE = (  # Qwen3's switch, in the tiny tokenizer's turn format
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
    "{% if reasoning_effort is defined and reasoning_effort not in ['low', 'high'] %}"
    "{{ raise_exception('reasoning_effort must be low or high') }}{% endif %}"
)
EMPTY_THOUGHT = "<think>\n\n</think>\n\n"


def thinking_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = THINKING_TEMPLATE
    return tok


def test_template_kwargs_reach_the_template_and_the_prefix_follows_the_generation_prompt():
    tok = thinking_tokenizer()
    assert format_prompts(tok, ["hi"]) == ["<|user|>hi\n<|assistant|>"]  # defaults: as before
    assert format_prompts(tok, ["hi"], True, None, {}, "") == ["<|user|>hi\n<|assistant|>"]
    assert format_prompts(tok, ["hi"], template_kwargs={"enable_thinking": False}) == [
        f"<|user|>hi\n<|assistant|>{EMPTY_THOUGHT}"]
    assert format_prompts(tok, ["hi"], template_kwargs={"enable_thinking": True}) == ["<|user|>hi\n<|assistant|>"]
    assert format_prompts(tok, ["hi", "yo"], system_prompt="S.", response_prefix=EMPTY_THOUGHT) == [
        f"<|system|>S.\n<|user|>hi\n<|assistant|>{EMPTY_THOUGHT}",
        f"<|system|>S.\n<|user|>yo\n<|assistant|>{EMPTY_THOUGHT}"]
    assert format_prompts(tok, ["hi"], chat_template=False, response_prefix="A:") == ["hiA:"]  # raw: appended too


def test_bad_template_kwargs_are_one_config_error_naming_the_key():
    tok = thinking_tokenizer()
    with pytest.raises(ConfigError, match="never reads 'enable_thinkng'"):  # jinja would ignore the typo
        format_prompts(tok, ["hi"], template_kwargs={"enable_thinkng": False})
    with pytest.raises(ConfigError, match="'tokenize' is an argument of apply_chat_template"):
        format_prompts(tok, ["hi"], template_kwargs={"tokenize": True})
    with pytest.raises(ConfigError, match="reasoning_effort = 'medium'.*must be low or high"):
        format_prompts(tok, ["hi"], template_kwargs={"enable_thinking": False, "reasoning_effort": "medium"})
    with pytest.raises(ConfigError, match="chat_template is off"):
        format_prompts(tok, ["hi"], chat_template=False, template_kwargs={"enable_thinking": False})


def test_encode_chat_and_encode_texts_use_the_kwargs_and_prefix():
    tok = thinking_tokenizer()
    kwargs = {"enable_thinking": False}
    texts = format_prompts(tok, ["hi", "longer prompt"], True, None, kwargs)
    want = encode_prompts(tok, texts, True).ids
    assert encode_chat(tok, ["hi", "longer prompt"], True, None, kwargs).ids == want
    settings = resolve_settings(None, {"data": {"template_kwargs": kwargs}})
    assert encode_texts(tok, settings, ["hi", "longer prompt"]).ids == want
    # a prompt with a special-token string keeps it as plain text; the prefix after it stays as configured
    forged = encode_chat(tok, ["a<eos>b"], True, None, kwargs, "<eos>").ids[0]
    assert tok.decode(forged) == format_prompts(tok, ["a<eos>b"], True, None, kwargs, "<eos>")[0]
    assert forged.count(tok.eos_token_id) == 1 and forged[-1] == tok.eos_token_id
    raw = encode_chat(tok, ["a<eos>b"], False, None, None, "<eos>").ids[0]
    assert raw.count(tok.eos_token_id) == 1 and raw[-1] == tok.eos_token_id


@pytest.mark.parametrize("sets, kwargs, prefix", [
    (["data.template_kwargs.enable_thinking=false"], {"enable_thinking": False}, ""),
    (["data.template_kwargs={enable_thinking = false, reasoning_effort = \"low\"}"],
     {"enable_thinking": False, "reasoning_effort": "low"}, ""),
    (['data.response_prefix="<think>\\n\\n</think>\\n\\n"'], {}, EMPTY_THOUGHT),  # a TOML string: escapes work
])
def test_the_settings_take_kwargs_and_prefix_from_set(sets, kwargs, prefix):
    data = resolve_settings(None, gather({}, sets)).data
    assert (data.template_kwargs, data.response_prefix) == (kwargs, prefix)
    env = resolve_settings(None, None, {"OBLITERATUS_DATA__TEMPLATE_KWARGS__ENABLE_THINKING": "false"}).data
    assert env.template_kwargs == {"enable_thinking": False}

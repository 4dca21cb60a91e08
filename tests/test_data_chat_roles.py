"""A chat template that rejects a conversation's turn order: the error names file:line, the turn and its role,
and the fix (reorder/merge the turns, or a named prompt style), instead of blaming the template."""

from __future__ import annotations

import json

import jinja2
import pytest
from data_support import CHATML_TEMPLATE, FIXTURES, StubTokenizer

from leantune.data import Chat, DataError

ROLE_ORDER = FIXTURES / "bad" / "chat_role_order.jsonl"  # line 2 starts with an assistant greeting
# Like SmolLM2's template: a default system turn is written inside the loop, before the first message.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Like Llama 2's and Mistral's templates: roles must alternate, starting with the user.
STRICT_TEMPLATE = (
    "{% set offset = 1 if messages and messages[0]['role'] == 'system' else 0 %}"
    "{% for m in messages[offset:] %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% endfor %}" + CHATML_TEMPLATE
)


class RaisingTokenizer(StubTokenizer):
    """Renders with transformers' `raise_exception` helper, as leantune's Tokenizer does."""

    def apply_chat_template(self, messages, add_generation_prompt=True):
        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = jinja2.Environment()
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(messages=messages,
                                                          add_generation_prompt=add_generation_prompt)


def setup_chat(path, tok, style="template", **kw):
    data = Chat(json_path=path, val_split_fraction=0.0, **kw)
    data.connect(tok, prompt_style=style)
    data.setup()
    return data


def assert_names_turn(message, path, line, problem):
    assert message.startswith(f"{path}:{line}: the chat template cannot render this conversation: {problem}. ")
    assert "Reorder or merge the turns" in message and "--prompt_style" in message
    assert "does not render conversations incrementally" not in message  # not the template's fault


@pytest.mark.parametrize("template", [DEFAULT_SYSTEM_TEMPLATE, STRICT_TEMPLATE])
def test_assistant_first_names_the_turn(template):
    tok = RaisingTokenizer(use_bos=False, chat_template=template, eos_ids=[2, 4])
    with pytest.raises(DataError) as e:
        setup_chat(ROLE_ORDER, tok)
    assert_names_turn(str(e.value), ROLE_ORDER, 2,
                      "turn 0 is 'assistant', but a conversation must start with a 'user' turn")
    assert e.value.line == 2


def test_consecutive_turns_counted_as_in_the_file_even_with_a_default_system_prompt(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"conversations": [{"from": "human", "value": "One."}, {"from": "human", "value": "Two."},
                               {"from": "gpt", "value": "Three."}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = RaisingTokenizer(use_bos=False, chat_template=STRICT_TEMPLATE, eos_ids=[2, 4])
    with pytest.raises(DataError) as e:
        setup_chat(path, tok, system_prompt="Be brief.")
    assert_names_turn(str(e.value), path, 2, "turn 1 is 'user' right after turn 0 ('user'); roles must alternate")


def test_named_style_accepts_any_order_and_skip_invalid_counts():
    tok = StubTokenizer(use_bos=False, eos_ids=[2, 4])
    assert len(setup_chat(ROLE_ORDER, tok, style="chatml").train_dataset) == 2
    strict = RaisingTokenizer(use_bos=False, chat_template=STRICT_TEMPLATE, eos_ids=[2, 4])
    with pytest.warns(UserWarning, match="skipped 1 sample"):
        data = setup_chat(ROLE_ORDER, strict, skip_invalid=True)
    assert len(data.train_dataset) == 1


def test_role_order_problem():
    from leantune.data.sft import role_order_problem

    def conv(*roles):
        return [{"role": r, "content": "x"} for r in roles]

    assert role_order_problem(conv("system", "user", "assistant", "user", "assistant")) is None
    assert role_order_problem(conv("user", "assistant", "user")) is None
    assert role_order_problem(conv("system", "assistant")) == (
        "turn 1 is 'assistant', but a conversation must start with a 'user' turn (after the system turn)")
    assert role_order_problem(conv("user", "assistant", "assistant")) == (
        "turn 2 is 'assistant' right after turn 1 ('assistant'); roles must alternate")


def test_default_model_template(default_checkpoint):
    from leantune.tokenizer import Tokenizer

    with pytest.raises(DataError) as e:
        setup_chat(ROLE_ORDER, Tokenizer(default_checkpoint), style=None)
    assert_names_turn(str(e.value), ROLE_ORDER, 2,
                      "turn 0 is 'assistant', but a conversation must start with a 'user' turn")

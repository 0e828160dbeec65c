"""rinna's instruction chat format (neoxja.chat): prompts exactly as the model cards build them, replies
turned back into plain text, and clear errors for malformed messages."""
import pytest

from neoxja.chat import build_prompt, parse_reply
from neoxja.errors import InputError
from rinna_fixtures import PPO_CONVERSATION, PPO_MESSAGES, PPO_PROMPT, PPO_REPLY


def test_ppo_card_prompt():
    assert build_prompt(PPO_MESSAGES) == PPO_PROMPT


def test_card_recipe_matches():
    # The card's own construction, for any conversation: "<NL>".join(turns) + "<NL>" + "システム: ".
    card = "<NL>".join(f"{speaker}: {text}" for speaker, text in PPO_CONVERSATION) + "<NL>" + "システム: "
    assert build_prompt(PPO_MESSAGES) == card


def test_single_turn_has_no_leading_separator():
    assert build_prompt([{"role": "user", "content": "日本の首都は？"}]) == "ユーザー: 日本の首都は？<NL>システム: "


def test_newlines_inside_a_turn_become_nl():
    messages = [{"role": "user", "content": "一行目\n二行目\r\n三行目\r四行目"}]
    assert build_prompt(messages) == "ユーザー: 一行目<NL>二行目<NL>三行目<NL>四行目<NL>システム: "


def test_without_generation_prompt_the_last_turn_stays_open():
    messages = PPO_MESSAGES[:2]
    assert build_prompt(messages, add_generation_prompt=False) == (
        "ユーザー: コンタクトレンズを慣れるにはどうすればよいですか？<NL>"
        "システム: これについて具体的に説明していただけますか？何が難しいのでしょうか？"
    )


def test_system_message_becomes_a_user_turn_in_front():
    messages = [{"role": "system", "content": "丁寧に答えてください。"}, {"role": "user", "content": "こんにちは"}]
    assert build_prompt(messages) == "ユーザー: 丁寧に答えてください。<NL>ユーザー: こんにちは<NL>システム: "


def test_content_is_kept_verbatim():
    # No stripping or space folding: the prompt carries exactly what the caller wrote.
    messages = [{"role": "user", "content": "  空白  "}, {"role": "assistant", "content": ""}]
    assert build_prompt(messages) == "ユーザー:   空白  <NL>システム: <NL>システム: "


def test_parse_reply_ppo_card():
    assert parse_reply(PPO_REPLY) == PPO_REPLY.removesuffix("</s>")


def test_parse_reply_newlines_and_whitespace():
    assert parse_reply(" はい。<NL>1. 一つ目<NL>2. 二つ目 </s>") == "はい。\n1. 一つ目\n2. 二つ目"


def test_parse_reply_stops_at_eos_and_invented_user_turn():
    assert parse_reply("答えです。</s>ユーザー: 続き") == "答えです。"
    assert parse_reply("答えです。<NL>ユーザー: 次の質問<NL>システム: ") == "答えです。"
    assert parse_reply("答え<|endoftext|>余り", eos_token="<|endoftext|>") == "答え"


def test_round_trip_of_a_multiline_reply():
    reply = "一行目\n\n三行目"
    prompt = build_prompt([{"role": "user", "content": "質問"}, {"role": "assistant", "content": reply}],
                          add_generation_prompt=False)
    assert parse_reply(prompt.split("システム: ", 1)[1]) == reply


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "empty"),
        ("ユーザー: こんにちは", "list"),
        ([("user", "hi")], r"messages\[0\] must be a dict"),
        ([{"role": "tool", "content": "x"}], "role 'tool'"),
        ([{"content": "x"}], "role None"),
        ([{"role": "user", "content": None}], "content must be a string"),
        ([{"role": "user", "content": "ok"}, {"role": "user", "content": [{"type": "text", "text": "x"}]}],
         r"messages\[1\] \(user\) content must be a string"),
    ],
)
def test_invalid_messages(messages, message):
    with pytest.raises(InputError, match=message):
        build_prompt(messages)


def test_parse_reply_needs_text():
    with pytest.raises(InputError, match="str"):
        parse_reply([1, 2, 3])

from avatarchat.pipeline.history import History, approx_tokens, script_language, with_language_cue


def test_messages_start_with_system_prompt_and_end_with_user() -> None:
    h = History("sys", budget=1000)
    h.add("user", "hi")
    h.add("assistant", "hello")
    assert h.messages("how are you") == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you"},
    ]


def test_budget_drops_oldest_pairs() -> None:
    h = History("sys", budget=60)
    for i in range(20):
        h.add("user", f"question number {i} " * 3)
        h.add("assistant", f"answer number {i} " * 3)
    assert h.tokens <= 60
    roles = [m.role for m in h.turns]
    assert roles[0] == "user"
    assert "answer number 19" in h.turns[-1].content


def test_empty_assistant_text_is_not_stored() -> None:
    h = History("sys", budget=100)
    h.add("assistant", "")
    assert h.turns == []


def test_approx_tokens_counts_cjk_per_character() -> None:
    assert approx_tokens("你好世界") >= 4
    assert approx_tokens("hello world, this is text") < 10


def test_replace_last_reply_keeps_only_what_was_heard() -> None:
    h = History("sys", 1000)
    h.add("user", "tell me a story")
    h.add("assistant", "Once upon a time there was a dragon. It was big.")
    assert h.replace_last_reply("Once upon a time")
    assert [m.content for m in h.turns] == ["tell me a story", "Once upon a time"]
    assert h.replace_last_reply("")  # nothing was heard: the reply goes
    assert [m.role for m in h.turns] == ["user"]
    assert not h.replace_last_reply("x")  # the newest message is the user's: nothing to replace


def test_language_cue_follows_the_script_of_the_message() -> None:
    assert script_language("请问上海有什么好吃的？") == "zh"
    assert script_language("What is your favorite color?") == "en"
    assert script_language("我喜欢 Python 和 Vue") == "zh"  # mostly hanzi: one Latin word does not switch it
    assert script_language("I love 北京 so much, really") == "en"
    assert script_language("") == "en"
    assert with_language_cue("Hi there").endswith("(Answer in English.)")
    assert with_language_cue("你好").endswith("（请用简体中文回答。）")


def test_after_a_barge_in_the_prompt_leaves_out_the_interrupted_exchange() -> None:
    h = History("sys", 1000)
    h.add("user", "hi")
    h.add("assistant", "hello")
    h.add("user", "tell me a story")
    h.add("assistant", "Once upon a time there was a dragon. It was big.")
    assert h.replace_last_reply("Once upon a time", interrupted=True)
    # Kept in the history, left out of the next prompt: the new question is answered, not the old story.
    assert [m.content for m in h.turns][-1] == "Once upon a time"
    assert [m["content"] for m in h.messages("what is the biggest ocean?")] == [
        "sys", "hi", "hello", "what is the biggest ocean?"]
    # Unless the person refers back to it.
    for back in ("Can you repeat that?", "Go on, please.", "请继续讲。"):
        assert [m["content"] for m in h.messages(back)][-2:] == ["Once upon a time", back]
    # Nothing heard: the story's question goes from the prompt too.
    h.replace_last_reply("", interrupted=True)
    assert [m["content"] for m in h.messages("and the moon?")] == ["sys", "hi", "hello", "and the moon?"]
    # Once the next exchange is in, everything is context again.
    h.add("user", "and the moon?")
    h.add("assistant", "It is far.")
    assert [m["content"] for m in h.messages("thanks")] == [
        "sys", "hi", "hello", "tell me a story", "and the moon?", "It is far.", "thanks"]
    # A reply replaced for another reason (not interrupted) stays in the prompt.
    h.replace_last_reply("It is far away.")
    assert h.messages("ok")[-2]["content"] == "It is far away."

from avatarchat.pipeline.segmenter import Segmenter, count_words, split_text


def stream(tokens: list[str], **kw: int) -> list[str]:
    seg = Segmenter(**kw)
    out: list[str] = []
    for t in tokens:
        out += seg.push(t)
    return out + list(seg.flush())


def test_english_sentences_and_first_clause() -> None:
    assert split_text("Hello there, how are you? I am fine. Thanks!") == [
        "Hello there,",
        "how are you?",
        "I am fine.",
        "Thanks!",
    ]


def test_only_the_first_piece_is_cut_at_a_clause() -> None:
    pieces = split_text("Sure thing, here we go. Later, we can talk, if you like.")
    assert pieces == ["Sure thing,", "here we go.", "Later, we can talk, if you like."]


def test_chinese_sentence_ends() -> None:
    text = "你好，我是你的数字人助手。今天天气很好！你想聊什么？我们可以聊天；也可以唱歌"
    assert split_text(text) == ["你好，", "我是你的数字人助手。", "今天天气很好！", "你想聊什么？", "我们可以聊天；", "也可以唱歌"]


def test_chinese_first_clause_cut() -> None:
    assert split_text("好的，我们现在开始吧。然后继续。")[0] == "好的，"


def test_newline_ends_a_piece() -> None:
    assert split_text("First line\nSecond line") == ["First line", "Second line"]


def test_numbers_and_abbreviations_are_not_ends() -> None:
    assert split_text("Pi is 3.14 today. See e.g. this file.txt now. Dr. Who waves.") == [
        "Pi is 3.14 today.",
        "See e.g. this file.txt now.",
        "Dr. Who waves.",
    ]


def test_streaming_cuts_first_piece_after_about_eight_words() -> None:
    tokens = "This is a long first sentence without any commas that goes on. Ok!".split(" ")
    pieces = stream([t if i == 0 else " " + t for i, t in enumerate(tokens)], first_max_words=8)
    assert count_words(pieces[0]) == 8
    assert pieces[1:] == ["commas that goes on.", "Ok!"]


def test_streaming_waits_for_the_character_after_a_dot() -> None:
    seg = Segmenter()
    assert list(seg.push("It costs 3.")) == []
    assert list(seg.push("5 euros. And")) == ["It costs 3.5 euros."]
    assert list(seg.flush()) == ["And"]


def test_closing_quotes_stay_with_their_sentence() -> None:
    assert split_text('He said "stop." Then left.') == ['He said "stop."', "Then left."]


def test_punctuation_only_pieces_are_dropped() -> None:
    assert split_text("... !!! Hello.") == ["Hello."]


def test_run_on_text_is_cut_at_a_space() -> None:
    pieces = split_text("word " * 100, first_max_words=1000)
    assert all(len(p) <= 300 for p in pieces) and len(pieces) >= 2


def test_first_piece_minimum_words() -> None:
    # A two-word first sentence would play out before the next piece is ready: it joins the next clause.
    assert split_text("The moon. It is a rock in the sky, and it shines.", first_min_words=3) == [
        "The moon. It is a rock in the sky,",
        "and it shines.",
    ]
    assert split_text("你好，我是你的数字人助手。今天天气很好！", first_min_words=3)[0] == "你好，我是你的数字人助手。"
    assert split_text("Hi!", first_min_words=3) == ["Hi!"]  # a short reply is still spoken, at the end


def test_second_piece_is_also_cut_early_with_a_doubled_word_limit() -> None:
    text = "The moon is a rock, and it circles the earth once a month while it slowly turns around its own axis too."
    words = text.split()
    tokens = [w + " " for w in words]  # streamed word by word, as an LLM does
    pieces = stream(tokens, first_max_words=4, first_min_words=3, eager_pieces=2)
    assert pieces[0] == "The moon is a rock,"
    # Piece 2 has no clause boundary: it is cut at 2 × 4 words; the rest is one ordinary piece.
    assert pieces[1] == " ".join(words[5:13])
    assert pieces[2] == " ".join(words[13:])
    # With one eager piece the long second sentence stays whole.
    assert stream(tokens, first_max_words=4, first_min_words=3)[1] == " ".join(words[5:])


def test_second_piece_cut_at_its_first_clause() -> None:
    text = "Sure thing, the moon is bright tonight, and the stars are out, so look up."
    assert split_text(text, first_max_words=6, first_min_words=1, eager_pieces=2) == [
        "Sure thing,",
        "the moon is bright tonight,",
        "and the stars are out, so look up.",
    ]


def test_streamed_punctuation_other_than_a_dot_cuts_at_once() -> None:
    seg = Segmenter(first_min_words=2)
    assert list(seg.push("你好")) == []
    assert list(seg.push("呀，")) == ["你好呀，"]  # no wait for the next token
    assert list(seg.push("今天天气很好。")) == ["今天天气很好。"]
    assert list(seg.push("Really?")) == ["Really?"]
    assert list(seg.push("It is 3.")) == []  # a dot still waits: 3.5
    assert list(seg.push("5 now! ")) == ["It is 3.5 now!"]


def test_an_open_quote_waits_for_its_closing_mark() -> None:
    seg = Segmenter(first_min_words=1)
    assert list(seg.push("他说“你好。")) == []
    assert list(seg.push("”然后")) == ["他说“你好。”"]
    seg = Segmenter(first_min_words=1)
    assert list(seg.push('She said "stop!')) == []
    assert list(seg.push('" Then')) == ['She said "stop!"']

import pytest

from parley.brain.llm.clauses import ClauseSplitter, split_sentences


def split_streamed(text: str, *, piece: int = 1, min_words: int | None = 4) -> list[str]:
    """Feed ``text`` ``piece`` characters at a time and collect every clause plus the rest."""
    splitter = ClauseSplitter(min_words=min_words)
    clauses: list[str] = []
    for start in range(0, len(text), piece):
        clauses += splitter.feed(text[start:start + piece])
    rest = splitter.flush()
    return [*clauses, rest] if rest else clauses


@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_sentences_split_wherever_the_deltas_fall(piece: int) -> None:
    text = "Hi there! A cleaning costs $4.50 per minute. Can I help with anything else?"
    assert split_streamed(text, piece=piece) == [
        "Hi there!", "A cleaning costs $4.50 per minute.", "Can I help with anything else?"]


def test_a_clause_is_returned_as_soon_as_the_space_after_it_arrives() -> None:
    splitter = ClauseSplitter()
    assert splitter.feed("Sure.") == []  # "Sure.x" would not be a sentence end: wait
    assert splitter.feed(" Let") == ["Sure."]
    assert splitter.feed(" me check") == []
    assert splitter.flush() == "Let me check"
    assert splitter.flush() == ""


def test_soft_punctuation_splits_only_long_enough_clauses() -> None:
    text = "Well, if you come in on Tuesday, we can fit you in; bring your card: it helps."
    assert split_streamed(text) == [
        "Well, if you come in on Tuesday,", "we can fit you in;", "bring your card: it helps."]
    assert split_streamed(text, min_words=None) == [text]
    assert split_streamed("Okay, so, yes.", min_words=2) == ["Okay, so,", "yes."]


@pytest.mark.parametrize("text", [
    "It costs $4.50 for the basic plan and $12.99 for the premium one.",
    "Your appointment with Dr. Smith is confirmed for Tuesday.",
    "We take most plans, e.g. Delta and Cigna, and i.e. many others too.",
    "The office opens at 10:30 on weekdays and at 9:00 on weekends.",
    "We have served 1,000 patients and 25,000 visits so far this year.",
    "Mr. and Mrs. Jones will see J. Smith at 3 p.m. tomorrow afternoon.",
    "Bring forms, cards, etc. and arrive early.",
    "Dr. Lee has a Ph.D. in orthodontics from the state university.",
    "The chair fits anyone up to 6 ft. 4 in. and 300 lbs. comfortably.",
    "The scan takes 20 min. at most and the results about 2 hrs. later.",
])
def test_numbers_times_and_abbreviations_do_not_split(text: str) -> None:
    assert split_streamed(text, min_words=None) == [text]
    assert split_streamed(text, piece=2, min_words=None) == [text]


def test_ambiguous_abbreviations_end_a_sentence_before_a_capital() -> None:
    assert split_streamed("Come at 9 a.m. Then we start.", min_words=None) == [
        "Come at 9 a.m.", "Then we start."]
    assert split_streamed("No. We are closed on Sunday.", min_words=None) == [
        "No.", "We are closed on Sunday."]
    assert split_streamed("She holds a Ph.D. She teaches too.", min_words=None) == [
        "She holds a Ph.D.", "She teaches too."]
    assert split_streamed("It is about 6 ft. The door is wider.", min_words=None) == [
        "It is about 6 ft.", "The door is wider."]


def test_closing_quotes_and_repeated_marks_stay_with_their_sentence() -> None:
    assert split_sentences('He said "come back soon." Really?! Yes... okay.') == [
        'He said "come back soon."', "Really?!", "Yes...", "okay."]


def test_commas_inside_numbers_are_not_soft_breaks() -> None:
    assert split_streamed("The total for all of it is 1,250 dollars, paid today.") == [
        "The total for all of it is 1,250 dollars,", "paid today."]

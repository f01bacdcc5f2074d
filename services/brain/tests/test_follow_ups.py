"""What a follow-up is (:func:`parley.brain.follow_ups.is_follow_up`), turn by turn."""

from __future__ import annotations

import pytest

from parley.brain.follow_ups import is_follow_up


@pytest.mark.parametrize("text", [
    "How much is it?", "Is it safe?", "What would that treatment cost me?",  # points back
    "How do I get there?", "Can I book one?", "How expensive is that?",
    "And Mastercard?", "What about Amex?", "And a whitening?",  # a fragment going on
    "Which days?", "For kids?", "Visa?",  # a fragment naming few words
    "Also weekends?", "Weekends too?", "Cleanings as well?",  # a fragment adding
    "My name is John Smith", "My phone number is 555-0134", "My name's Ana",  # particulars
    "My date of birth is March 3rd", "It's 555-0134",
    "How much?", "How long?", "When?", "How much do you charge?", "What's the price?",  # none
])
def test_a_turn_that_refers_back_or_names_nothing_is_a_follow_up(text: str) -> None:
    assert is_follow_up(text)


@pytest.mark.parametrize("text", [
    "Do you take Visa?",  # three words of three letters or more: it was a follow-up
    "Do you do teeth whitening?", "What are your hours?", "What time do you open on Monday?",
    "Is there parking?", "Are there any openings on Saturday?",  # "there" points at nothing
    "Do you have one hour slots?",  # "one" counts
    "And do you do deep cleanings?",  # a clause naming its own subject, though after "and"
    "Root canal and crown prices for kids?",  # a fragment naming many words
    "How much does teeth whitening cost at your office?",
    # adding to what was said, but asking of a subject of its own
    "Also, do you handle emergencies?", "Do you serve the suburbs too?",
    "Do you take Mastercard too?", "Do you do cleanings as well?",
    "Can you update my address?", "Is my name on the list?",  # asking of them, not telling
])
def test_a_turn_naming_its_own_subject_is_none(text: str) -> None:
    assert not is_follow_up(text)

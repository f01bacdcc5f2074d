from parley.gateway.twilio.relay_playback import RelayPlayback, spoken_characters


def test_spoken_characters_ignore_spacing_punctuation_and_case():
    assert spoken_characters(" Goodbye, Ana! 2 ") == "goodbyeana2"
    assert spoken_characters("I’m here, I'm") == "imhereim"


def test_spoken_characters_match_whichever_unicode_form_twilio_reports():
    # "café" sent composed, reported decomposed (e + U+0301), and a Hindi word whose vowel
    # signs are combining marks: the same spoken characters either way.
    assert spoken_characters("Un café.") == spoken_characters("Un café")
    assert spoken_characters("नमस्ते") != spoken_characters("नमसत")


def test_a_turn_finishes_once_its_last_words_were_played_and_the_speech_stopped():
    playback = RelayPlayback()
    assert playback.sent("t1", "Thanks for calling.", last=False) == []
    assert playback.speaking(True) == []
    assert playback.played("Thanks for calling.") == []
    assert playback.speaking(False) == []  # a pause before the last clause was even sent
    assert playback.sent("t1", " Goodbye!", last=True) == []
    assert playback.speaking(True) == []
    assert playback.played("Goodbye!") == []  # still speaking
    assert playback.speaking(False) == ["t1"]
    assert playback.speaking(False) == []  # once


def test_chunking_differs_from_the_tokens_sent():
    playback = RelayPlayback()
    playback.sent("t1", "Your table for four is booked", last=False)
    playback.sent("t1", " for seven thirty.", last=True)
    assert playback.played("Your table for four") == []
    assert playback.played("is booked for seven") == []
    assert playback.played("thirty.") == ["t1"]  # no speaker events at all: the text decides


def test_reports_that_match_nothing_are_ignored_and_lost_ones_are_skipped():
    playback = RelayPlayback()
    playback.sent("t1", "One moment.", last=True)
    playback.sent("t2", "Here it is. Anything else?", last=True)
    assert playback.played("Hi, Acme here.") == []  # none of the text sent
    assert playback.played("Anything else?") == ["t1", "t2"]  # t1's report never came


def test_the_greeting_finishes_once_twilio_stops_saying_it_reported_or_not():
    # Twilio says the welcome greeting on its own and has all of it at once: no pause in it
    # waits for more text, and whether tokensPlayed covers it is undocumented.
    playback = RelayPlayback()
    playback.greeting("t0", "Hi, Acme here.")
    assert playback.playing() == "t0"
    assert playback.speaking(True) == []
    playback.sent("t1", "Sure.", last=True)  # the caller spoke while it played
    assert playback.speaking(False) == ["t0"]  # its words never reported
    assert playback.playing() == "t1"
    playback = RelayPlayback()
    playback.greeting("t0", "Hi, Acme here.")
    assert playback.played("Hi, Acme here.") == ["t0"]  # reported, no speaker events


def test_an_interrupted_turn_never_finishes_and_an_empty_one_is_not_followed():
    playback = RelayPlayback()
    playback.sent("t1", "Thanks for calling. Goodbye!", last=True)
    playback.played("Thanks for calling.")
    playback.interrupted("t1")
    assert playback.played("Goodbye!") == []
    assert playback.sent("t2", "", last=True) == []
    assert playback.speaking(False) == []


def test_an_interrupted_turn_is_not_followed_again_but_a_new_utterance_of_it_is():
    playback = RelayPlayback()
    playback.sent("t3", "Let me check.", last=False)
    playback.interrupted("t3")
    # A clause the brain sent before it cancelled the turn: it must not take t4's reports.
    assert playback.sent("t3", " Anything else?", last=True) == []
    playback.sent("t4", "Done. Anything else?", last=True)
    assert playback.played("Done.") == []
    assert playback.played("Anything else?") == ["t4"]
    assert playback.cut_off("t3") and not playback.cut_off("t3.1")
    assert playback.sent("t3.1", "I can't transfer you right now.", last=True) == []
    assert playback.played("I can't transfer you right now.") == ["t3.1"]


def test_the_turn_playing_is_the_earliest_not_yet_reported_played_in_full():
    playback = RelayPlayback()
    assert playback.playing() == ""
    playback.sent("t3", "Sure. Let me transfer you.", last=True)
    playback.sent("t3.1", "I can't transfer you right now.", last=True)
    playback.speaking(True)
    assert playback.playing() == "t3"
    playback.played("Sure. Let me transfer you.")  # played; t3 finishes once the speech is off
    assert playback.playing() == "t3.1"
    playback.played("I can't transfer you right now.")
    assert playback.playing() == ""  # all played: the relay takes the last turn sent
    playback.sent("t4", "One moment.", last=False)  # superseded: its last clause never comes
    playback.played("One moment.")
    playback.sent("t5", "Sure.", last=True)
    assert playback.playing() == "t5"


def test_the_turn_playing_is_the_one_what_the_caller_heard_begins():
    playback = RelayPlayback()
    playback.sent("t1", "That comes to $95.", last=True)
    playback.played("That comes to")
    playback.played("ninety five dollars.")  # never covers "95": t1 stays unplayed
    playback.sent("t2", "Thanks for calling.", last=False)
    assert playback.playing() == "t1"  # nothing heard to go by
    assert playback.playing("Thanks for") == "t2"
    assert playback.playing("Something else") == "t1"  # heard matches no turn: as before
    playback.sent("t3", "Sure. Let me transfer you.", last=True)
    playback.sent("t3.1", "Sure. Let me check first.", last=True)
    playback.speaking(True)  # so that played turns stay until the speech is off
    playback.played("Thanks for calling.")  # t1 and t2 played (t1's report was lost)
    assert playback.playing("Sure. Let") == "t3"  # both begin so: the earliest not played
    playback.played("Sure. Let me transfer you.")
    assert playback.playing("Sure. Let") == "t3.1"
    playback.played("Sure. Let me check first.")
    assert playback.playing("Sure. Let") == "t3.1"  # all played: the latest it begins


def test_a_report_spanning_two_turns_plays_both_up_to_where_it_ends():
    """Twilio reports what it played in chunks of its own: one that ran from the end of a
    turn into the next matched neither turn alone, so neither finished and the hang-up after
    the second waited the tools service's 20 s."""
    playback = RelayPlayback()
    playback.sent("t1", "Your table is booked.", last=True)
    playback.sent("t1.1", " Anything else? Goodbye!", last=True)
    playback.speaking(True)
    assert playback.played("Your table is") == []
    assert playback.played("booked. Anything else?") == []
    assert playback.speaking(False) == ["t1"]  # t1.1 has words still to play
    assert playback.speaking(True) == []
    assert playback.played("Goodbye!") == []
    assert playback.speaking(False) == ["t1.1"]
    # A report that matches nowhere, even across turns, still changes nothing.
    playback.sent("t2", "Sure.", last=True)
    assert playback.played("Goodbye Sure") == []
    assert playback.playing() == "t2"

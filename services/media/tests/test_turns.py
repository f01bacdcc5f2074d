"""Turn detection on the audio clock: endpointing, flush, max wait, backchannels."""

from parley.common.configuration.models import AgentSettings
from parley.media.turns import (
    Backchannels,
    Flush,
    TurnDetector,
    TurnEnd,
    TurnSettings,
    words_of,
)


def run(detector: TurnDetector, start: int, end: int, **kw) -> list[object]:
    out = []
    for now in range(start, end, 20):
        result = detector.poll(now, **kw)
        if result is not None:
            out.append((now, result))
    return out


def test_silence_after_a_final_ends_the_turn_at_the_endpointing_delay() -> None:
    d = TurnDetector(TurnSettings(endpointing_ms=600))
    d.speech_started(1000)
    assert run(d, 1000, 2000) == []  # still speaking
    d.speech_stopped(2000)
    d.final("I'd like to book a cleaning.", 2100)
    results = run(d, 2000, 4000)
    now, end = results[0]
    assert isinstance(end, TurnEnd) and now == 2600
    assert (end.text, end.reason, end.eou_delay_ms, end.stt_final_ms, end.started_ms) == (
        "I'd like to book a cleaning.", "silence", 600, 100, 1000)
    assert len(results) == 1 and not d.in_turn


def test_recogniser_end_of_utterance_ends_after_half_the_silence() -> None:
    d = TurnDetector(TurnSettings(endpointing_ms=600))
    d.speech_started(0)
    d.speech_stopped(500)
    d.final("Hello there.", 600, speech_final=True)
    (now, end), = run(d, 500, 2000)
    assert now == 800 and end.reason == "utterance_end"


def test_a_lagging_recogniser_is_flushed_then_the_final_ends_the_turn() -> None:
    d = TurnDetector(TurnSettings(endpointing_ms=600, max_wait_ms=3000))
    d.speech_started(0)
    d.partial("what time do you")
    d.speech_stopped(1000)
    (now, flush), = run(d, 1000, 1700)
    assert now == 1600 and isinstance(flush, Flush)
    d.final("What time do you open?", 1750)
    (now, end), = run(d, 1700, 2500)
    assert end.text == "What time do you open?" and end.stt_final_ms == 750


def test_max_wait_ends_with_the_partial_and_noise_without_words_ends_nothing() -> None:
    d = TurnDetector(TurnSettings(endpointing_ms=600, max_wait_ms=2000))
    d.speech_started(0)
    d.partial("tomorrow at ten")
    d.speech_stopped(500)
    results = run(d, 500, 3000)
    assert isinstance(results[0][1], Flush)
    now, end = results[1]
    assert now == 2500 and (end.text, end.reason) == ("tomorrow at ten", "max_wait")

    d.speech_started(5000)
    d.speech_stopped(5200)  # a cough: no words ever come
    assert [type(r) for _, r in run(d, 5200, 8000)] == [Flush]
    assert not d.in_turn

    # Words with no partial before the max wait (a recogniser slower than it): taken for
    # noise at the max wait, then the late final opens the turn and ends it.
    d.speech_started(10_000)
    d.speech_stopped(11_000)
    assert [type(r) for _, r in run(d, 11_000, 13_200)] == [Flush]
    assert not d.in_turn
    d.final("see you then", 13_300, speech_final=True)
    end = d.poll(13_300)
    assert isinstance(end, TurnEnd) and (end.text, end.reason) == ("see you then",
                                                                    "utterance_end")
    assert end.eou_delay_ms == 2300


def test_speech_resuming_before_the_endpoint_continues_the_same_turn() -> None:
    d = TurnDetector(TurnSettings(endpointing_ms=600))
    d.speech_started(0)
    d.speech_stopped(1000)
    d.final("I need to move", 1100)
    assert run(d, 1000, 1400) == []
    d.speech_started(1400)
    d.speech_stopped(2400)
    d.final("my appointment to Friday.", 2500)
    (_, end), = run(d, 2400, 4000)
    assert end.text == "I need to move my appointment to Friday." and end.started_ms == 0


def test_backchannels_wait_longer_and_are_dropped_while_the_agent_speaks() -> None:
    d = TurnDetector(TurnSettings(endpointing_ms=600))
    d.speech_started(0)
    d.speech_stopped(400)
    d.final("Okay.", 450)
    assert run(d, 400, 1000) == []  # twice the silence for a lone backchannel
    (now, end), = run(d, 1000, 2000)
    assert now == 1600 and end.text == "Okay."

    d.speech_started(3000)
    d.speech_stopped(3400)
    d.final("Uh-huh.", 3450)
    assert run(d, 3400, 6000, agent_speaking=True) == []
    assert d.dropped_backchannels == 1 and not d.in_turn


def test_whether_the_agent_speaks_is_asked_only_of_a_backchannel_turn_that_ends() -> None:
    # The session passes a callable: working out whether the agent speaks, every frame, cost
    # more than the poll. It is asked once, when the lone backchannel ends, and its answer is
    # what counts.
    asked: list[int] = []

    def agent_speaking(answer: bool):
        return lambda: asked.append(1) or answer

    d = TurnDetector(TurnSettings(endpointing_ms=600))
    d.speech_started(0)
    d.speech_stopped(400)
    d.final("Okay.", 450)
    (now, end), = run(d, 0, 2000, agent_speaking=agent_speaking(False))
    assert now == 1600 and end.text == "Okay." and asked == [1]

    d.speech_started(3000)
    d.speech_stopped(3400)
    d.final("Uh-huh.", 3450)
    assert run(d, 3000, 6000, agent_speaking=agent_speaking(True)) == []
    assert d.dropped_backchannels == 1 and asked == [1, 1]

    d.speech_started(7000)
    d.speech_stopped(7400)
    d.final("I'd like to book a cleaning.", 7450)
    (_, end), = run(d, 7000, 9000, agent_speaking=agent_speaking(True))
    assert end.text == "I'd like to book a cleaning." and asked == [1, 1]  # not a backchannel


def test_backchannel_recognition() -> None:
    b = Backchannels()
    assert b.only_backchannel("Uh-huh.") and b.only_backchannel("okay, yeah")
    assert b.only_backchannel("Mm-hmm. Got it.")
    assert not b.only_backchannel("okay so I want to cancel")
    assert not b.only_backchannel("")
    assert b.content_words("Okay.") == 0 and b.content_words("wait, stop") == 2
    # Asked again and again (every frame) as the text changes, back and forth.
    for _ in range(2):
        assert b.only_backchannel("okay") and not b.only_backchannel("okay book it")
        assert b.content_words("okay") == 0 and b.content_words("okay book it") == 3


def test_backchannels_match_however_they_are_spelt() -> None:
    # A recogniser writes "OK." or "Mhm." for what an agent's list has as "okay" or "mm-hmm":
    # taken for words, they interrupted the agent (one content word is enough).
    configured = Backchannels(["uh-huh", "mm-hmm", "okay"])
    for text in ["OK.", "Ok, ok.", "Uh huh.", "Uhhuh", "Mhm.", "Mm hmm.", "mm-hm", "Mmhmm."]:
        assert configured.only_backchannel(text) and configured.content_words(text) == 0, text
    assert Backchannels(["uh huh", "ok", "mhm"]).only_backchannel("Uh-huh. Okay. Mm-hmm.")
    assert not configured.only_backchannel("Uh-uh.")  # no: an answer
    assert configured.content_words("OK, so I want to cancel.") == 6
    # What an agent gets by default: hesitations and acknowledgements are not the turn either.
    default = TurnDetector(TurnSettings(backchannels=tuple(AgentSettings().backchannels)))
    for text in ["Hmm.", "Mm.", "Got it.", "I see.", "Yep.", "Yup.", "Sure."]:
        assert default.backchannels.only_backchannel(text), text


def test_words_are_words_in_any_script() -> None:
    # Only [a-z0-9'] counted: a Russian or Hindi caller said no words, so words never barged in
    # on the agent and late finals never revised a turn.
    assert words_of("Подождите, пожалуйста, СТОП!") == ["подождите", "пожалуйста", "стоп"]
    assert words_of("मुझे रुकना है।") == ["मुझे", "रुकना", "है"]  # vowel signs inside words
    assert words_of("ちょっと待って") == ["ちょっと待って"]
    assert words_of("Ça va? C'est l'été, uh-huh.") == ["ça", "va", "c'est", "l'été", "uh-huh"]
    assert Backchannels().content_words("Подождите, стоп") == 2
    assert Backchannels(["да", "ага"]).only_backchannel("Ага, да.")


def test_late_words_in_another_script_revise_the_turn() -> None:
    d = TurnDetector(TurnSettings(endpointing_ms=600, max_wait_ms=2000))
    d.speech_started(0)
    d.partial("Завтра")
    d.speech_stopped(1000)
    (_, _), (_, end) = run(d, 1000, 3100)
    assert end.text == "Завтра"
    d.final("Завтра в десять утра.", 3500, speech_final=True)
    (_, revised), = run(d, 3500, 4000)
    assert revised.revises and revised.text == "Завтра в десять утра."


def test_words_after_a_max_wait_end_revise_that_turn() -> None:
    # A recogniser slower than the max wait (local Whisper on a starved CPU) delivers the
    # sentence's final after the turn ended with a stale partial: not a second turn, but the
    # whole turn again, replacing the one that ended on "Next." — once the utterance is over.
    d = TurnDetector(TurnSettings(endpointing_ms=600, max_wait_ms=2000))
    d.speech_started(0)
    d.partial("Next.")
    d.speech_stopped(3000)
    (_, flush), (_, end) = run(d, 3000, 5100)
    assert isinstance(flush, Flush) and isinstance(end, TurnEnd)
    assert (end.text, end.reason, end.revises) == ("Next.", "max_wait", False)
    assert d.late
    d.partial("Next Tuesday at")  # late partials change nothing
    d.final("Next Tuesday at three", 5300)
    assert run(d, 5300, 5400) == [] and not d.in_turn  # more may follow: not over yet
    d.final("would be perfect.", 5400, speech_final=True)
    (now, revised), = run(d, 5400, 9000)
    assert now == 5400 and revised.revises and revised.reason == "utterance_end"
    assert revised.text == "Next Tuesday at three would be perfect."
    assert (revised.speech_end_ms, revised.started_ms, revised.stt_final_ms) == (3000, 0, 2400)
    assert not d.in_turn and d.late_results == 3 and d.late

    d.speech_started(9000)  # the caller speaks again: a new turn, on time this time
    assert not d.late
    d.speech_stopped(9800)
    d.final("Thank you.", 9900)
    (_, end), = run(d, 9800, 11000)
    assert (end.text, end.reason) == ("Thank you.", "silence")


def test_late_words_revise_nothing_once_a_turn_of_keys_came_after() -> None:
    # "Next." ended at max wait; the caller then typed keys, a turn answered after it. The late
    # final would have replaced the keys' turn, not the stale one: it revises nothing.
    d = TurnDetector(TurnSettings(endpointing_ms=600, max_wait_ms=2000))
    d.speech_started(0)
    d.partial("Next.")
    d.speech_stopped(3000)
    (_, _), (_, end) = run(d, 3000, 5100)
    assert end.reason == "max_wait"
    d.turn_of_keys()
    d.final("Next Tuesday at three would be perfect.", 5400, speech_final=True)
    assert run(d, 5400, 9000) == []
    assert d.late_results == 1  # counted, and dropped


def test_a_late_final_that_says_no_more_revises_nothing() -> None:
    d = TurnDetector(TurnSettings(endpointing_ms=600, max_wait_ms=2000))
    d.speech_started(0)
    d.partial("tomorrow at ten")
    d.speech_stopped(1000)
    (_, _), (_, end) = run(d, 1000, 3100)
    assert end.text == "tomorrow at ten"
    d.final("Tomorrow at ten.", 3500, speech_final=True)
    assert run(d, 3500, 4000) == [] and d.late_results == 1


def test_a_turn_ended_on_time_leaves_nothing_late() -> None:
    d = TurnDetector(TurnSettings(endpointing_ms=600))
    d.speech_started(0)
    d.speech_stopped(1000)
    d.final("Hello.", 1100)
    (_, end), = run(d, 1000, 2000)
    assert end.reason == "silence" and not d.late and not end.revises
    d.final("Hello again.", 2100)  # the recogniser heard something the VAD missed: a turn
    assert d.in_turn


def test_a_late_final_that_comes_once_the_caller_spoke_again_stays_the_late_turns() -> None:
    # "Next." ended at max wait; the caller speaks again at 6000 before the final for the
    # first sentence (its words ending at 2900) arrives: it is that turn's, not the new one's.
    d = TurnDetector(TurnSettings(endpointing_ms=600, max_wait_ms=2000))
    d.speech_started(0)
    d.partial("Next.")
    d.speech_stopped(3000)
    (_, _), (_, end) = run(d, 3000, 5100)
    assert end.reason == "max_wait"
    d.speech_started(6000)
    d.partial("Next Tuesday")  # the late partial, shown before its final (results in order)
    d.final("Next Tuesday at three.", 6300, speech_final=True, heard_ms=2900)
    d.utterance_end(2900)
    assert d.late_results == 1 and d.text == ""
    d.partial("Thank")
    d.speech_stopped(6800)
    d.final("Thank you.", 6900, heard_ms=6700)
    (_, end), = run(d, 6800, 8000)
    assert (end.text, end.reason, end.revises) == ("Thank you.", "silence", False)


def test_a_turn_heard_again_by_a_new_recogniser_waits_for_it_from_then() -> None:
    # The recogniser failed and the next one opened 4 s after the caller went quiet (its
    # backoff, a slow open): it hears the turn replayed and its first partial comes at once,
    # its final a moment later. Counted from the speech's end, the max wait was long over:
    # the turn ended at once on that partial ("Book me") and its final came as a revision,
    # so the brain answered "Book me" and was then cancelled. The max wait counts from when
    # the new recogniser began hearing the turn.
    d = TurnDetector(TurnSettings(endpointing_ms=600, max_wait_ms=2500))
    d.speech_started(0)
    d.partial("book me in")
    d.speech_stopped(2000)
    d.recognition_restarted(6000)
    assert d.text == ""
    d.partial("Book me")
    # The flush asked of the new one at once; no end (before: at once, max wait, "Book me")
    assert run(d, 6000, 6700) == [(6000, Flush())]
    d.final("Book me in for Friday at ten.", 6700, speech_final=True)
    (now, end), = run(d, 6700, 7000)
    assert (now, end.text, end.reason, end.eou_delay_ms) == (
        6700, "Book me in for Friday at ten.", "utterance_end", 4700)
    assert not d.late


def test_a_turn_no_new_recogniser_finds_words_in_ends_nothing_at_its_max_wait() -> None:
    d = TurnDetector(TurnSettings(endpointing_ms=600, max_wait_ms=2500))
    d.speech_started(0)
    d.speech_stopped(500)
    d.recognition_restarted(4000)
    assert run(d, 4000, 6480) == [(4000, Flush())]
    assert run(d, 6480, 6520) == [] and not d.in_turn  # a noise: no turn

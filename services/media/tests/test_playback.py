"""Played position from mark echoes, heard text from word times, barge-in policy."""

from parley.media.playback import (
    ECHO_GRACE_S,
    GENERATION,
    AgentTurnAudio,
    BargeIn,
    Interrupt,
    Pause,
    Resume,
)
from parley.media.providers.base import WordTiming

FRAME = b"\x00" * 160


def turn_with(seconds: float, words: list[WordTiming]) -> AgentTurnAudio:
    turn = AgentTurnAudio("t1")
    turn.add_frames([FRAME] * int(seconds * 50), words, clause_start_s=0.0)
    turn.end_clause()
    turn.text_done = True
    return turn


def test_marks_go_after_the_first_frame_every_500_ms_and_at_the_end() -> None:
    turn = turn_with(1.3, [])
    marks = [mark for _, _, mark in turn.take_unsent() if mark is not None]
    assert marks == [1, 25, 50, 65]
    assert turn.take_unsent() == []


def test_position_follows_echoes_capped_by_the_next_unechoed_mark() -> None:
    turn = turn_with(2.0, [])
    turn.take_unsent()
    assert turn.position_ms(100.0) == 0  # nothing echoed: nothing known to have played
    turn.echo(1, 100.0)
    assert turn.position_ms(100.2) == 220
    assert turn.position_ms(105.0) == 500  # the carrier has not reached mark 25 yet
    turn.echo(25, 100.5)
    assert turn.position_ms(100.6) == 600
    turn.echo(100, 102.0)
    assert turn.finished and not turn.playing(102.0)


def test_heard_text_is_the_words_fully_played_before_the_cut() -> None:
    words = [WordTiming("Our", 0.0, 0.2), WordTiming("hours", 0.2, 0.5),
             WordTiming("are", 0.5, 0.7), WordTiming("nine", 0.7, 1.0),
             WordTiming("to", 1.0, 1.1), WordTiming("five", 1.1, 1.5)]
    turn = turn_with(1.6, words)
    turn.take_unsent()
    turn.echo(1, 10.0)
    turn.echo(25, 10.48)
    cut = turn.cut(10.70)  # 500 ms echoed + 220 ms since
    assert cut == 36
    assert turn.heard_text(cut * 20) == "Our hours are"


def test_resume_resends_from_the_cut_and_ignores_echoes_of_flushed_marks() -> None:
    turn = turn_with(1.0, [])
    turn.take_unsent()
    turn.echo(1, 0.0)
    cut = turn.cut(0.3)  # 20 ms echoed + 300 ms since
    assert cut == 16
    assert not turn.echo(25, 0.31)  # flushed by clear, echoed anyway: stale
    turn.resume()
    resent = turn.take_unsent()
    assert [i for i, _, _ in resent][0] == 16 and len(resent) == 34
    marks = [m for _, _, m in resent if m is not None]
    assert marks[0] == GENERATION + 17 and marks[-1] == GENERATION + 50
    assert not turn.echo(50, 0.5)  # old generation
    assert turn.echo(GENERATION + 50, 1.2) and turn.finished


def test_after_a_resume_playback_is_at_the_cut_until_the_first_echo() -> None:
    words = [WordTiming("Thank", 0.0, 0.3), WordTiming("you", 0.3, 0.5),
             WordTiming("for", 0.5, 0.7), WordTiming("calling", 0.7, 1.1)]
    turn = turn_with(2.0, words)
    turn.take_unsent()
    turn.echo(1, 10.0)
    turn.echo(25, 10.5)
    assert turn.cut(10.6) == 30  # 500 ms echoed + 100 ms since
    turn.resume()
    turn.take_unsent()
    # Paused again before the carrier echoes the resumed run's first mark: the caller has heard
    # up to the first cut, not nothing.
    assert turn.position_ms(12.0) == 600
    assert turn.playing(12.0)
    cut = turn.cut(12.0)
    assert cut == 30 and turn.heard_text(cut * 20) == "Thank you"


def test_speech_over_the_agent_pauses_then_words_interrupt() -> None:
    policy = BargeIn("speech", "medium")
    assert policy.on_speech(200, 0, agent_playing=True, now=1.0) is None
    assert isinstance(policy.on_speech(400, 0, agent_playing=True, now=1.2), Pause)
    assert policy.on_speech(600, 0, agent_playing=False, now=1.4) is None
    assert isinstance(policy.on_speech(800, 1, agent_playing=False, now=1.6), Interrupt)


def test_no_words_within_the_window_resumes() -> None:
    policy = BargeIn("speech", "high", resume_after_s=1.5)
    assert isinstance(policy.on_speech(200, 0, agent_playing=True, now=10.0), Pause)
    assert policy.tick(11.0) is None
    assert isinstance(policy.tick(11.5), Resume) and policy.false_alarms == 1
    policy.speech_started()
    assert isinstance(policy.on_speech(200, 0, agent_playing=True, now=12.0), Pause)
    assert isinstance(policy.tick(12.1, only_backchannel=True, caller_speaking=False), Resume)


def test_speech_that_was_a_false_alarm_does_not_pause_again_but_its_words_interrupt() -> None:
    policy = BargeIn("speech", "medium", resume_after_s=1.5)
    assert isinstance(policy.on_speech(400, 0, agent_playing=True, now=10.0), Pause)
    assert isinstance(policy.tick(11.5, caller_speaking=True), Resume)
    # The same speech goes on with no words (noise, or a recogniser still decoding): the rest
    # of the agent's audio plays.
    assert policy.on_speech(1960, 0, agent_playing=True, now=11.52) is None
    assert policy.on_speech(2500, 0, agent_playing=True, now=12.1) is None
    assert isinstance(policy.on_speech(2700, 1, agent_playing=True, now=12.3), Interrupt)
    # New speech over the agent pauses it again.
    again = BargeIn("speech", "medium", resume_after_s=1.5)
    again.on_speech(400, 0, agent_playing=True, now=10.0)
    again.tick(11.5, caller_speaking=True)
    again.speech_started()
    assert isinstance(again.on_speech(400, 0, agent_playing=True, now=13.0), Pause)


def test_words_after_the_caller_stopped_interrupt_only_speech_that_was_over_the_agent() -> None:
    # A recogniser slower than the speech: the caller talked over the agent, was heard as a
    # false alarm, stopped; the words come while the agent is still speaking.
    policy = BargeIn("speech", "medium", resume_after_s=1.5)
    policy.speech_started(new_turn=True)
    assert isinstance(policy.on_speech(400, 0, agent_playing=True, now=10.0), Pause)
    assert isinstance(policy.tick(11.5, caller_speaking=True), Resume)
    assert policy.on_words_after_speech(0, agent_playing=True) is None  # backchannels only
    assert policy.on_words_after_speech(3, agent_playing=False) is None  # the agent is done
    assert isinstance(policy.on_words_after_speech(3, agent_playing=True), Interrupt)
    # Speech before the agent began: its late words do not cut the agent's greeting, and a
    # new caller turn starts with no overlap.
    policy.speech_started(new_turn=True)
    assert policy.on_speech(300, 0, agent_playing=False, now=20.0) is None
    assert policy.on_words_after_speech(3, agent_playing=True) is None


def test_modes_and_sensitivity() -> None:
    assert BargeIn("none").on_speech(5000, 9, agent_playing=True, now=0) is None
    assert BargeIn("dtmf").on_speech(5000, 9, agent_playing=True, now=0) is None
    assert isinstance(BargeIn("dtmf").on_dtmf(agent_playing=True), Interrupt)
    assert BargeIn("speech").on_dtmf(agent_playing=True) is None
    assert isinstance(BargeIn("any").on_dtmf(agent_playing=True), Interrupt)
    low = BargeIn("speech", "low")
    assert low.on_speech(600, 1, agent_playing=True, now=0) is None  # one word is not enough
    assert isinstance(low.on_speech(600, 2, agent_playing=True, now=0), Interrupt)
    assert BargeIn("speech").on_speech(5000, 3, agent_playing=False, now=0) is None


def test_audio_never_echoed_stops_playing_its_length_and_a_grace_after_it_was_sent() -> None:
    # A carrier that echoes no marks (a Plivo account without playedStream, a lost echo): the
    # turn counted as playing for as long as any frame sent was unechoed, that is for ever.
    turn = turn_with(1.0, [])
    turn.take_unsent(100.0)
    assert turn.playing(100.0) and turn.playing(101.0 + ECHO_GRACE_S - 0.05)
    assert not turn.playing(101.0 + ECHO_GRACE_S + 0.05)


def test_an_echo_that_says_playback_began_late_moves_the_bound_on() -> None:
    turn = turn_with(1.0, [])
    turn.take_unsent(100.0)
    turn.echo(1, 103.0)  # the carrier began 3 s after it got the audio; then no more echoes
    assert turn.playing(103.98 + ECHO_GRACE_S - 0.05)
    assert not turn.playing(103.98 + ECHO_GRACE_S + 0.05)


def test_audio_sent_while_earlier_audio_plays_is_played_after_it() -> None:
    turn = AgentTurnAudio("t1")
    turn.add_frames([FRAME] * 50, [], clause_start_s=0.0)
    turn.end_clause()
    turn.take_unsent(100.0)  # 1 s of audio, queued on the carrier
    turn.add_frames([FRAME] * 50, [], clause_start_s=1.0)
    turn.text_done = True
    turn.take_unsent(100.5)  # another second: plays from 101.0
    assert turn.playing(102.0 + ECHO_GRACE_S - 0.05)
    assert not turn.playing(102.0 + ECHO_GRACE_S + 0.05)

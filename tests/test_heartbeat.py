"""In-process tests of the WAIT frames of a streamed worker answer (worker/server.py)."""

from __future__ import annotations

import trio
import trio.testing

import worker.server
from dorafs import runs
from worker.server import _Heartbeat


class _Steps(trio.abc.Instrument):
    """Counts the steps of tasks by name."""

    def __init__(self) -> None:
        self.steps: dict[str, int] = {}

    def before_task_step(self, task) -> None:
        self.steps[task.name] = self.steps.get(task.name, 0) + 1


def _run(produce, clock=None) -> tuple[list, int]:
    """What `_Heartbeat.around` sent for `produce`, and how many times its heartbeat ran."""
    sent: list = []
    steps = _Steps()

    async def send(part) -> None:
        sent.append(part)

    async def main() -> None:
        with trio.fail_after(30):
            await _Heartbeat.around(send, lambda beat: produce(beat, send))

    trio.run(main, clock=clock, instruments=[steps])
    return sent, sum(n for name, n in steps.steps.items() if name.endswith("_Heartbeat.run"))


def test_a_wait_frame_goes_out_each_interval_of_silence_and_never_inside_a_frame():
    interval = worker.server.PROGRESS_INTERVAL

    async def produce(beat, send) -> None:
        await trio.sleep(2.5 * interval)  # a page still coming: two WAITs

        async def frame(send) -> bool:  # a frame's header and data, another task running between them
            await send(b"header")
            await trio.lowlevel.checkpoint()
            await send(b"data")
            return True

        await beat.frame(frame, send)
        await beat.frame(send, b"last")

    sent, _ = _run(produce, trio.testing.MockClock(autojump_threshold=0))
    wait = runs.header(runs.WAIT)
    assert sent == [wait, wait, b"header", b"data", b"last"]


def test_a_frame_slow_to_go_out_does_not_spin_the_heartbeat(monkeypatch):
    """A reader slow to take a frame (a page sent to a far client) leaves the heartbeat
    asleep: it wakes about once an interval, not at every turn of the loop."""
    monkeypatch.setattr(worker.server, "PROGRESS_INTERVAL", 0.02)

    async def produce(beat, send) -> None:
        async def slow(send) -> bool:  # 0.6 s of a frame going out bit by bit
            for _ in range(300):
                await trio.sleep(0.002)
            await send(b"frame")
            return True

        await beat.frame(slow, send)

    sent, beats = _run(produce)
    assert sent == [b"frame"]
    assert 0 < beats < 100, beats  # about 30 intervals

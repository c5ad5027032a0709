"""The gate between CUDA graph capture and other threads' GPU work (pipeline/gpu_gate.py): a capture
never overlaps another thread's work, and captures begun inside work never deadlock."""

from __future__ import annotations

import threading

from pipeline.gpu_gate import GpuGate


def test_a_capture_waits_for_other_threads_work_and_holds_new_work_back():
    gate, events = GpuGate(), []
    working, capture_asked, captured = threading.Event(), threading.Event(), threading.Event()

    def worker():
        with gate.work():
            events.append("work starts")
            working.set()
            capture_asked.wait(5)
            events.append("work ends")

    def capturer():
        working.wait(5)
        capture_asked.set()
        with gate.capture():
            events.append("capture")
            late = threading.Thread(target=late_work)
            late.start()
            late.join(0.2)  # it cannot get in while the capture runs
            events.append("capture ends")
        late.join(5)
        captured.set()

    def late_work():
        with gate.work():
            events.append("late work")

    threads = [threading.Thread(target=worker), threading.Thread(target=capturer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert captured.is_set()
    assert events == ["work starts", "work ends", "capture", "capture ends", "late work"]


def test_two_threads_capturing_inside_their_own_work_take_turns():
    gate, order = GpuGate(), []
    both_working = threading.Barrier(2, timeout=5)

    def stage(name: str):
        with gate.work():
            both_working.wait()  # each holds its work when it starts to capture
            with gate.capture():
                order.append(name)
            with gate.work():  # nested work of the same thread is let through
                order.append(name + " again")

    threads = [threading.Thread(target=stage, args=(name,)) for name in ("answers", "translation")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads)
    assert sorted(order) == ["answers", "answers again", "translation", "translation again"]

"""The CPU step's thread count: the cores other processes leave free, unless the user fixed it."""

import pytest
import torch

import engine
from engine.core.runner import runner_for
from engine.core import cpu_threads
from engine.core.cpu_threads import ThreadChooser


class FakeMachine:
    """/proc/stat, this process's CPU time and the wall clock of a machine whose other processes
    keep ``others`` cores busy while ours uses ``own`` cores' worth."""

    def __init__(self, cores=2, others=0.0, own=1.0):
        self.cores, self.others, self.own = cores, others, own
        self.now, self.busy, self.own_seconds = 100.0, 50.0, 10.0

    def advance(self, seconds):
        self.now += seconds
        self.busy += (self.others + self.own) * seconds
        self.own_seconds += self.own * seconds

    def chooser(self, max_threads=2, pinned=False):
        return ThreadChooser(cores=self.cores, max_threads=max_threads, read_stat=lambda: (self.busy, 0.0),
                             own_seconds=lambda: self.own_seconds, clock=lambda: self.now, pinned=pinned)


@pytest.mark.parametrize("cores,others,max_threads,want", [
    (2, 0.0, 2, 2),   # quiet: every core
    (2, 1.0, 2, 1),   # one core kept busy by another process: the other one
    (2, 2.0, 2, 1),   # all busy: still one
    (8, 2.6, 8, 5),   # 5.4 cores free: 5
    (8, 0.0, 4, 4),   # never above the count PyTorch started with
    (2, 0.4, 2, 2),   # a light load rounds to none
])
def test_threads_are_the_cores_others_leave_free(cores, others, max_threads, want):
    machine = FakeMachine(cores, others, own=1.0)
    chooser = machine.chooser(max_threads)
    assert chooser.threads() == max_threads  # no reading yet: PyTorch's count
    machine.advance(0.2)
    assert chooser.threads() == want


def _follow(machine, script):
    """A chooser's first reading with ``others`` cores busy now, then per (others, seconds, want):
    that load for that long, after which ``threads()`` must be ``want``."""
    chooser = machine.chooser()
    chooser.threads()
    for others, seconds, want in script:
        machine.others = others
        machine.advance(seconds)
        assert chooser.threads() == want, (others, seconds)


def test_the_load_is_reread_each_second_and_follows_it():
    _follow(FakeMachine(others=1.0), [
        (1.0, 0.15, 1),
        (0.0, 0.5, 1),  # the other process ended, but the load is not re-read within the second
        (0.0, 0.6, 2),  # more threads at once
    ])


def test_a_passing_load_does_not_cost_threads():
    """Fewer threads need two readings in a row that say so: a peer that ran for a second and ended is ignored."""
    _follow(FakeMachine(others=0.0), [
        (0.0, 0.15, 2),
        (1.0, 1.1, 2),  # one busy second
        (0.0, 1.1, 2),
        (1.0, 1.1, 2),
        (1.0, 1.1, 1),  # busy for two readings: one thread
    ])


def test_our_own_busy_threads_are_not_counted_as_others():
    machine = FakeMachine(others=0.0, own=2.0)  # our two threads spinning: nobody else
    chooser = machine.chooser()
    chooser.threads()
    machine.advance(0.2)
    assert chooser.threads() == 2


def test_a_pinned_count_never_changes(monkeypatch):
    machine = FakeMachine(others=1.0)
    chooser = machine.chooser(pinned=True)
    chooser.choice = 2
    machine.advance(2.0)
    assert chooser.threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert ThreadChooser(read_stat=lambda: None).pinned


def test_no_proc_stat_keeps_pytorchs_count():
    chooser = ThreadChooser(cores=2, max_threads=2, read_stat=lambda: None)
    assert chooser.threads() == 2 and chooser.threads() == 2


def test_cpu_steps_run_at_the_choice(tiny_checkpoint, monkeypatch):
    """The runner's CPU steps run at the chooser's count, and give PyTorch its own back; --threads pins it."""
    before = torch.get_num_threads()
    machine = FakeMachine(others=1.0)
    monkeypatch.setattr(cpu_threads, "_CHOOSER", machine.chooser(max_threads=2))
    model = engine.load_model(tiny_checkpoint, device="cpu", dtype="float32")
    seen = []
    decode = model.decode
    monkeypatch.setattr(model, "decode", lambda *a, **kw: seen.append(torch.get_num_threads()) or decode(*a, **kw))
    try:
        runner_for(model)  # its first reading of the load
        machine.advance(0.2)
        torch.set_num_threads(2)
        engine.generate(model, [[1, 2, 3]], 3, temperature=0, stop_at_eos=False)
        assert seen == [1, 1] and torch.get_num_threads() == 2
        cpu_threads.pin_threads(2)
        machine.advance(5.0)
        engine.generate(model, [[1, 2, 3]], 3, temperature=0, stop_at_eos=False)
        assert seen[2:] == [2, 2]
    finally:
        torch.set_num_threads(before)


def test_proc_stat_reads_here():
    stat = cpu_threads.read_proc_stat()
    if stat is None:
        pytest.skip("no /proc/stat here")
    busy, idle = stat
    assert busy > 0 and idle >= 0

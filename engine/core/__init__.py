"""The step core: a request and its sampling (``request``), every slot's tensors (``slots``), the
static decode step over the model's KV cache (``runner``), the threads a CPU step runs on
(``cpu_threads``) and continuous batching, its one driver (``scheduler``). ``generate()``,
scoring-free API calls and the server all run through it."""

from .request import Request, SamplingParams
from .runner import Runner, StepPlan, runner_for
from .scheduler import Scheduler, scheduler_for
from .slots import SlotState

__all__ = ["Request", "Runner", "SamplingParams", "Scheduler", "SlotState", "StepPlan", "runner_for", "scheduler_for"]

"""The recent arrival rate and mean request size the engine measures for the shape policy."""

from __future__ import annotations

from collections import deque


class LoadTracker:
    """Recent arrival rate and mean request size, fed by the engine."""

    def __init__(self, window_s: float = 3.0, smoothing: float = 0.1) -> None:
        self.window_s = window_s
        self.smoothing = smoothing
        self._arrivals: deque[float] = deque()
        self._burst_start = 0.0  # the first arrival after the window last ran empty
        self.mean_prompt_tokens = 0.0
        self.mean_output_tokens = 0.0
        self._outputs_seen = False

    def arrive(self, now: float, prompt_tokens: int, max_tokens: int) -> None:
        """Record an admitted request."""
        self.rate(now)  # forget what left the window
        if not self._arrivals:
            self._burst_start = now
        self._arrivals.append(now)
        first = len(self._arrivals) == 1 and self.mean_prompt_tokens == 0.0
        self.mean_prompt_tokens = self._mix(self.mean_prompt_tokens, prompt_tokens, first)
        if not self._outputs_seen:  # until a request finishes, max_tokens is the best guess
            self.mean_output_tokens = self._mix(self.mean_output_tokens, max_tokens, first)

    def finish(self, output_tokens: int) -> None:
        """Record a finished request's generated length."""
        first = not self._outputs_seen
        self._outputs_seen = True
        self.mean_output_tokens = self._mix(self.mean_output_tokens, output_tokens, first)

    def rate(self, now: float) -> float:
        """Arrivals per second over the last `window_s`, or since a burst after a quiet spell
        began if that is shorter (at least a second): the first seconds of a spike count as
        the spike's rate, not a third of it."""
        while self._arrivals and self._arrivals[0] <= now - self.window_s:
            self._arrivals.popleft()
        span = min(self.window_s, max(1.0, now - self._burst_start))
        return len(self._arrivals) / span

    def _mix(self, mean: float, value: float, first: bool) -> float:
        return float(value) if first else mean + self.smoothing * (value - mean)

"""The `slo` policy: the best-quality step shape predicted to meet the requests' TTFT and TPOT."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

from ..model.shapes import ShapeSpec
from .elastic import ElasticPolicy
from .outlook import Forecast, Outlook
from .step_time import StepTimeModel
from .types import SLO, LoadState, PolicyConfig, Refuse, RequestView


class SloPolicy(ElasticPolicy):
    """The best-quality step shape whose predicted TTFT and TPOT meet the requests' SLOs."""

    name = "slo"

    def __init__(
        self,
        specs: Sequence[ShapeSpec],
        model: StepTimeModel,
        slo: SLO,
        config: PolicyConfig | None = None,
    ) -> None:
        super().__init__(specs, model, config)
        self.slo = slo

    @property
    def keep_margin(self) -> float:
        return self.config.shrink_margin

    def pressures(self, state: LoadState, now: float) -> Callable[[ShapeSpec], float]:
        outlook = Outlook(self.grid, self.step_model, state, now)
        tpots = [self._targets(r)[1] for r in (*state.running, *outlook.admitted)]
        tightest = min((t for t in tpots if t is not None), default=None)
        waits = []  # (waited, prefill steps, slot steps, TTFT target), all in seconds
        for r, waited, prefill_steps, slot_steps in outlook.queue:
            ttft = self._targets(r)[0]
            # a request already past its TTFT cannot be saved: it must not pin the cap down
            if ttft is not None and waited <= ttft / 1000:
                waits.append((waited, prefill_steps, slot_steps, ttft / 1000))

        def pressure(cap: ShapeSpec) -> float:
            f = outlook.forecast(cap)
            p, d = f.prefill_step_s, f.decode_step_s
            worst = f.tpot_s * 1000 / tightest if tightest is not None else 0.0
            return max(worst, max(((w + n * p + k * d) / t for w, n, k, t in waits), default=0.0))

        return pressure

    def admit(self, request: RequestView, state: LoadState, now: float) -> int | Refuse:
        with_it = replace(state, waiting=(*state.waiting, request))
        outlook = Outlook(self.grid, self.step_model, with_it, now)
        fastest, f = outlook.fastest()
        ttft_s = outlook.ttft(outlook.queue[-1], f)
        slo = request.slo.over(self.slo)
        late_ttft = slo.ttft_ms is not None and ttft_s * 1000 > slo.ttft_ms
        late_tpot = slo.tpot_ms is not None and f.tpot_s * 1000 > slo.tpot_ms
        if late_ttft or late_tpot:
            late = ttft_s if late_ttft else None
            refusal = self._refusal(request, state, now, slo, late, fastest, f)
            if refusal.under_load:  # not one whose SLO no shape could meet
                self._refused_at = now
            return refusal
        return super().admit(request, state, now)

    def _targets(self, r: RequestView) -> tuple[float | None, float | None]:
        """The request's (TTFT, TPOT) targets in ms, the server's default where it has none."""
        ttft = r.slo.ttft_ms if r.slo.ttft_ms is not None else self.slo.ttft_ms
        return ttft, r.slo.tpot_ms if r.slo.tpot_ms is not None else self.slo.tpot_ms

    def _refusal(
        self,
        request: RequestView,
        state: LoadState,
        now: float,
        slo: SLO,
        late_ttft_s: float | None,
        fastest: ShapeSpec,
        f: Forecast,
    ) -> Refuse:
        """A refusal whose Retry-After is when the fastest shape should meet the SLO again."""
        idle = LoadState(
            waiting=(request,),
            max_num_seqs=state.max_num_seqs,
            max_num_batched_tokens=state.max_num_batched_tokens,
        )
        alone = Outlook(self.grid, self.step_model, idle, now)
        _, alone_f = alone.fastest()
        hopeless = (
            slo.ttft_ms is not None and alone.ttft(alone.queue[0], alone_f) * 1000 > slo.ttft_ms
        ) or (slo.tpot_ms is not None and alone_f.tpot_s * 1000 > slo.tpot_ms)
        if late_ttft_s is not None:
            wait = late_ttft_s - (slo.ttft_ms or 0.0) / 1000  # the queue must drain this much
            what = f"TTFT {late_ttft_s * 1000:.0f} ms > {slo.ttft_ms:g} ms"
        else:
            wait = sum(r.remaining for r in state.running) / max(1, len(state.running))
            wait *= f.decode_step_s  # until the running batch has thinned out
            what = f"TPOT {f.tpot_s * 1000:.0f} ms > {slo.tpot_ms:g} ms"
        where = "even on an idle server" if hopeless else "under the current load"
        return Refuse(
            retry_after_s=float(max(1, math.ceil(wait))),
            reason=f"even the fastest shape {fastest.name} is predicted to miss "
            f"the SLO {where} ({what})",
            under_load=not hopeless,
        )

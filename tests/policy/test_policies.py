"""Shape policies on synthetic load traces, with a fake clock and a known step-time model."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from elasticserve.engine.load_tracker import LoadTracker
from elasticserve.model.shapes import Shape, ShapeSpec
from elasticserve.policy.factory import make_policy
from elasticserve.policy.grid import Grid
from elasticserve.policy.outlook import Outlook
from elasticserve.policy.slo import SloPolicy
from elasticserve.policy.step_time import StepTimeModel, step_load
from elasticserve.policy.types import SLO, Decision, LoadState, PolicyConfig, Refuse, RequestView

LAYERS = {8: tuple(range(8)), 6: (0, 1, 2, 3, 5, 7), 4: (0, 2, 5, 7)}  # nested tables
WIDTHS = (1.0, 0.75, 0.5)


def grid(layers=LAYERS, ppl: dict[str, float] | None = None) -> list[ShapeSpec]:
    """Depths 8/6/4 x widths 1/0.75/0.5, widest and deepest first, like a pack's grid."""
    specs = []
    for depth in sorted(layers, reverse=True):
        for width in WIDTHS:
            shape = Shape(depth, width)
            specs.append(
                ShapeSpec(
                    id=len(specs),
                    shape=shape,
                    layers=layers[depth],
                    heads=(4,) * 8,
                    mlp=(64,) * 8,
                    weight_fraction=depth / 8 * width,
                    ppl=None if ppl is None else ppl[str(shape)],
                )
            )
    return specs


SPECS = grid()
BY_NAME = {s.name: s for s in SPECS}
FULL, SMALLEST = BY_NAME["d8-w1.0"], BY_NAME["d4-w0.5"]


def cost_model(alpha: float = 0.0) -> StepTimeModel:
    """A step costs its envelope's weight fraction: 2 ms + wf x (8 ms + 1.5 ms/row + ...)."""
    return StepTimeModel(
        {s.name: (0.002 + 0.008 * s.weight_fraction, 0.0015 * s.weight_fraction,
                  2e-5 * s.weight_fraction, 0.0) for s in SPECS},
        alpha=alpha,
    )  # fmt: skip


def view(rid: str, spec: ShapeSpec = FULL, running: bool = True, **kw) -> RequestView:
    """A request decoding (running) or queued, 32 prompt tokens, 64 to generate."""
    out = kw.pop("output_tokens", 4 if running else 0)
    base = dict(
        request_id=rid,
        shape_id=spec.id,
        layers=spec.layers,
        has_kv=running,
        prompt_tokens=32,
        output_tokens=out,
        computed_tokens=32 + out - 1 if running else 0,
        max_tokens=64,
    )
    return RequestView(**{**base, **kw})


def state(running=(), waiting=(), **kw) -> LoadState:
    return LoadState(waiting=tuple(waiting), running=tuple(running), **kw)


def slo_policy(ttft_ms=2000.0, tpot_ms=30.0, **config) -> SloPolicy:
    policy = make_policy("slo", SPECS, cost_model(), SLO(ttft_ms, tpot_ms), PolicyConfig(**config))
    assert isinstance(policy, SloPolicy)
    return policy


def assert_allowed(before: RequestView, decision: Decision) -> None:
    """Pinned untouched, min_shape honoured, depth never grows once KV exists."""
    new = SPECS[decision.changes.get(before.request_id, before.shape_id)]
    if before.pinned:
        assert before.request_id not in decision.changes
    if before.min_shape_id is not None:
        floor = SPECS[before.min_shape_id].shape
        assert new.shape.depth >= floor.depth and new.shape.width >= floor.width
    if before.has_kv:
        assert set(new.layers) <= set(before.layers)


# -- unit behaviour -------------------------------------------------------------------------------


PURE = "types, grid, base, fixed, elastic, outlook, slo, load, step_time"


def test_policy_imports_without_torch():
    modules = ", ".join(f"elasticserve.policy.{m}" for m in PURE.split(", "))
    code = f"import sys, {modules}; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fixed_serves_the_pinned_shape_else_full_and_never_changes_or_refuses():
    policy = make_policy("fixed", SPECS)
    crowd = [view(f"r{i}") for i in range(60)]
    assert policy.decide(state(crowd, [view("w", running=False)]), 0.0) == Decision(FULL.id)
    new = view("n", running=False)
    assert policy.admit(new, state(crowd), 0.0) == FULL.id
    pinned = view("p", BY_NAME["d6-w0.75"], running=False, pinned=True)
    assert policy.admit(pinned, state(crowd), 0.0) == BY_NAME["d6-w0.75"].id


def test_rising_load_shrinks_running_width_within_one_step():
    policy = slo_policy()
    light = [view("a"), view("b")]
    assert policy.decide(state(light), 0.0) == Decision(FULL.id, {})
    burst = [view(f"w{i}", running=False, arrival_time=0.0) for i in range(30)]
    decision = policy.decide(state(light, burst), 0.01)  # the very next step
    cap = SPECS[decision.step_shape]
    assert cap.weight_fraction < 1.0
    for r in light:
        new = SPECS[decision.changes[r.request_id]]
        assert new.shape.width < 1.0 or new.shape.depth < 8  # the running batch moved too
        assert set(new.layers) <= set(r.layers)
    assert all(SPECS[decision.changes[w.request_id]] == cap for w in burst)


def test_a_cap_predicted_just_inside_the_slo_is_shrunk_by_the_shrink_margin():
    # two running rows at full: 2 + 8 + 2 x 1.5 ms = 13 ms predicted TPOT
    rows = [view("a"), view("b")]
    predicted_ms = 13.0
    tpot_ms = predicted_ms / 0.9  # predicted at 90 % of the SLO
    exact = slo_policy(tpot_ms=tpot_ms, shrink_margin=0.0)
    assert exact.decide(state(rows), 0.0).step_shape == FULL.id
    slack = slo_policy(tpot_ms=tpot_ms, shrink_margin=0.2)
    decision = slack.decide(state(rows), 0.0)
    assert decision.step_shape != FULL.id and set(decision.changes) == {"a", "b"}
    with pytest.raises(ValueError, match="shrink_margin <= grow_margin"):
        PolicyConfig(shrink_margin=0.4, grow_margin=0.3)


def test_falling_load_grows_back_only_after_the_slack_persists():
    policy = slo_policy(grow_after_s=2.0, grow_after_steps=4)
    burst = [view(f"r{i}") for i in range(40)]
    small = SPECS[policy.decide(state(burst), 0.0).step_shape]
    assert small != FULL
    shrunk = [view("a", small), view("b", small)]  # the burst is over; two shrunk requests remain
    now, caps = 0.0, []
    while now < 4.0:
        now += 0.25
        decision = policy.decide(state(shrunk), now)
        caps.append(SPECS[decision.step_shape])
    assert all(c == small for c in caps[:7])  # held for 2 s although full would meet the SLO
    assert caps[-1] == FULL
    # running requests grow their width back; their depth cannot grow (their KV is gone)
    grown = SPECS[decision.changes.get("a", small.id)]
    assert grown.shape.width == 1.0 and grown.layers == small.layers


def test_a_new_request_after_idle_gets_the_full_shape_at_once():
    policy = slo_policy()
    policy.decide(state([view(f"r{i}") for i in range(40)]), 0.0)
    assert policy.cap != FULL
    assert policy.admit(view("n", running=False), state(), 0.5) == FULL.id


def test_pinned_is_untouched_and_min_shape_is_a_floor():
    policy = slo_policy(tpot_ms=18.0)  # full alone: 11.5 ms, within the grow margin
    floor, pin = BY_NAME["d6-w0.75"], BY_NAME["d6-w0.5"]
    special = [
        view("pinned", pin, pinned=True),
        view("floor", FULL, min_shape_id=floor.id),
        view("queued-floor", FULL, running=False, min_shape_id=floor.id),
    ]
    crowd = [view(f"r{i}") for i in range(30)]
    busy = state([*special[:2], *crowd], [special[2]])
    decision = policy.decide(busy, 0.0)
    for r in [*special, *crowd]:
        assert_allowed(r, decision)
    assert SPECS[decision.changes["floor"]] == floor  # as small as the floor allows
    # the floor row sets what the step costs: the others go no lower than it for nothing
    assert SPECS[decision.step_shape] == SPECS[decision.changes["r0"]] == floor
    calm = state([special[0]])
    for now in range(1, 8):  # load gone: everything grows back, the pinned shape stays
        decision = policy.decide(calm, float(now))
    assert decision.step_shape == FULL.id and "pinned" not in decision.changes


def test_a_pinned_full_row_costs_a_full_step_so_nobody_is_shrunk_for_nothing():
    policy = slo_policy(tpot_ms=15.0)
    crowd = [view(f"r{i}") for i in range(30)]
    decision = policy.decide(state([view("pinned", FULL, pinned=True), *crowd]), 0.0)
    assert decision == Decision(FULL.id, {})


def test_depth_shrinks_in_flight_only_to_a_subset_of_the_held_layers():
    layers = {8: tuple(range(8)), 6: (0, 1, 2, 3, 5, 7), 4: (0, 3, 4, 7)}  # 4 not inside 6
    specs = grid(layers)
    policy = make_policy("slo", specs, cost_model(), SLO(tpot_ms=25.0))
    d6 = next(s for s in specs if s.name == "d6-w1.0")
    crowd = [view(f"r{i}", d6) for i in range(30)]
    decision = policy.decide(state(crowd), 0.0)
    assert set(decision.changes) == {r.request_id for r in crowd}
    for new in {specs[i] for i in decision.changes.values()}:
        assert new.layers == d6.layers and new.shape.width < 1.0  # kept its layers, narrowed
    assert specs[decision.step_shape].shape.depth <= 6  # no deeper cap than the batch can use


def test_quality_order_follows_the_packs_perplexity():
    ppl = {s.name: 10.0 + 10 * (1 - s.weight_fraction) for s in SPECS}
    ppl["d6-w1.0"] = 9.0  # calibrated: this one is better than full
    policy = make_policy("slo", grid(ppl=ppl), cost_model(), SLO(tpot_ms=100.0))
    assert SPECS[policy.decide(state([view("a")]), 0.0).step_shape].name == "d6-w1.0"


def test_refuses_only_when_even_the_smallest_shape_misses():
    policy = slo_policy(ttft_ms=500.0, tpot_ms=40.0)
    busy = [view(f"r{i}") for i in range(24)]
    # full would miss the TPOT SLO here, a smaller shape meets it: admitted, not refused
    full_step = cost_model().predict(step_load([(FULL.shape, 1, 36)] * 25))
    assert full_step > 0.040
    assert isinstance(policy.admit(view("n", running=False), state(busy), 0.0), int)
    # a queue the smallest shape cannot prefill within the TTFT: refused, with a retry time
    queue = [view(f"w{i}", running=False, prompt_tokens=512) for i in range(40)]
    refused = policy.admit(view("late", running=False), state(busy, queue), 0.0)
    assert isinstance(refused, Refuse) and refused.retry_after_s >= 1
    assert "current load" in refused.reason
    # a TPOT no shape reaches even alone: refused as unattainable
    hopeless = view("x", running=False, slo=SLO(tpot_ms=0.5))
    refused = policy.admit(hopeless, state(), 0.0)
    assert isinstance(refused, Refuse) and "idle" in refused.reason
    for name in ("fixed", "load"):  # only `slo` refuses
        other = make_policy(name, SPECS, cost_model())
        assert isinstance(other.admit(view("late", running=False), state(busy, queue), 0.0), int)


def test_while_refusing_for_load_the_cap_stays_smallest():
    busy = [view(f"r{i}") for i in range(24)]
    # a backlog already past its TTFT: it no longer pins the cap, so alone it lets the cap grow
    late = [view(f"w{i}", running=False, prompt_tokens=512, arrival_time=-5.0) for i in range(40)]
    backlog = state(busy, late)
    fresh = slo_policy(ttft_ms=500.0, tpot_ms=100.0)
    assert fresh.decide(backlog, 0.0).step_shape != SMALLEST.id
    policy = slo_policy(ttft_ms=500.0, tpot_ms=100.0)
    refused = policy.admit(view("new", running=False, arrival_time=0.0), backlog, 0.0)
    assert isinstance(refused, Refuse) and refused.under_load
    assert policy.decide(backlog, 0.5).step_shape == SMALLEST.id  # drain at full speed
    # no refusal for grow_after_s: it grows back the usual way (held for a while)
    grown = [policy.decide(backlog, 2.5 + 0.5 * k).step_shape for k in range(8)]
    assert grown[0] == SMALLEST.id and grown[-1] != SMALLEST.id
    # a request no shape could serve even alone says nothing about the load
    hopeless = fresh.admit(view("x", running=False, slo=SLO(tpot_ms=0.5)), backlog, 3.0)
    assert isinstance(hopeless, Refuse) and not hopeless.under_load
    assert fresh.decide(backlog, 3.1).step_shape != SMALLEST.id


def test_tpot_forecast_stretches_by_the_prefill_of_arriving_prompts():
    model, busy = cost_model(alpha=1.0), [view(f"r{i}") for i in range(8)]
    quiet = Outlook(Grid(SPECS), model, state(busy), 0.0).forecast(FULL)
    rush = state(busy, arrival_rate=20.0, mean_prompt_tokens=32)
    stretched = Outlook(Grid(SPECS), model, rush, 0.0).forecast(FULL)
    decode = [(FULL.shape, 1, 36)] * 8
    extra = model.raw(step_load([*decode, (FULL.shape, 32, 0)])) - model.raw(step_load(decode))
    assert 0 < 20.0 * extra < 1
    assert stretched.tpot_s == pytest.approx(quiet.tpot_s / (1 - 20.0 * extra))
    assert stretched.decode_step_s == quiet.decode_step_s  # the next steps themselves: as before
    flood = state(busy, arrival_rate=1 / extra, mean_prompt_tokens=32)  # prefill takes all time
    assert Outlook(Grid(SPECS), model, flood, 0.0).forecast(FULL).tpot_s == float("inf")
    model.observe(step_load(decode), 2 * quiet.decode_step_s)  # this machine runs slower now
    slower = Outlook(Grid(SPECS), model, rush, 0.0).forecast(FULL)
    assert slower.decode_step_s == pytest.approx(2 * quiet.decode_step_s)
    # the correction scales the steps and the prompts' cost alike: twice the share of the time
    assert 20.0 * 2 * extra < 1
    assert slower.tpot_s == pytest.approx(2 * quiet.tpot_s / (1 - 20.0 * 2 * extra))
    # the slo policy keeps full for the batch alone, and shrinks when the prompts keep coming
    policy = slo_policy(tpot_ms=quiet.tpot_s * 1000 * 1.3)
    assert policy.decide(state(busy), 0.0).step_shape == FULL.id
    assert SPECS[policy.decide(rush, 0.1).step_shape].weight_fraction < 1.0


def test_load_policy_follows_the_arrival_rate():
    policy = make_policy("load", SPECS, cost_model())
    calm = state([view("a")], arrival_rate=1.0, mean_prompt_tokens=32, mean_output_tokens=64)
    assert policy.decide(calm, 0.0).step_shape == FULL.id
    busy = [view(f"r{i}") for i in range(20)]
    rush = state(busy, arrival_rate=40.0, mean_prompt_tokens=32, mean_output_tokens=64)
    decision = policy.decide(rush, 0.1)
    assert SPECS[decision.step_shape].weight_fraction < 1.0
    assert set(decision.changes) == {r.request_id for r in busy}


def test_load_policy_shrinks_depth_when_the_kv_cache_fills():
    policy = make_policy("load", SPECS, cost_model())
    held = [view(f"r{i}") for i in range(4)]
    decision = policy.decide(state(held, kv_usage=0.97), 0.0)
    assert SPECS[decision.step_shape].shape.depth < 8


def test_slo_rejects_bad_values_with_clear_messages():
    assert SLO.from_dict({"ttft_ms": 200}).over(SLO(1000, 50)) == SLO(200, 50)
    with pytest.raises(ValueError, match="tpot_ms"):
        SLO.from_dict({"tpot_ms": -1})
    with pytest.raises(ValueError, match="unknown slo"):
        SLO.from_dict({"ttft": 1})
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fastest", SPECS)


# -- synthetic traces through a simulated engine --------------------------------------------------


@dataclass
class SimRequest:
    view: RequestView
    served: list[str] = field(default_factory=list)
    first_token: float | None = None
    finished: float | None = None


class Sim:
    """A stand-in for the engine: FCFS chunked prefill, a token budget, the policy's shapes."""

    def __init__(self, policy, truth: StepTimeModel, max_seqs=64, budget=512, noise=0.0):
        self.policy, self.truth = policy, truth
        self.max_seqs, self.budget, self.noise = max_seqs, budget, noise
        self.now = 0.0
        self.running: list[SimRequest] = []
        self.waiting: list[SimRequest] = []
        self.done: list[SimRequest] = []
        self.refused: list[float] = []  # when
        self.caps: list[tuple[float, str]] = []
        self.rng = random.Random(0)
        self.tracker = LoadTracker()
        self._ids = 0

    def state(self) -> LoadState:
        return state(
            [r.view for r in self.running],
            [r.view for r in self.waiting],
            arrival_rate=self.tracker.rate(self.now),
            mean_prompt_tokens=self.tracker.mean_prompt_tokens,
            mean_output_tokens=self.tracker.mean_output_tokens,
            max_num_seqs=self.max_seqs,
            max_num_batched_tokens=self.budget,
        )

    def arrive(self, prompt=32, max_tokens=32) -> None:
        self._ids += 1
        new = view(
            f"q{self._ids}",
            running=False,
            prompt_tokens=prompt,
            max_tokens=max_tokens,
            arrival_time=self.now,
        )
        choice = self.policy.admit(new, self.state(), self.now)
        if isinstance(choice, Refuse):
            self.refused.append(self.now)
            return
        self.waiting.append(SimRequest(_with(new, shape_id=choice, layers=SPECS[choice].layers)))
        self.tracker.arrive(self.now, prompt, max_tokens)

    def step(self) -> None:
        decision = self.policy.decide(self.state(), self.now)
        self.caps.append((self.now, SPECS[decision.step_shape].name))
        for r in (*self.running, *self.waiting):
            assert_allowed(r.view, decision)
            if (sid := decision.changes.get(r.view.request_id)) is not None:
                r.view = _with(r.view, shape_id=sid, layers=SPECS[sid].layers)
        while self.waiting and len(self.running) < self.max_seqs:
            self.running.append(self.waiting.pop(0))
        rows, left = [], self.budget
        for r in self.running:
            n = min(r.view.uncomputed, left)
            if n > 0:
                rows.append((r, n))
                left -= n
        if not rows:
            self.now += 0.001
            return
        load = step_load(
            [(SPECS[r.view.shape_id].shape, n, r.view.computed_tokens) for r, n in rows]
        )
        seconds = self.truth.raw(load) * (1 + self.rng.uniform(-self.noise, self.noise))
        self.now += seconds
        self.policy.observe(load, seconds)
        for r, n in rows:
            self._advance(r, n)

    def _advance(self, r: SimRequest, n: int) -> None:
        v = r.view
        computed = v.computed_tokens + n
        out = v.output_tokens + (computed == v.prompt_tokens + v.output_tokens)
        r.view = _with(v, computed_tokens=computed, output_tokens=out, has_kv=True)
        if out > v.output_tokens:
            r.served.append(SPECS[v.shape_id].name)
            r.first_token = r.first_token if r.first_token is not None else self.now
        if out == v.max_tokens:
            r.finished = self.now
            self.tracker.finish(out)
            self.running.remove(r)
            self.done.append(r)

    def run(self, rate_at, until: float) -> None:
        """Arrivals evenly spaced at rate_at(now) per second, steps in between."""
        next_arrival = 0.0
        while self.now < until:
            while next_arrival <= self.now:
                self.arrive()
                next_arrival += 1.0 / rate_at(next_arrival)
            self.step()


def _with(v: RequestView, **changes) -> RequestView:
    return RequestView(**{**v.__dict__, **changes})


def _tpot(r: SimRequest) -> float:
    assert r.first_token is not None and r.finished is not None
    return (r.finished - r.first_token) / max(1, r.view.output_tokens - 1)


def _p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


def spike(t: float) -> float:
    """Light, then a spike of 3x what the full shape can serve within the SLO, then light."""
    return 60.0 if 2.0 <= t < 6.0 else 3.0


def test_trace_slo_keeps_tpot_where_fixed_full_breaks_it():
    tpot_slo = 0.030
    results = {}
    for name in ("fixed", "slo"):
        policy = make_policy(name, SPECS, cost_model(), SLO(2000.0, tpot_slo * 1000))
        sim = Sim(policy, cost_model())
        sim.run(spike, until=12.0)
        results[name] = sim
    fixed, slo = results["fixed"], results["slo"]
    in_spike = [r for r in slo.done if 2.0 <= r.view.arrival_time < 6.0]
    assert _p90([_tpot(r) for r in slo.done]) <= tpot_slo * 1.05
    assert _p90([_tpot(r) for r in fixed.done]) > 2 * tpot_slo
    # during the spike the slo policy served smaller shapes; before and after it, the full one
    assert any(name != FULL.name for r in in_spike for name in r.served)
    assert {cap for t, cap in slo.caps if t < 1.9} == {FULL.name}
    assert slo.caps[-1][1] == FULL.name
    assert all(
        r.served == [FULL.name] * len(r.served) for r in slo.done if r.view.arrival_time > 10
    )
    assert len(slo.refused) < 0.1 * len(slo.done)


def test_trace_beyond_the_smallest_shape_refuses_rather_than_miss_ttft():
    ttft_slo = 2.0
    flood = lambda t: 300.0 if 2.0 <= t < 6.0 else 3.0  # noqa: E731
    results = {}
    for name in ("fixed", "slo"):
        policy = make_policy(name, SPECS, cost_model(), SLO(ttft_slo * 1000, 30.0))
        sim = Sim(policy, cost_model())
        sim.run(flood, until=14.0)
        results[name] = sim
    fixed, slo = results["fixed"], results["slo"]
    ttfts = [r.first_token - r.view.arrival_time for r in slo.done]
    assert _p90(ttfts) <= ttft_slo
    assert _p90([r.first_token - r.view.arrival_time for r in fixed.done]) > 2 * ttft_slo
    assert slo.refused and all(2.0 <= t < 6.5 for t in slo.refused)  # only in the flood
    assert not fixed.refused


def test_load_policy_trace_shrinks_in_the_spike_and_grows_back():
    policy = make_policy("load", SPECS, cost_model())
    sim = Sim(policy, cost_model())
    sim.run(spike, until=14.0)
    assert {cap for t, cap in sim.caps if t < 1.9} == {FULL.name}
    assert any(cap != FULL.name for t, cap in sim.caps if 2.0 <= t < 6.0)
    assert sim.caps[-1][1] == FULL.name


def test_no_flapping_under_steady_load_with_noisy_step_times():
    policy = make_policy("slo", SPECS, cost_model(alpha=0.1), SLO(2000.0, 30.0))
    sim = Sim(policy, cost_model(), noise=0.2)
    sim.run(lambda t: 25.0, until=20.0)  # busy enough that full misses: a smaller cap holds
    caps = [cap for t, cap in sim.caps if t > 3.0]
    switches = sum(a != b for a, b in itertools.pairwise(caps))
    assert caps[0] != FULL.name
    assert switches <= 2, f"{switches} switches under steady load"


def precision_grid(ppl: dict[str, float]) -> list[ShapeSpec]:
    """Full-width shapes named by `ppl` (in its order), bf16 and q4 (0.4x the bytes)."""
    shapes = [Shape.parse(name, num_layers=8) for name in ppl]
    return [
        ShapeSpec(
            id=i,
            shape=shape,
            layers=LAYERS[shape.depth],
            heads=(4,) * 8,
            mlp=(64,) * 8,
            weight_fraction=shape.depth / 8 * (0.4 if shape.precision else 1.0),
            ppl=ppl[str(shape)],
        )
        for i, shape in enumerate(shapes)
    ]


def test_a_quantized_shape_never_outranks_its_dense_sibling() -> None:
    """q4 measured 0.1 % below bf16 is noise: the dense shape keeps the request, q4 is a cap of
    its own (chosen only where the dense one misses the target)."""
    ppl = {"d8-w1.0": 10.0, "d8-w1.0-q4": 10.01, "d6-w1.0": 12.0, "d6-w1.0-q4": 11.99}
    specs = precision_grid(ppl)
    g = Grid(specs)
    assert [s.name for s in g.by_quality] == ["d8-w1.0", "d8-w1.0-q4", "d6-w1.0", "d6-w1.0-q4"]
    shallow = view("a", specs[2])  # holds 6 layers: under the full cap it stays at depth 6
    assert g.spec_of(g.fit(shallow, specs[0])).name == "d6-w1.0"
    assert g.spec_of(g.fit(shallow, specs[1])).name == "d6-w1.0-q4"  # a q4 cap: q4


def _two_precision_grid() -> tuple[list[ShapeSpec], StepTimeModel]:
    """Depths 8/4 at bf16 and q4; q4 reads 0.4x the bytes but costs 3x per row (an AMX Xeon's
    q4 rows are compute-bound, its bf16 ones are not): fastest alone, slowest in a batch."""
    specs = precision_grid(
        {"d8-w1.0": 10.0, "d8-w1.0-q4": 10.0, "d4-w1.0": 20.0, "d4-w1.0-q4": 20.0}
    )
    per_row = {"": 0.001, "q4": 0.003}
    model = StepTimeModel(
        {
            s.name: (0.010 * s.weight_fraction, per_row[s.shape.precision] * s.shape.depth / 8,
                     0.0, 0.0)
            for s in specs
        },
        alpha=0.0,
    )  # fmt: skip
    return specs, model


def test_the_fastest_shape_depends_on_the_batch_not_only_on_bytes() -> None:
    specs, model = _two_precision_grid()
    g = Grid(specs)
    assert g.smallest.name == "d4-w1.0-q4"
    assert sorted(s.name for s in g.cheapest) == ["d4-w1.0", "d4-w1.0-q4"]
    alone = Outlook(g, model, state(waiting=[view("n", specs[0], running=False)]), 0.0)
    assert alone.fastest()[0].name == "d4-w1.0-q4"  # one row: the fewest bytes win
    busy = state([view(f"r{i}", specs[0]) for i in range(30)])
    cap, f = Outlook(g, model, busy, 0.0).fastest()
    assert cap.name == "d4-w1.0"  # 30 rows: q4's per-row cost loses
    assert f.decode_step_s < Outlook(g, model, busy, 0.0).forecast(g.smallest).decode_step_s


def test_admission_and_the_refusing_cap_use_the_fastest_shape_for_the_batch() -> None:
    specs, model = _two_precision_grid()
    busy = [view(f"r{i}", specs[0]) for i in range(30)]
    # at 30 rows d4 bf16 steps take 35 ms, d4 q4 ones 47 ms: a 40 ms TPOT is met by bf16 only
    policy = SloPolicy(specs, model, SLO(ttft_ms=2000.0, tpot_ms=40.0))
    assert isinstance(policy.admit(view("n", specs[0], running=False), state(busy), 0.0), int)
    # a queue no shape prefills in time: refused, and the cap drains it at the fastest shape
    queue = [view(f"w{i}", specs[0], running=False, prompt_tokens=512) for i in range(40)]
    tight = SloPolicy(specs, model, SLO(ttft_ms=20.0, tpot_ms=40.0))
    refused = tight.admit(view("late", specs[0], running=False), state(busy, queue), 0.0)
    assert isinstance(refused, Refuse) and refused.under_load
    assert "d4-w1.0 " in refused.reason
    assert specs[tight.decide(state(busy, queue), 0.1).step_shape].name == "d4-w1.0"

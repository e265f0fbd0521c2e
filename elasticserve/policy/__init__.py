"""Which shape serves each request: the `fixed`, `load` and `slo` policies.

Pure Python (no torch) but for latency_profile.py and factory.py's `policy_for`, which read a
loaded bundle's stored profile. The engine hands a `LoadState` snapshot to `decide()` once per
step and applies the returned `Decision`; `admit()` gives a new request its shape or a `Refuse`.

A step costs what its widest, deepest row costs (DESIGN.md), so the elastic policies pick one
*step shape*, a cap, and move the whole batch under it: waiting requests take any shape under the
cap (they hold no KV yet), running ones change width at once and may only drop layers. Pinned
requests keep their shape and a request's `min_shape` is a floor. Shrinking is immediate; growing
back waits until the better cap has been predicted to meet its target with slack for a while.
"""

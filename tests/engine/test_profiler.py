"""The profiler on a tiny model: held-out accuracy, where a profile is stored and found, the CLI."""

from __future__ import annotations

import argparse
import time

import pytest

from elasticserve.cli import profile as cli_profile
from elasticserve.engine.profiler import profile
from elasticserve.model.bundle import load_bundle
from elasticserve.model.pack import identity_pack
from elasticserve.policy.factory import policy_for
from elasticserve.policy.latency_profile import load_profile, profile_path

# The test profile times the one torch thread's CPU time, which other processes on a shared
# 2-core machine cannot inflate (wall time swung 10x at load average 12 while this was written).
# What remains is the model's own error plus cache and allocator noise: held-out medians measured
# 2-18% at load average 11; a model that ignored batch size, tokens or context would miss prefill
# steps by 2x or more.
HELD_OUT_MEDIAN_ERROR = 0.35


@pytest.fixture(scope="module")
def bundle(tiny_llama_dir, one_thread):
    base = load_bundle(tiny_llama_dir, dtype="float32")
    small = identity_pack(base.config, base.pack.fingerprint, widths=(1.0, 0.5), depths=[6, 3])
    return load_bundle(tiny_llama_dir, pack=small, dtype="float32")


@pytest.fixture(scope="module")
def measured(bundle):
    # thread_time ignores preemption, not a shared VM's memory-bandwidth spells: the fastest of
    # 5 runs per step (3 let a mixed-step median error of 0.54 through once in a full suite)
    return profile(
        bundle,
        batch_sizes=(1, 2, 4),
        context=(8, 48),
        repeats=5,
        progress=False,
        timer=time.thread_time,
    )


def test_profile_covers_every_shape_and_predicts_held_out_steps(bundle, measured):
    model = measured.model()
    assert model.covers(bundle.specs) == []
    errors = measured.errors()
    assert errors["uniform"]["n"] >= 5 and errors["mixed"]["n"] >= 4
    assert errors["uniform"]["median"] < HELD_OUT_MEDIAN_ERROR
    # a mixed step is predicted by its envelope (the full shape here): never far below the truth
    assert errors["mixed"]["median"] < HELD_OUT_MEDIAN_ERROR
    fitted = model.relative_errors(measured.samples)
    assert sorted(fitted)[len(fitted) // 2] < HELD_OUT_MEDIAN_ERROR


def test_profile_is_saved_beside_the_pack_and_found_by_device(bundle, measured, tmp_path):
    path = measured.save(profile_path(bundle, tmp_path))
    assert path.parent == tmp_path and path.name.startswith("latency-")
    assert path.name.endswith("-float32.json")
    found = load_profile(bundle, tmp_path)
    assert found is not None and found.samples == measured.samples
    other = load_bundle(bundle.model_dir, pack=bundle.pack, dtype="bfloat16")
    assert load_profile(other, tmp_path) is None  # another dtype: another profile
    base = load_bundle(bundle.model_dir, dtype="float32")
    assert load_profile(base, tmp_path) is None  # another grid: another profile


def test_policy_for_uses_the_stored_profile(bundle, measured, tmp_path):
    measured.save(profile_path(bundle, tmp_path))
    policy, found = policy_for(bundle, "slo", pack_dir=tmp_path)
    assert found is not None and policy.model is not None
    load = measured.holdout[0].load
    assert policy.model.predict(load) == pytest.approx(measured.model().predict(load))


def test_without_a_pack_dir_the_profile_lives_in_the_user_cache(
    bundle, measured, tmp_path, monkeypatch
):
    monkeypatch.delenv("ELASTICSERVE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # platformdirs' user cache on Linux
    path = measured.save(profile_path(bundle))
    assert path.is_relative_to(tmp_path / "elasticserve") and bundle.pack.fingerprint in str(path)
    assert load_profile(bundle) is not None
    # $ELASTICSERVE_CACHE moves it, as it moves the converted models and the native builds
    monkeypatch.setenv("ELASTICSERVE_CACHE", str(tmp_path / "elsewhere"))
    assert profile_path(bundle).is_relative_to(tmp_path / "elsewhere" / "latency")
    assert load_profile(bundle) is None
    assert measured.save(profile_path(bundle)) and load_profile(bundle) is not None


def test_cli_profile_writes_beside_the_pack(bundle, tmp_path, capsys):
    pack_dir = tmp_path / "pack"
    bundle.pack.save(pack_dir)
    parser = argparse.ArgumentParser()
    cli_profile.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["profile", "--model", str(bundle.model_dir), "--pack", str(pack_dir), "--dtype",
         "float32", "--max-batch", "2", "--repeats", "1", "--threads", "1"]
    )  # fmt: skip
    args.func(args)
    found = load_profile(bundle, pack_dir)
    assert found is not None and found.meta["batch_sizes"] == [1, 2]
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["shape", "B=1", "ms", "B=2", "ms"]
    assert [line.split()[0] for line in table[1:]] == [s.name for s in bundle.specs]
    assert cli_profile.batch_sizes(8) == [1, 2, 4, 8] and cli_profile.batch_sizes(6) == [1, 2, 4, 6]

"""Hypothesis profiles, and the artefacts several test modules share.

Hypothesis: the default run keeps each property test's own small `max_examples`;
`HYPOTHESIS_PROFILE=fuzz` (`just fuzz`) runs only the property tests, with many more examples.

Shared artefacts are session-scoped fixtures, built on first use and then reused by every module
that asks. They are read-only by agreement: a test reads them or exports from them into its own
folder, and copies one before writing anything beside it.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

# helpers' own asserts (e.g. a fixture writer checking it wrote the file) report like a test's
pytest.register_assert_rewrite("tests.helpers")

FUZZ_EXAMPLES = int(os.environ.get("FLM_FUZZ_EXAMPLES", "2000"))

settings.register_profile("fuzz", max_examples=FUZZ_EXAMPLES, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE")
if PROFILE:
    settings.load_profile(PROFILE)


def pytest_collection_modifyitems(config, items):
    """Under the fuzz profile only the property tests run, each with at least FUZZ_EXAMPLES
    examples (a test's own `@settings(max_examples=N)` would otherwise still cap it at N)."""
    if PROFILE != "fuzz":
        return
    keep, drop = [], []
    for item in items:
        fn = getattr(item, "obj", None)
        current = getattr(fn, "_hypothesis_internal_use_settings", None)
        if getattr(fn, "is_hypothesis_test", False) and current is not None:
            fn._hypothesis_internal_use_settings = settings(
                current, max_examples=max(current.max_examples, FUZZ_EXAMPLES), deadline=None)
            keep.append(item)
        else:
            drop.append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


# --------------------------------------------------------------------------- shared artefacts


@pytest.fixture(scope="session")
def random_checkpoints(tmp_path_factory):
    """preset -> path of `tests.helpers.checkpoints.random_checkpoint(path, preset)` (seed 0, the
    preset's default build), written once a session. Used by the ONNX, Core ML and parity tests."""
    from tests.helpers.checkpoints import random_checkpoint

    root = tmp_path_factory.mktemp("random-checkpoints")
    cache = {}

    def get(preset: str):
        if preset not in cache:
            cache[preset] = random_checkpoint(root / preset / "best.pt", preset)
        return cache[preset]

    return get

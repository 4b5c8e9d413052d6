"""Hypothesis profiles. The default run keeps each property test's own small `max_examples`;
`HYPOTHESIS_PROFILE=fuzz` (`just fuzz`) runs only the property tests, with many more examples."""

import os

from hypothesis import HealthCheck, settings

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

# Fixtures live beside the adapters they exercise; this file only plugs them in.
pytest_plugins = ["fixtures_board", "fixtures_cli", "fixtures_dps", "fixtures_tts", "fixtures_pg", "fixtures_sketch"]

# Hypothesis' per-example deadline is a timed assertion: on a loaded machine it fails tests that are right.
# Speed is measured by bench/, not by tests.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("flasher", deadline=None)
_hypothesis_settings.load_profile("flasher")

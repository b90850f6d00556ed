# Fixtures live beside the adapters they exercise; this file only plugs them in.
pytest_plugins = ["fixtures_board", "fixtures_cli", "fixtures_dps", "fixtures_tts", "fixtures_pg", "fixtures_sketch"]

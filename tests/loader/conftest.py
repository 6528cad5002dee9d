"""Markers of the loader tests."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "light_install: builds a fresh isolated venv with only vlaprep[loader] (about a minute); CI runs it"
    )

"""The fast lane's lists (conftest.SLOW_MODULES, SLOW_TESTS) name modules and tests that exist, so a
renamed or deleted test does not leave a stale entry while its replacement slips into the fast lane."""
import re
from pathlib import Path

from conftest import SLOW_MODULES, SLOW_TESTS

TESTS = Path(__file__).resolve().parent


def test_every_slow_entry_names_an_existing_module_and_test():
    missing = [m for m in SLOW_MODULES | set(SLOW_TESTS) if not (TESTS / f"{m}.py").is_file()]
    missing += [f"{m}::{t}" for m, tests in SLOW_TESTS.items() if (TESTS / f"{m}.py").is_file()
                for t in tests if not re.search(rf"^def {t}\(", (TESTS / f"{m}.py").read_text(), re.M)]
    assert not missing, f"conftest's slow lists name what does not exist: {missing}"

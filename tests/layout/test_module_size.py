"""No module of the project's packages is over 400 lines (issue 19's rule): a module that outgrows
it holds more than one concept and splits along them."""

from __future__ import annotations

from test_import_graph import project_modules

LIMIT = 400


def test_no_module_is_over_400_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in project_modules().items()}
    over = {name: n for name, n in sorted(sizes.items()) if n > LIMIT}
    assert len(sizes) > 100 and not over, over

# The two set-up commands of the README are `make demo` and `make test`; both install what they need.
PY := .venv/bin/python

.PHONY: setup run demo test lint unit bench clean

setup:
	bash scripts/setup.sh

# The appliance on its embedded defaults (./var/cello, file backend, export driver auto).
run: setup
	$(PY) -m appliance serve

demo: setup
	$(PY) -m tests.system.demo

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/lint-imports

# The whole suite: lint, then unit, integration and system tests. pytest's "no tests ran" (exit 5) fails.
test: lint
	$(PY) -m pytest -q -ra --durations=15 tests

unit: setup
	$(PY) -m pytest -q tests/unit

bench: setup
	for b in bench/*_bench.py; do $(PY) $$b --quick || exit 1; done

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache

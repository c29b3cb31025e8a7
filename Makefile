# The two quick-start commands (README): `make demo` runs the main job, `make test` the tests.
# Both install what they need first (scripts/setup.sh is idempotent).
.PHONY: setup demo test test-fast ui

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/tether demo

test:
	TETHER_SETUP_SYSTEM_EXTRAS=1 ./scripts/setup.sh
	.venv/bin/python -m pytest -q

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"

ui: setup
	.venv/bin/tether ui

# vmtool: `make demo` runs the main job end to end, `make test` runs every test tier this machine can run.
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:/usr/sbin:/sbin:$(PATH)

.PHONY: deps demo test lint bench clean

deps:
	@scripts/install-deps.sh

demo: deps
	$(PY) -m vmtool demo

test: deps
	$(PY) -m pytest $(PYTEST_ARGS)

lint: deps
	$(VENV)/bin/ruff check vmtool tests bench
	$(VENV)/bin/mypy

bench: deps
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

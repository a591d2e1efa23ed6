# The two commands of lightkv-edge; both do all the set-up on a fresh machine first.
#   make demo   chat about an image with the embedded model (no download)
#   make test   the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test clean
setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m lightkv_edge chat lightkv_edge/models/example.png -p "what colour is the circle?" --stats

test: setup
	$(PY) -m pytest tests -q

clean:
	rm -rf build $(VENV) .pytest_cache .hypothesis

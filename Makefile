# Two commands do all set-up on a fresh machine:
#   make demo   # install, then run the whole pipeline on the built-in tiny model (CPU, minutes)
#   make test   # install, then run the test suite
PYTHON ?= python3
# This machine has a local CPU build of torch; on a GPU machine install your CUDA build of torch first.
TORCH ?= torch==2.13.0
STAMP := .install.stamp

.PHONY: install demo lint test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q -e ".[dev,eval]"
	touch $(STAMP)

demo: install
	$(PYTHON) -m pipeline run

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: lint
	$(PYTHON) -m pytest -q

# Without the slow end-to-end and multi-process tests (seconds).
test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"

clean:
	rm -rf runs $(STAMP)

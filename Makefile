# The two commands of the README: `make demo` (the main job on embedded defaults) and `make test`.
# Both create .venv on first use and install the project with the versions pinned in
# constraints.txt (the versions the tests passed with).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --progress-bar off -c constraints.txt -e '.[dev]'
	touch $@

demo: install
	$(BIN)/vqscale demo

# pytest exits 5 when it collects nothing; that is reported, not turned into a failure of make.
test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests were collected"; exit 0; fi; exit $$rc

bench: install
	$(BIN)/python benchmarks/bench_loader.py

clean:
	rm -rf $(VENV) runs .pytest_cache

# Two commands for a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
CORES ?= 2
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
# Rule scripts run with the Python found first on PATH: make it the one that has medmem's pins.
export PATH := $(BIN):$(PATH)

.PHONY: install demo report test dry-run rulegraph clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install  ## run the whole audit on the phantom demo cohort, then build the HTML report
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --report results/report/report.html

test: install  ## unit tests, dry-run plan tests and a tiny end-to-end snakemake run
	$(BIN)/python -m pytest -q

dry-run: install
	$(BIN)/snakemake -n

rulegraph: install
	$(BIN)/snakemake --rulegraph > resources/rulegraph.dot

clean:
	rm -rf results .snakemake

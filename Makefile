# Two commands for a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
CORES ?= 2
# GPU-rule jobs at once. The default profile allows one (local jobs all run on the first GPU); a machine
# without a GPU runs them side by side, one per core (the demo on 2 cores: 9 min 20 s instead of 11 min 16 s).
GPU_JOBS ?= $(if $(shell command -v nvidia-smi),1,$(CORES))
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
# Rule scripts run with the Python found first on PATH: make it the one that has medmem's pins.
export PATH := $(BIN):$(PATH)
# Debian's packages for the single-node SLURM that tests/test_cluster.py starts (SLURM 22.05 on bookworm).
SLURM_PACKAGES := slurmctld slurmd slurm-client munge

.PHONY: install slurm-packages demo report test test-cluster dry-run rulegraph clean

$(VENV)/.installed: pyproject.toml workflow/profiles/slurm/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]' -r workflow/profiles/slurm/requirements.txt
	touch $@

install: $(VENV)/.installed

# Installs the SLURM packages when they are missing and this is a Debian machine where we are root;
# elsewhere it says so, and the cluster test skips (saying why).
slurm-packages:
	@if dpkg -s $(SLURM_PACKAGES) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "slurm-packages: not root on a Debian machine: tests/test_cluster.py will skip"; \
	else \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $(SLURM_PACKAGES) >/dev/null; \
	fi

demo: install  ## run the whole audit on the phantom demo cohort, then build the HTML report
	$(BIN)/snakemake --cores $(CORES) --resources gpu=$(GPU_JOBS)
	$(BIN)/snakemake --report results/report/report.html

test: install slurm-packages  ## unit tests, dry-run plan tests, tiny end-to-end runs (local and on SLURM)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

test-cluster: install slurm-packages  ## only the SLURM profile tests
	$(BIN)/python -m pytest -q tests/test_cluster.py

dry-run: install
	$(BIN)/snakemake -n

rulegraph: install
	$(BIN)/snakemake --rulegraph > resources/rulegraph.dot

clean:
	rm -rf results .snakemake

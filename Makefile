# lossbook: every command sets itself up (a .venv with the package, the book tooling and the
# test tools at the versions in constraints/ci.txt), so each works on a fresh clone.
#   make test                      the full check: unit tests, every chapter executed and
#                                  validated, the contract, the book built with warnings as errors
#                                  and opened in a headless browser
#   make browser-tests             open the built book in headless Chromium (needs Debian's chromium)
#   make book                      execute every chapter at SCALE=ci and build _build/html
#   make chapter C=classification/comp_sum SCALE=full   run one chapter at any scale
#   make bench                     rerun the CPU benchmarks against peer libraries into
#                                  results/benchmarks/cpu.json (the book's Performance page)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SCALE ?= ci
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
# this machine keeps a CPU build of torch on disk; elsewhere pip uses the package index
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
STAMP := $(VENV)/.lossbook-installed
QUIET_ENV := LOSSBOOK_QUIET=1 PYTHONWARNINGS=ignore::DeprecationWarning MPLBACKEND=agg

.PHONY: bench setup unit execute nbval build book site-tests browser-tests test chapter colab constraints clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints/ci.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(FIND_LINKS) -c constraints/ci.txt -e ".[book,test]"
	@touch $@

unit: setup
	$(QUIET_ENV) $(BIN)/python -m pytest -q -n $(JOBS) -p no:cacheprovider tests --ignore=tests/build --ignore=tests/browser

execute: setup
	$(BIN)/python tools/run_chapters.py --scale ci --jobs $(JOBS)

nbval: setup
	$(QUIET_ENV) LOSSBOOK_THREADS=1 $(BIN)/python -m pytest -q -n $(JOBS) -p no:cacheprovider \
	  --dist loadfile --nbval-lax --nbval-current-env _build/executed/chapters

build: setup
	$(BIN)/python tools/build_book.py

book: execute build

site-tests: setup
	$(QUIET_ENV) $(BIN)/python -m pytest -q -p no:cacheprovider tests/build

# the built book in headless Chromium (Debian's `chromium`, or $LOSSBOOK_CHROMIUM): every page, both
# themes, desktop and phone; screenshots for review in _build/screenshots/
browser-tests: setup
	$(QUIET_ENV) $(BIN)/python -m pytest -q -p no:cacheprovider tests/browser

test: setup unit execute nbval build site-tests browser-tests

chapter: setup
	@test -n "$(C)" || { echo "usage: make chapter C=<part>/<slug> [SCALE=ci|full]"; exit 2; }
	$(BIN)/python tools/run_chapters.py chapters/$(C).md --scale $(SCALE) \
	  $(if $(filter full,$(SCALE)),--record-dir results,)

colab: setup
	$(BIN)/python tools/colab.py

constraints: setup
	$(BIN)/python -m pip freeze --exclude-editable | sed 's/+cpu//' | sort -f > constraints/ci.txt.new
	@{ sed -n '1,/^[a-zA-Z]/{/^#/p}' constraints/ci.txt; cat constraints/ci.txt.new; } > constraints/ci.tmp && \
	  mv constraints/ci.tmp constraints/ci.txt && rm constraints/ci.txt.new

clean:
	rm -rf _build

# lossbook against peer libraries (pytorch-metric-learning, LibAUC, torch), CPU; not part of `make test`.
# LibAUC declares torch_geometric, transformers, opencv... as requirements; its losses need none of them.
bench: setup
	$(BIN)/python -m pip install -q --disable-pip-version-check $(FIND_LINKS) -c constraints/ci.txt -e ".[bench]"
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps "libauc==2.0.1"
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

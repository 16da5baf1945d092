# make run   build the buildout and serve Zope through gunicorn on http://127.0.0.1:8080
# make test  run the test suite (real buildouts, Zope, ZEO and gunicorn on loopback)
PYTHON ?= python3
VENV := .venv
TESTVENV := .venv-test
BUILDOUT := $(VENV)/bin/buildout
CONFIG ?= buildout.cfg

.PHONY: run build test test-plone bench clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

build: $(VENV)/.installed
	$(BUILDOUT) -N -c $(CONFIG)

run: build
	exec bin/gunicorn-instance

$(TESTVENV)/.installed: requirements-test.txt
	$(PYTHON) -m venv $(TESTVENV)
	$(TESTVENV)/bin/pip install --quiet -r requirements-test.txt
	touch $@

test: $(VENV)/.installed $(TESTVENV)/.installed
	$(TESTVENV)/bin/pytest $(PYTEST_ARGS)

# Plone 6.2 from plone.cfg: a site over ZEO served by two workers (slow: Plone's eggs).
test-plone: $(VENV)/.installed $(TESTVENV)/.installed
	$(TESTVENV)/bin/pytest -m plone tests/test_plone.py $(PYTEST_ARGS)

# gunicorn against waitress, bjoern and the limits, Zope over ZEO (docs/benchmarks.rst).
# BENCH_ARGS=--quick: a short smoke run; BENCH_ARGS=--zope-criteria: Zope's own test.
bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(TESTVENV) bin parts develop-eggs .installed.cfg src/*.egg-info

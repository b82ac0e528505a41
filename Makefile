# Keel's entry points. A fresh machine needs python3 (3.11+), Java 17+, Maven and make.
#   make demo   set everything up, start the local broker, run the two-tenant demo
#   make test   set everything up, start the local broker, run the whole test suite

VENV ?= .venv
PYTHON ?= python3
KEEL := $(VENV)/bin/keel
PYTEST_ARGS ?=

.PHONY: setup demo test up down status bench clean

setup: $(VENV)/.installed infra/kafka/libs/.fetched

EXAMPLES := examples/support_desk examples/deploys

$(VENV)/.installed: pyproject.toml $(addsuffix /pyproject.toml,$(EXAMPLES))
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]' $(addprefix -e ,$(EXAMPLES))
	touch $@

infra/kafka/libs/.fetched: infra/kafka/pom.xml
	mvn -q -B -f infra/kafka/pom.xml dependency:copy-dependencies
	touch $@

demo: setup
	$(KEEL) demo

test: setup
	$(KEEL) up
	$(VENV)/bin/pytest $(PYTEST_ARGS)

up: setup
	$(KEEL) up

down:
	$(KEEL) down

status:
	$(KEEL) status

bench: setup
	$(KEEL) up
	$(VENV)/bin/python benchmarks/kafka_baseline.py

clean:
	-$(KEEL) down
	rm -rf $(VENV) .keel infra/kafka/libs

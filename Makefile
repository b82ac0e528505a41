# Keel's entry points. A fresh machine needs python3 (3.11+), Java 17+, Maven and make
# (and Rust's cargo for the native Avro core; without it setup warns and Keel uses fastavro).
#   make demo   set everything up, start the local broker, run the two-tenant demo
#   make test   set everything up, start the local broker, run the whole test suite

VENV ?= .venv
PYTHON ?= python3
KEEL := $(VENV)/bin/keel
PYTEST_ARGS ?=

.PHONY: setup demo test up down status bench clean

setup: $(VENV)/.installed infra/kafka/libs/.fetched

EXAMPLES := examples/support_desk examples/deploys

NATIVE_AVRO := native/keel-avro
CARGO ?= $(or $(shell command -v cargo),$(wildcard $(HOME)/.cargo/bin/cargo))

$(VENV)/.installed: pyproject.toml $(addsuffix /pyproject.toml,$(EXAMPLES)) \
		$(addprefix $(NATIVE_AVRO)/,pyproject.toml Cargo.toml Cargo.lock keel_avro.pyi) $(wildcard $(NATIVE_AVRO)/src/*.rs)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]' $(addprefix -e ,$(EXAMPLES))
	@# The native Avro core (keel_avro) is optional: without cargo Keel encodes with fastavro.
	$(if $(CARGO),PATH="$(dir $(CARGO)):$$PATH" $(VENV)/bin/pip install -q ./$(NATIVE_AVRO),\
		@echo "warning: cargo not found: keel_avro not built; Keel uses fastavro for Avro (slower)")
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

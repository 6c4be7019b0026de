# Two commands, from a fresh Debian checkout: `make demo` runs the demo, `make test` runs the
# tests. Both install what they need first (scripts/setup.sh); it is quick when nothing changed.
VENV ?= .venv
export RDV_VENV := $(VENV)
BIN := $(VENV)/bin

.PHONY: setup demo test test-lerobot lint unit reliability clean

$(VENV)/.setup-done: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

setup: $(VENV)/.setup-done

demo: setup
	$(BIN)/rdv demo

test: setup lint
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory test-lerobot

# The LeRobot tier (tests/lerobot): LeRobot's own SO101 classes over emulated Feetech buses, in a
# cached venv with LeRobot and torch (scripts/lerobot_venv.sh: built on first use, ~2-3 min and
# ~8.4 GB under ~/.cache/rdv/lerobot, then reused).
test-lerobot: setup
	lerobot_python=$$(bash scripts/lerobot_venv.sh) && "$$lerobot_python" -m pytest tests/lerobot

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

unit: setup
	$(BIN)/python -m pytest tests/unit

# The fault suite, then docs/reliability.md from what it measured (rendered even when a case
# failed, which the page then shows; the exit status is the suite's).
reliability: setup
	$(BIN)/python -m pytest tests/faults; status=$$?; \
	$(BIN)/python scripts/reliability_table.py && exit $$status

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

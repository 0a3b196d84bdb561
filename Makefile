# The two commands of the README:
#   make run    set up (first time) and run the main job end to end on the embedded defaults
#   make test   set up (first time) and run the test suite
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_DATA_DISABLE_PROGRESS_BARS := 1

.PHONY: setup run test test-slow
setup:
	bash scripts/setup.sh

run: setup
	$(PY) jobs/main.py --config configs/main_ml100k.yaml

test: setup
	$(PY) -m pytest -q --durations=25

test-slow: setup
	$(PY) -m pytest -q -m slow

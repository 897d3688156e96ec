"""What never changes for a registered version (its inputs, its holdout sample) is read once per process by the
deploy path (tasks/rollout.py) — and again for a version of the same number that is another one (a model deleted and
registered anew). No server: the registry client and readers are replaced by recorders."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from flywheel.tasks import registry, rollout


class Client:
    def __init__(self) -> None:
        self.run_id = "run-a"

    def get_model_version(self, name, version):
        return SimpleNamespace(name=name, version=version, run_id=self.run_id, source=f"models:/{self.run_id}")


@pytest.fixture
def reads(monkeypatch):
    seen: list[tuple] = []
    monkeypatch.setattr(rollout, "_PER_VERSION", {})
    monkeypatch.setattr(registry, "find_sample", lambda c, mv, artifact: seen.append(("sample", mv.run_id)) or "frame")
    monkeypatch.setattr(registry, "model_inputs", lambda n, v: seen.append(("inputs", v)) or "inputs")
    return seen


def test_a_versions_sample_and_inputs_are_read_once(reads):
    client = Client()
    for _ in range(3):
        assert rollout._sample_of(client, "m", "2") == "frame"
        assert rollout._inputs_of(client, "m", "2") == "inputs"
    assert reads == [("sample", "run-a"), ("inputs", "2")]


def test_the_same_number_of_another_registration_is_read_again(reads):
    client = Client()
    rollout._sample_of(client, "m", "2")
    client.run_id = "run-b"  # the model was deleted and registered again: v2 is another model now
    rollout._sample_of(client, "m", "2")
    assert reads == [("sample", "run-a"), ("sample", "run-b")]


def test_the_cache_stays_bounded(reads, monkeypatch):
    monkeypatch.setattr(rollout, "_PER_VERSION_MAX", 3)
    client = Client()
    for v in range(10):
        rollout._sample_of(client, "m", str(v))
    assert len(rollout._PER_VERSION) == 3

"""Batching requests to a model whose signature has `Any` columns (what the train flow logs since issue 14): the
schema is batchable, and the batching key keeps apart exactly the rows that a merged frame would give another dtype
than they get alone under MLflow's own parsing and schema enforcement. Plain data; no server, no model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Schema, TensorSpec

from flywheel.serving.parsing import json_job
from flywheel.serving.slots import _float_columns, batchable_schema

RAW = Schema([ColSpec(AnyType(), "hour"), ColSpec(AnyType(), "distance"), ColSpec(DataType.string, "carrier")])


def _slot(schema: Schema) -> SimpleNamespace:
    return SimpleNamespace(input_schema=schema, compiled=None, batchable=batchable_schema(schema),
                           float_cols=_float_columns(schema))  # fmt: skip


def _key(slot: SimpleNamespace, row: dict):
    return json_job(slot, {"dataframe_records": [row]}, "r").key


def _enforced(rows: list[dict], schema: Schema):
    """The frame `PyFuncModel.predict` hands the model for these records, as the server parses them."""
    from mlflow.models.utils import _enforce_schema
    from mlflow.utils.proto_json_utils import dataframe_from_parsed_json

    return _enforce_schema(dataframe_from_parsed_json(rows, "records", schema), schema)


def test_schemas_of_scalar_and_any_columns_are_batchable_the_others_not():
    assert batchable_schema(RAW)
    assert batchable_schema(Schema([ColSpec(DataType.double, "a"), ColSpec(DataType.long, "b")]))
    assert not batchable_schema(Schema([ColSpec(AnyType(), "a"), ColSpec(DataType.datetime, "t")]))
    assert not batchable_schema(Schema([ColSpec(Array(DataType.double), "a")]))
    assert not batchable_schema(Schema([ColSpec(AnyType())]))  # no column names
    assert not batchable_schema(Schema([TensorSpec(np.dtype("float64"), (-1, 3))]))
    assert not batchable_schema(None)


def test_any_columns_are_not_float_columns_so_ints_floats_and_nulls_keep_their_own_keys():
    slot = _slot(RAW)
    assert slot.batchable and slot.float_cols == frozenset()
    ints = _key(slot, {"hour": 5, "distance": 300, "carrier": "AA"})
    assert ints is not None and ints == _key(slot, {"hour": 23, "distance": 1200, "carrier": "UA"})
    floats = _key(slot, {"hour": 5.0, "distance": 300, "carrier": "AA"})
    nulls = _key(slot, {"hour": None, "distance": 300, "carrier": "AA"})
    text = _key(slot, {"hour": "5", "distance": 300, "carrier": "AA"})
    assert len({ints, floats, nulls, text}) == 4
    assert _key(slot, {"hour": 2**63, "distance": 300, "carrier": "AA"}) is None  # beyond int64: alone
    assert _key(slot, {"hour": [5], "distance": 300, "carrier": "AA"}) is None  # not a scalar: alone


ROWS = [
    {"hour": 5, "distance": 300, "carrier": "AA"},
    {"hour": 5.5, "distance": 300, "carrier": "AA"},
    {"hour": None, "distance": 300, "carrier": "AA"},
    {"hour": "17", "distance": 300, "carrier": "AA"},
    {"hour": True, "distance": 300, "carrier": None},
    {"hour": 7, "distance": 2**40, "carrier": "DL"},
    {"hour": 8.25, "distance": 12.0, "carrier": "B6"},
    {"hour": None, "distance": None, "carrier": None},
    {"hour": 9, "distance": 310, "carrier": "WN"},
]


@pytest.mark.parametrize("i", range(len(ROWS)))
def test_rows_of_one_key_merged_give_each_row_the_frame_it_gets_alone(i):
    slot = _slot(RAW)
    row = ROWS[i]
    mates = [r for r in ROWS if r is not row and _key(slot, r) == _key(slot, row)]
    alone = _enforced([row], RAW)
    merged = _enforced([*mates, row, *mates], RAW)
    mine = merged.iloc[[len(mates)]].reset_index(drop=True)
    assert dict(mine.dtypes) == dict(alone.dtypes)
    assert mine.astype(object).where(mine.notna(), None).to_dict("records") == (
        alone.astype(object).where(alone.notna(), None).to_dict("records")
    )


def test_rows_of_different_keys_would_change_each_others_dtype_which_is_why_they_are_kept_apart():
    slot = _slot(RAW)
    an_int, a_float = ROWS[0], ROWS[1]
    assert _key(slot, an_int) != _key(slot, a_float)
    assert str(_enforced([an_int], RAW)["hour"].dtype) == "int64"
    assert str(_enforced([an_int, a_float], RAW)["hour"].dtype) == "float64"  # a merged int row would be a float


class _Doubler:
    """A model of `Any` columns that fails on text that is no number, anywhere in the frame it is given."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def predict(self, frame):
        self.calls.append(len(frame))
        return frame["hour"].astype("float64").to_numpy() * 2


def test_a_bad_row_in_a_merged_group_fails_alone_and_the_others_get_their_answers():
    import json

    from flywheel.serving.metrics import _Metrics
    from flywheel.serving.scoring import score_group
    from flywheel.serving.slots import Slot

    model = _Doubler()
    slot = Slot(version="1", model=model, input_schema=RAW, run_id=None, source="s", local_dir=None, loaded_at=0.0,
                load_seconds=0.0, requested_as="models:/m/1")  # fmt: skip
    slot.batchable, slot.float_cols = batchable_schema(RAW), _float_columns(RAW)
    rows = [{"hour": h, "distance": 300, "carrier": "AA"} for h in ("5", "not a number", "7")]
    jobs = [json_job(slot, {"dataframe_records": [r]}, f"r{i}") for i, r in enumerate(rows)]
    assert len({j.key for j in jobs}) == 1 and jobs[0].key is not None  # one batching key: one group
    outcomes = score_group(jobs, _Metrics("m", "test"), None)
    assert model.calls == [3, 1, 1, 1]  # the merged frame failed: each request alone
    assert [o.status for o in outcomes] == [200, 400, 200]
    assert [json.loads(o.body).get("predictions") for o in outcomes] == [[10.0], None, [14.0]]
    assert json.loads(outcomes[1].body)["error_code"] == "PREDICTION_FAILED"
    assert (slot.requests, slot.rows, slot.errors) == (3, 2, 1)

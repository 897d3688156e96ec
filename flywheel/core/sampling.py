"""Seeded samples of tables, so the same data always gives the same sample."""

from __future__ import annotations

import pandas as pd


def sample_rows(df: pd.DataFrame, cap: int, seed: int) -> pd.DataFrame:
    """At most `cap` rows, drawn without replacement with a fixed seed (all rows when under the cap), in their
    original order."""
    if len(df) <= cap:
        return df.reset_index(drop=True)
    return df.sample(n=cap, random_state=seed).sort_index().reset_index(drop=True)

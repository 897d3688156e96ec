#!/bin/sh
# One-shot MinIO setup (minio/mc image): the artifact bucket, and a non-root user limited to it that the MLflow
# server (artifact proxy) and flows reading s3:// data use. Safe to run again.
set -eu

: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${FLYWHEEL_S3_BUCKET:?}"
: "${FLYWHEEL_S3_ACCESS_KEY:?}" "${FLYWHEEL_S3_SECRET_KEY:?}"
endpoint="${MINIO_ENDPOINT:-http://minio:9000}"
policy="flywheel-bucket"
policy_file="$(mktemp)"
trap 'rm -f "$policy_file"' EXIT

mc alias set local "$endpoint" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "local/$FLYWHEEL_S3_BUCKET"

cat > "$policy_file" <<JSON
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListBucket"],
     "Resource": ["arn:aws:s3:::$FLYWHEEL_S3_BUCKET"]},
    {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
     "Resource": ["arn:aws:s3:::$FLYWHEEL_S3_BUCKET/*"]}
  ]
}
JSON
mc admin policy create local "$policy" "$policy_file" >/dev/null
# Adding an existing user again updates its secret; attaching an attached policy fails: ignored on a re-run.
mc admin user add local "$FLYWHEEL_S3_ACCESS_KEY" "$FLYWHEEL_S3_SECRET_KEY" >/dev/null
mc admin policy attach local "$policy" --user "$FLYWHEEL_S3_ACCESS_KEY" >/dev/null 2>&1 || true
echo "bucket $FLYWHEEL_S3_BUCKET and user $FLYWHEEL_S3_ACCESS_KEY ready"

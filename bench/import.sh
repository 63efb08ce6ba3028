#!/usr/bin/env bash
# Import benchmark (issues 3 and 40): synthetic patients for one hospital,
# imported into SQLite and into PostgreSQL with the release binary. Prints
# resources/s and peak RSS as `ghx node import` reports them. Not a test:
# numbers only.
#
#   bench/import.sh [PATIENTS] [WORKDIR]
#
# GHX_BIN: a release binary built before (default: build this checkout).
# GHX_BIN_BEFORE: another release binary (an earlier commit) run on the same
# data in the same run, first, for a side-by-side comparison.
# PostgreSQL is taken from GHX_TEST_POSTGRES_URL (default: local, trust auth);
# throwaway databases are created and dropped.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
patients=${1:-100000}
work=${2:-$(mktemp -d)}
pg_admin=${GHX_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
pg_db=ghx_bench_$$

if [[ -z "${GHX_BIN:-}" ]]; then
  cargo build --release -q -p ghx
fi
ghx=${GHX_BIN:-target/release/ghx}
mkdir -p "$work"

echo "== synth: $patients patients (chosun)"
/usr/bin/env time -f "synth: %e s, peak RSS %M KiB" "$ghx" synth --hospital chosun --patients "$patients" --seed 42 --out "$work/data" 2>&1
du -sh "$work/data"

# The whole node file, so that binaries from before import went offline
# (which read every key) run too; offline import ignores the rest.
config() {
  cat > "$work/$1.toml" <<TOML
id = "chosun"
display_name = "Chosun University Hospital"
listen = "127.0.0.1:0"
database_url = "$2"
policy_dir = "$repo/policies/chosun"
[tls]
ca = "unused.pem"
cert = "unused.pem"
key = "unused.pem"
[[coordinator_keys]]
kid = "unused"
public_key = "unused.pem"
TOML
}

trap 'psql "$pg_admin" -q -c "DROP DATABASE IF EXISTS ${pg_db}_before WITH (FORCE)" -c "DROP DATABASE IF EXISTS $pg_db WITH (FORCE)"' EXIT

# run LABEL BINARY: SQLite import, unchanged re-import, PostgreSQL import.
run() {
  local label=$1 bin=$2 db=$3
  cd "$work"
  echo "== [$label] import into SQLite"
  config "sqlite-$label" "$work/$label.db"
  "$bin" node import --config "$work/sqlite-$label.toml" "$work/data" | grep -v "^  "
  du -sh "$work/$label.db"
  echo "== [$label] re-import (unchanged) into SQLite"
  "$bin" node import --config "$work/sqlite-$label.toml" "$work/data" | grep -v "^  "
  rm -f "$work/$label.db"*
  echo "== [$label] import into PostgreSQL"
  psql "$pg_admin" -q -c "CREATE DATABASE $db"
  config "postgres-$label" "${pg_admin%/*}/$db"
  "$bin" node import --config "$work/postgres-$label.toml" "$work/data" | grep -v "^  "
  psql "$pg_admin" -q -c "DROP DATABASE $db WITH (FORCE)"
  cd - > /dev/null
}

if [[ -n "${GHX_BIN_BEFORE:-}" ]]; then
  run before "$(realpath "$GHX_BIN_BEFORE")" "${pg_db}_before"
fi
run now "$(realpath "$ghx")" "$pg_db"

#!/usr/bin/env bash
# Import benchmark (issue 3): synthetic patients for one hospital, imported
# into SQLite and into PostgreSQL with the release binary. Prints resources/s
# and peak RSS as `ghx node import` reports them. Not a test: numbers only.
#
#   bench/import.sh [PATIENTS] [WORKDIR]
#
# PostgreSQL is taken from GHX_TEST_POSTGRES_URL (default: local, trust auth);
# a throwaway database is created and dropped.
set -euo pipefail
cd "$(dirname "$0")/.."
patients=${1:-100000}
work=${2:-$(mktemp -d)}
pg_admin=${GHX_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
pg_db=ghx_bench_$$

cargo build --release -q -p ghx
ghx=target/release/ghx
mkdir -p "$work"

echo "== synth: $patients patients (chosun)"
/usr/bin/env time -f "synth: %e s, peak RSS %M KiB" "$ghx" synth --hospital chosun --patients "$patients" --seed 42 --out "$work/data" 2>&1
du -sh "$work/data"

config() {
  # Import is offline: the database (and the policy directory, for the
  # consent picture) is all it reads.
  cat > "$work/$1.toml" <<TOML
database_url = "$2"
policy_dir = "$PWD/policies/chosun"
TOML
}

echo "== import into SQLite"
config sqlite "$work/bench.db"
"$ghx" node import --config "$work/sqlite.toml" "$work/data"
du -sh "$work/bench.db"*
echo "== re-import (unchanged) into SQLite"
"$ghx" node import --config "$work/sqlite.toml" "$work/data"

echo "== import into PostgreSQL"
psql "$pg_admin" -q -c "CREATE DATABASE $pg_db"
trap 'psql "$pg_admin" -q -c "DROP DATABASE IF EXISTS $pg_db WITH (FORCE)"' EXIT
config postgres "${pg_admin%/*}/$pg_db"
"$ghx" node import --config "$work/postgres.toml" "$work/data"

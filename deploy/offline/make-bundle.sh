#!/usr/bin/env bash
# Builds the offline install bundle for a hospital network without internet:
# the release binary, the shared libraries' Debian packages it needs, the
# systemd units, example configurations, default policies and an installer,
# with SHA-256 sums. Run on a connected build machine of the same Debian
# release as the hospital server; carry the tarball across on approved media.
#
#   deploy/offline/make-bundle.sh            # -> target/ghx-bundle-<version>.tar.gz
set -euo pipefail
cd "$(dirname "$0")/../.."
version=$(cargo metadata --no-deps --format-version 1 \
  | python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="ghx"))')
out="target/ghx-bundle-$version"
rm -rf "$out" && mkdir -p "$out/bin" "$out/debs" "$out/systemd" "$out/examples"

cargo build --release --locked -p ghx
install -m 0755 target/release/ghx "$out/bin/ghx"
# The runtime libraries diesel links, with their dependencies, as .debs.
(cd "$out/debs" && apt-get download libpq5 libsqlite3-0 \
  $(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
      --no-breaks --no-replaces --no-enhances libpq5 \
    | grep '^[a-z]' | sort -u | grep -v -e '^libc6$' -e '^libpq5$'))
cp deploy/systemd/*.service "$out/systemd/"
cp deploy/examples/*.toml "$out/examples/"
cp -r policies "$out/policies"
cp deploy/offline/install.sh "$out/install.sh"
cp deploy/README.md "$out/README.md"
(cd "$out" && find . -type f ! -name SHA256SUMS -print0 | sort -z | xargs -0 sha256sum > SHA256SUMS)
tar -C target -czf "$out.tar.gz" "ghx-bundle-$version"
echo "wrote $out.tar.gz"

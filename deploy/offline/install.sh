#!/usr/bin/env bash
# Installs a ghx node from the offline bundle (run as root inside the
# unpacked bundle). Checks every file against SHA256SUMS first; installs the
# shared libraries from the bundled .debs, the binary, the systemd unit and
# a starting configuration; never overwrites an existing configuration.
#
#   sudo ./install.sh chosun
set -euo pipefail
cd "$(dirname "$0")"
hospital=${1:?usage: install.sh <chonnam|chosun|christian>}
sha256sum --quiet -c SHA256SUMS
dpkg -i debs/*.deb
id ghx >/dev/null 2>&1 || useradd --system --home /var/lib/ghx ghx
install -m 0755 bin/ghx /usr/local/bin/ghx
install -d -o ghx -m 0750 /etc/ghx /etc/ghx/pki /var/lib/ghx
if [[ ! -e /etc/ghx/node.toml ]]; then
  install -m 0640 -o root -g ghx "examples/node-$hospital.toml" /etc/ghx/node.toml
fi
if [[ ! -e "/etc/ghx/policies/$hospital" ]]; then
  ghx policy init --hospital "$hospital" --out "/etc/ghx/policies/$hospital"
fi
install -m 0644 systemd/ghx-node.service /etc/systemd/system/ghx-node.service
systemctl daemon-reload
ghx --version
echo "installed. Next: put ca.pem, $hospital.pem, $hospital.key and the"
echo "coordinator's signing key in /etc/ghx/pki, edit /etc/ghx/node.toml, check it with"
echo "  ghx node run --config /etc/ghx/node.toml --print-config"
echo "then: systemctl enable --now ghx-node"
